"""Sweeps across processes: `causal_trace(..., process_group=)` and `attribution_patching(...,
verify=K, process_group=)` split their batches between the ranks of a torch.distributed group
(2 gloo ranks on CPU here, each holding the same tiny model) and gather the scores on every
rank. Reference: the same call in one process; each rank runs whole batches, the very rows one
process runs, so the results are equal bit for bit.
"""

import os
import socket

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is unavailable", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs():
    import sys

    sys.path.insert(0, HERE)
    from conftest import trace_pair
    from models import ANY_GDN, build

    import gdn_intervene as gi

    model = gi.patch(build(ANY_GDN))
    clean, bad, answers = trace_pair(model, 10, seed=3)
    return model, clean, bad, answers


def _run(model, clean, bad, answers, group):
    from gdn_intervene import tracing

    trace = tracing.causal_trace(model, clean, bad, answers=answers, batch_size=9, process_group=group)
    atp = tracing.attribution_patching(model, clean, bad, answers=answers, verify=12, batch_size=5, process_group=group)
    return trace.scores, atp.scores, atp.verified


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_run(*_inputs(), dist.group.WORLD), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    want = _run(*_inputs(), None)
    for rank in range(2):
        trace, atp, verified = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for got, ref in ((trace, want[0]), (atp, want[1])):
            assert got.keys() == ref.keys()
            assert all(torch.equal(got[n].nan_to_num(7.0), ref[n].nan_to_num(7.0)) for n in got)
        assert list(verified) == list(want[2]) and verified == want[2]  # the same cells, the same scores
    assert len(want[2]) == 12


def test_a_process_group_without_torch_distributed_is_refused():
    from gdn_intervene import tracing

    model, clean, bad, answers = _inputs()
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        tracing.causal_trace(model, clean, bad, answers=answers, process_group=object())
