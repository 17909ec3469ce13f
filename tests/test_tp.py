"""Tensor parallelism: transformers `tp_plan="auto"` with 2 CPU processes (gloo).

Each rank loads the same tiny Qwen3.5 checkpoint tensor-parallel (run unpatched, then patched
in place) and whole (no TP, patched). Checked on every rank: patched TP equals
unpatched TP bitwise; the `beta` and `recurrence` sites fire and see whole tensors, equal on
both ranks; an intervention applied on every rank (zero beta of one head at one position)
matches the same intervention on the single-process model to TP tolerance (the row-wise
layers all-reduce partial sums, which reorders floating-point additions).
"""

import os
import socket
import sys
import tempfile

import pytest
import torch

pytestmark = pytest.mark.compat

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is unavailable", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
TP_TOL = 1e-5  # fp32; measured max |diff| here ~1e-7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_checkpoint(path: str) -> None:
    sys.path.insert(0, HERE)
    import models  # noqa: F401  (tests/models.py)
    import transformers as tr

    cfg = tr.Qwen3_5TextConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=48,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=12,
        linear_conv_kernel_dim=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    tr.Qwen3_5ForCausalLM(cfg).save_pretrained(path)


def _tp_kwargs(world: int) -> dict:
    """How this release asks from_pretrained for tensor parallelism: `tp_plan="auto"` (5.20 on),
    or `distributed_config=DistributedConfig(tp_size=N)` (5.15-5.19)."""
    import inspect

    import transformers as tr

    if 'kwargs.pop("tp_plan"' in inspect.getsource(tr.PreTrainedModel.from_pretrained):
        return {"tp_plan": "auto"}
    from transformers.distributed.configuration_utils import DistributedConfig

    return {"distributed_config": DistributedConfig(tp_size=world)}


def _worker(rank: int, world: int, port: int, path: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        HF_HUB_OFFLINE="1",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import transformers as tr

        import gdn_intervene as gi

        ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(0))
        load = lambda **kw: tr.Qwen3_5ForCausalLM.from_pretrained(path, **kw).eval()  # noqa: E731
        tp = load(**_tp_kwargs(world))
        whole = gi.patch(load())
        with torch.no_grad():
            want = tp(ids).logits  # unpatched TP
            patched_tp = gi.patch(tp)  # in place: the same sharded weights, now patched
            seen = {}
            edits = {(0, s): (lambda x, s=s: seen.__setitem__(s, x.clone())) for s in ("beta", "recurrence")}
            with gi.intervene(patched_tp, edits):
                got = patched_tp(ids).logits

            def zero(beta):
                beta = beta.clone()
                beta[:, 7, 1] = 0
                return beta

            with gi.intervene(patched_tp, {(2, "beta"): zero}):
                edited_tp = patched_tp(ids).logits
            with gi.intervene(whole, {(2, "beta"): zero}):
                edited_one = whole(ids).logits
        torch.save(
            {
                "equal": torch.equal(got, want),
                "seen": seen,
                "edited_tp": edited_tp,
                "edited_one": edited_one,
                "plain": want,
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_two_ranks():
    import transformers as tr

    config = getattr(tr, "Qwen3_5TextConfig", None)
    if config is None or not getattr(config, "base_model_tp_plan", None):
        pytest.skip("no Qwen3.5 (or no tensor-parallel plan for it) in this transformers release")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        path, out = os.path.join(tmp, "ckpt"), os.path.join(tmp, "out")
        os.makedirs(out)
        _tiny_checkpoint(path)
        mp.spawn(_worker, args=(2, _free_port(), path, out), nprocs=2, join=True)
        r = [torch.load(os.path.join(out, f"rank{i}.pt"), weights_only=True) for i in range(2)]
    for res in r:
        assert res["equal"], "patched TP differs from unpatched TP"
        assert set(res["seen"]) == {"beta", "recurrence"}
        assert res["seen"]["beta"].shape == (2, 16, 4) and res["seen"]["recurrence"].shape == (2, 16, 4, 12)  # whole
        assert (res["edited_tp"] - res["edited_one"]).abs().max() <= TP_TOL
        assert (res["edited_tp"] != res["plain"]).any()  # the edit did something
    for s in ("beta", "recurrence"):
        assert torch.equal(r[0]["seen"][s], r[1]["seen"][s]), f"{s} differs between ranks"
    assert torch.equal(r[0]["edited_tp"], r[1]["edited_tp"])
