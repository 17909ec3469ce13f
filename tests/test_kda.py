"""Kimi Delta Attention families: what the shared suite cannot reach.

The suite (test_core, test_nnsight, test_pyvene, test_big_models) runs over `kimi_linear`,
`glm5_next` (multimodal) and `bailing_hybrid`. Here: GLM-5-Next's bare text model
(`Glm5NextTextModel`, no LM head, so hidden states are compared), Bailing's unbounded decay
(`kda_safe_gate=False`: torch's softplus), the per-channel decay's shape and range, and the
registry's per-mixer shapes. Every comparison is `torch.equal` against the unpatched model.
"""

import copy

import pytest
import torch
from conftest import ids_for, left_pad_mask, new_cache, rel_error, view
from models import KDA, bailing_hybrid, build, present
from reference import hf_gdn, kernel_edit

import gdn_intervene as gi
from gdn_intervene.families import family_of
from gdn_intervene.layer import GDNMixin
from gdn_intervene.sites import SITES, Mixer, site

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hidden(model, ids, mask=None, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state


@pytest.fixture(scope="module")
def text_pair():
    ref = build("glm5_next_text")
    return gi.patch(copy.deepcopy(ref)), ref


@pytest.mark.parametrize("T", [1, 3, 63, 64, 65, 130])
@pytest.mark.parametrize("dtype", DTYPES)
def test_glm5_next_text_prefill_bitwise(T, dtype):
    ref = build("glm5_next_text", dtype=DTYPES[dtype])
    patched = gi.patch(copy.deepcopy(ref))
    ids, mask = ids_for(T), left_pad_mask(3, T)
    assert torch.equal(hidden(patched, ids), hidden(ref, ids))
    assert torch.equal(hidden(patched, ids, mask), hidden(ref, ids, mask))


def test_glm5_next_text_cached_decode_and_sites(text_pair):
    """Padded prefill, 5 decode steps: hidden states and both cache states equal after every
    call; every site fires once per call; then a 4-token cached continuation."""
    patched, ref = text_pair
    layers = list(gi.gdn_layers(patched))
    counts = {}
    handles = [
        gi.site_module(patched, i, s.name).register_forward_hook(
            lambda *a, key=(i, s.name): counts.__setitem__(key, counts.get(key, 0) + 1)
        )
        for i in layers
        for s in SITES
    ]
    try:
        caches = {k: new_cache(m) for k, m in (("p", patched), ("r", ref))}
        x, mask = ids_for(64), left_pad_mask(3, 64)
        for step in range(6):
            out = {k: hidden(m, x, mask, cache=caches[k], use_cache=True) for k, m in (("p", patched), ("r", ref))}
            assert torch.equal(out["p"], out["r"]), step
            for i in layers:
                assert torch.equal(view(caches["p"]).get_conv_state(i), view(caches["r"]).get_conv_state(i)), (step, i)
                assert torch.equal(
                    view(caches["p"]).get_recurrent_state(i), view(caches["r"]).get_recurrent_state(i)
                ), (step, i)
            assert set(counts.values()) == {step + 1} and len(counts) == len(layers) * len(SITES)
            x = ids_for(1, seed=step + 10)
            mask = torch.cat([mask, torch.ones_like(x)], 1)
        x = ids_for(4, seed=99)
        mask = torch.cat([mask, torch.ones_like(x)], 1)
        out = {k: hidden(m, x, mask, cache=caches[k], use_cache=True) for k, m in (("p", patched), ("r", ref))}
        assert torch.equal(out["p"], out["r"])
    finally:
        for h in handles:
            h.remove()


def test_glm5_next_text_gradients_and_roundtrip(text_pair, tmp_path):
    patched, ref = text_pair
    grads = []
    for m in (patched, ref):
        m.zero_grad(set_to_none=True)
        m(input_ids=ids_for(70)).last_hidden_state.pow(2).mean().backward()
        grads.append([p.grad for p in m.parameters()])
        m.zero_grad(set_to_none=True)
    for gp, gr in zip(*grads):
        assert (gp is None and gr is None) or torch.equal(gp, gr)
    ref.save_pretrained(tmp_path)
    loaded = gi.from_pretrained(tmp_path, model_class=type(ref)).eval()
    assert all(isinstance(m, GDNMixin) for m in gi.gdn_layers(loaded).values())
    assert torch.equal(hidden(loaded, ids_for(12)), hidden(ref, ids_for(12)))


def test_bailing_unbounded_decay_bitwise():
    """kda_safe_gate=False: g = -exp(A_log) * softplus(a + dt_bias) with torch's softplus."""
    torch.manual_seed(0)
    ref = bailing_hybrid(safe_gate=False).eval()
    patched = gi.patch(copy.deepcopy(ref))
    assert not hf_gdn(ref, 0).forget_gate.safe_gate
    ids = ids_for(65)
    with torch.no_grad():
        assert torch.equal(patched(ids).logits, ref(ids).logits)
    assert torch.equal(
        patched.generate(ids[:, :9], max_new_tokens=5, do_sample=False),
        ref.generate(ids[:, :9], max_new_tokens=5, do_sample=False),
    )


@pytest.mark.parametrize("name", KDA)
def test_decay_is_per_channel_nonpositive_and_bounded(pair, name):
    patched, ref = pair(name)
    layer = min(gi.gdn_layers(patched))
    fg = hf_gdn(patched, layer).forget_gate
    H, K = fg.num_heads, fg.head_dim
    seen = {}
    edits = {(layer, s): (lambda v, s=s: seen.__setitem__(s, v)) for s in ("decay_logit", "decay", "beta", "gate")}
    with gi.intervene(patched, edits), torch.no_grad():
        patched(input_ids=ids_for(20))
    g = seen["decay"]
    assert g.shape == (3, 20, H, K) and seen["decay_logit"].shape == (3, 20, H, K)
    assert seen["beta"].shape == (3, 20, H) and seen["gate"].shape == (3, 20, H, K)
    assert (g <= 0).all()
    bound = getattr(fg, "safe_gate_lower_bound", None) or (fg.lower_bound if getattr(fg, "safe_gate", False) else None)
    if bound is not None:  # GLM-5-Next, Bailing: lower_bound * sigmoid(...) lies in [lower_bound, 0]
        assert (g >= bound).all()
    assert g.std(dim=-1).min() > 0  # channels of one head decay differently
    with kernel_edit(ref, layer, before=lambda kw: seen.__setitem__("g", kw["g"])), torch.no_grad():
        ref(input_ids=ids_for(20))
    assert torch.equal(g, seen["g"])  # the kernel's own argument


def test_registry_shapes_per_mixer():
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearDeltaAttention

    kda = family_of(KimiLinearDeltaAttention)
    assert kda.mixer is Mixer.KDA and site("decay").shape_for(kda.mixer) == ("B", "T", "HV", "K")
    assert site("decay").shape_for(Mixer.GDN) == ("B", "T", "HV")
    assert site("beta").shape_for(Mixer.KDA) == site("beta").shape == ("B", "T", "HV")
    assert kda.letters(build("kimi_linear").config) == dict(HK=2, HV=2, K=8, V=8, D=32, C=48)


@pytest.mark.parametrize("name", KDA)
def test_decode_while_the_cache_records_past_states(pair, name):
    """With `activate_past_recording()` (assisted decoding records past conv states to crop them
    later), HF's GDN forwards run the full conv on a decode step, its KDA forwards still the
    update kernel (they do not ask `is_recording_past`). The patched forward follows each."""
    patched, ref = pair(name)
    layers = list(gi.gdn_layers(patched))
    caches = {k: new_cache(m) for k, m in (("p", patched), ("r", ref))}
    models_ = {"p": patched, "r": ref}
    x = ids_for(9)
    with torch.no_grad():
        for k, m in models_.items():
            m(input_ids=x, cache=caches[k], use_cache=True)
        for c in caches.values():
            for i in layers:
                c.layers[i].activate_past_recording()
        for step in range(3):
            x = ids_for(1, seed=step + 20)
            out = {k: m(input_ids=x, cache=caches[k], use_cache=True).logits for k, m in models_.items()}
            assert torch.equal(out["p"], out["r"]), step
            for i in layers:
                assert torch.equal(view(caches["p"]).get_conv_state(i), view(caches["r"]).get_conv_state(i))
                assert torch.equal(view(caches["p"]).get_recurrent_state(i), view(caches["r"]).get_recurrent_state(i))


@pytest.mark.parametrize("name", present("glm5_next", "bailing_hybrid"))
def test_bf16_checkpoint_keeps_fp32_conv_and_gates(pair, name, tmp_path):
    """GLM-5-Next and Bailing keep conv1d, dt_bias and A_log in fp32 when loaded in bf16
    (`_keep_in_fp32_modules_strict`): the conv casts its input to fp32 and back, Bailing's decay
    mixes fp32 A_log with the bf16 input and casts g to bf16. Patched equals HF, bitwise."""
    _, ref = pair(name)
    ref.save_pretrained(tmp_path)
    plain = type(ref).from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    patched = gi.from_pretrained(tmp_path, model_class=type(ref), dtype=torch.bfloat16).eval()
    layer = hf_gdn(patched, 0)
    assert layer.q_proj.weight.dtype == torch.bfloat16 and layer.conv1d.weight.dtype == torch.float32
    assert layer.forget_gate.dt_bias.dtype == torch.float32
    ids = ids_for(33)
    with torch.no_grad():
        assert torch.equal(patched(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert torch.equal(
        patched.generate(ids[:, :9], max_new_tokens=4, do_sample=False),
        plain.generate(ids[:, :9], max_new_tokens=4, do_sample=False),
    )


@pytest.mark.parametrize("name", present("kimi_linear", "glm5_next"))
def test_state_decomposition_with_per_channel_decay(pair, name):
    """S_T = exp(G_T) S_0 + sum_j exp(G_T - G_j) k_j u_j^T with exp(...) per key channel: the
    per-token terms sum to HF's kernel state, and u is `ops.written_values` of the kernel's own
    arguments; `token_contributions` are the per-token terms' Frobenius norms."""
    from gdn_intervene import analysis as an
    from gdn_intervene import ops

    patched, ref = pair(name)
    ids, mask = ids_for(130), left_pad_mask(3, 130)
    for layer in gi.gdn_layers(patched):
        call = {}
        with (
            kernel_edit(ref, layer, before=call.update, after=lambda out: call.update(S=out[1]) or out),
            torch.no_grad(),
        ):
            ref(input_ids=ids, attention_mask=mask)
        dec = an.state_decomposition_for(patched, ids, layer, attention_mask=mask)
        assert rel_error(dec.state(), call["S"]) <= 1e-5
        parts = dec.per_token()  # [B, T, HV, K, V]
        assert rel_error(parts.sum(1), call["S"]) <= 1e-5
        torch.testing.assert_close(an.token_contributions(dec), parts.flatten(-2).norm(dim=-1), rtol=1e-5, atol=1e-7)
        u = an.written_values_for(patched, ids, layer, attention_mask=mask)
        assert torch.equal(u, ops.written_values(call["k"], call["v"], beta=call["beta"], g=call["g"]))
