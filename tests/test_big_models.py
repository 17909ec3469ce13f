"""Big-model paths: accelerate dispatch/offload, packed sequences, gradient checkpointing, train mode."""

import copy

import pytest
import torch
from accelerate import cpu_offload, disk_offload
from conftest import ids_for
from models import KDA, MODELS, build, present
from reference import hf_gdn

import gdn_intervene as gi
from gdn_intervene.layer import GDNMixin


def _heads(model) -> int:
    m = gi.gdn_layers(model)[0]
    return m._gdn_family.letters(model.config.get_text_config())["HV"]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.compat
@pytest.mark.parametrize("when", ["patch-after-offload", "patch-before-offload"])
@pytest.mark.parametrize("offload", ["cpu", "disk"])
@pytest.mark.parametrize("name", present("qwen3_next", "qwen3_5", "kimi_linear", "bailing_hybrid"))
def test_offloaded_model_equals_and_sites_fire(tmp_path, name, offload, when):
    """Weights live off-device (meta params, accelerate hooks); the decomposed forward reads
    conv1d.weight directly, so its hooks are forced, as in HF. The sites must still fire.
    KDA: dt_bias and A_log live on `forget_gate`, whose forward the decomposed one does not
    call, so its hooks are forced too."""
    ref = build(name)
    model = copy.deepcopy(ref)
    if when == "patch-before-offload":
        gi.patch(model)
    if offload == "cpu":
        cpu_offload(model, execution_device="cpu")
    else:
        disk_offload(model, offload_dir=str(tmp_path), execution_device="cpu")
    assert hf_gdn(model, 0).conv1d.weight.device.type == "meta"
    assert getattr(hf_gdn(model, 0), "forget_gate", hf_gdn(model, 0)).dt_bias.device.type == "meta"
    if when == "patch-after-offload":
        gi.patch(model)
    fired = []
    with gi.intervene(model, {(0, "beta"): lambda b: fired.append(b.shape)}):
        out = _logits(model, ids_for(9))
    assert fired == [torch.Size([3, 9, _heads(model)])]
    assert torch.equal(out, _logits(ref, ids_for(9)))
    gen = model.generate(ids_for(5), max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, ref.generate(ids_for(5), max_new_tokens=4, do_sample=False))
    gi.unpatch(model)
    assert torch.equal(_logits(model, ids_for(9)), _logits(ref, ids_for(9)))


def test_device_map_load_is_patched(tmp_path):
    ref = build("qwen3_next")
    ref.save_pretrained(tmp_path)
    model = gi.from_pretrained(tmp_path, model_class=type(ref), device_map={"": "cpu"})
    assert all(isinstance(m, GDNMixin) for m in gi.gdn_layers(model).values())
    assert torch.equal(_logits(model, ids_for(9)), _logits(ref, ids_for(9)))


@pytest.mark.compat
@pytest.mark.parametrize("name", present("qwen3_next", "qwen3_5", "olmo_hybrid"))
def test_packed_sequences_keep_the_native_behaviour(pair, name):
    """`cu_seq_lens_q` goes to the kernel as HF passes it (`cu_seqlens`; 4.57-5.9: not at all).
    The torch fallback cannot keep packed sequences apart: from 5.15 it raises, and the error
    must surface unchanged; 5.10-5.14's kernel swallows `cu_seqlens`, and the output must be
    HF's, bitwise."""
    patched, ref = pair(name)
    x = torch.randn(1, 10, patched.config.hidden_size)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    results = []
    for model in (patched, ref):
        try:
            with torch.no_grad():
                results.append(hf_gdn(model, 0)(x, cu_seq_lens_q=cu))
        except (ValueError, TypeError) as e:  # TypeError: a forward without **kwargs (4.57-5.9)
            results.append(f"{type(e).__name__}: {e}")
    if isinstance(results[1], str):
        assert results[0] == results[1] and ("packed sequences" in results[1] or "unexpected keyword" in results[1])
    else:
        assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("name", KDA)
def test_packed_sequences_kda_keep_the_native_behaviour(pair, name):
    """HF's KDA forwards pass kwargs on unchanged (no `cu_seqlens`): the torch fallback kernels
    take `cu_seq_lens_q` in **kwargs and ignore it, so packed sequences are NOT kept apart
    there (the second sequence sees the first one's state). The patched forward does the same,
    bitwise; with flash-linear-attention the kwargs reach fla as HF passes them."""
    patched, ref = pair(name)
    x = torch.randn(1, 10, patched.config.get_text_config().hidden_size)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with torch.no_grad():
        got, want = (hf_gdn(m, 0)(x, cu_seq_lens_q=cu) for m in (patched, ref))
        alone = hf_gdn(ref, 0)(x[:, 4:])
    assert torch.equal(got, want)
    assert not torch.allclose(want[:, 4:], alone, atol=1e-4)  # leaks across the boundary, as in HF


@pytest.mark.compat
@pytest.mark.parametrize("name", list(MODELS))
def test_gradient_checkpointing_and_train_mode_keep_parity(name):
    ref = build(name).train()
    model = gi.patch(copy.deepcopy(ref))
    grads = []
    for m in (model, ref):
        if hasattr(m, "activation_checkpointing_enable"):
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # before 5.20
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert any(getattr(layer, "gradient_checkpointing", False) for layer in m.modules())
        m(ids_for(20), use_cache=False).logits.float().pow(2).mean().backward()
        grads.append([p.grad for p in m.parameters()])
    for gp, gr in zip(*grads):
        assert (gp is None and gr is None) or torch.equal(gp, gr)


def _real_layer(name: str):
    """One GDN / KDA layer with the dimensions of the HF config class's defaults (Qwen3.5:
    hidden 4096, 16 key / 32 value heads of 128; Qwen3-Next: hidden 2048, same heads; Kimi
    Linear: hidden 2304, 32 heads of 128), as HF builds it inside its model."""
    import transformers as tr

    from gdn_intervene.families import FAMILIES

    cfg = {"qwen3_5": "Qwen3_5TextConfig", "qwen3_next": "Qwen3NextConfig", "kimi_linear": "KimiLinearConfig"}[name]
    config = getattr(tr, cfg)()
    module_path, cls_name = next(c for f in FAMILIES for c in f.classes if c[0].split(".")[-2] == name)
    cls = getattr(__import__(module_path, fromlist=[cls_name]), cls_name)
    layer_idx = config.layer_types.index("linear_attention") if hasattr(config, "layer_types") else 0
    torch.manual_seed(0)
    layer = cls(config, layer_idx=layer_idx)
    for p in layer.parameters():  # HF's init leaves some at 0 or 1: random weights of a plausible scale
        with torch.no_grad():
            p.normal_(0, 0.02) if p.dim() > 1 else p.uniform_(-0.5, 0.5)
    return layer, config.hidden_size


@pytest.mark.parametrize("name", present("qwen3_5", "kimi_linear") or present("qwen3_next"))
def test_real_size_layer_is_bitwise(name):
    """At real dimensions (T = 200: three 64-token chunks and a partial one), the patched layer's
    output, final state and gradients (input and every parameter) equal HF's bit for bit."""
    ref, D = _real_layer(name)
    patched = copy.deepcopy(ref)
    gi.patch(torch.nn.Sequential(patched))
    x = torch.randn(1, 200, D, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for layer in (patched, ref):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.pow(2).mean().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    assert isinstance(patched, GDNMixin) and not isinstance(ref, GDNMixin)
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
