"""Guards of gdn_intervene.analysis (issue 22): direct logit attribution through hyper-connections,
a caller's cache left as it was, nnsight models, models without an LM head.

The direct-effect reference never uses the library: it runs the UNPATCHED model twice with plain
forward hooks on HF's modules. Clean run: record the output of every child of every decoder layer
(mixers, MLPs, norms, hyper-connection modules) and the final norm's input x. Ablated run: every
such child returns its clean output, except GDN layer l's mixer, whose output is zeroed at position
t. Only the residual path from that output to the final norm differs, with every other layer's
contribution and every stream weight held at its clean value; the direct effect is
(W_U[a] - W_U[b]) . gain ⊙ (x_clean - x_ablated)_t / rms(x_clean_t), the final norm's scale frozen.
"""

import copy
import functools

import pytest
import torch
from conftest import ids_for, left_pad_mask, new_cache, no_hooks, rel_error, run
from models import ANY_GDN, MODELS, build, present
from reference import LAYER_SUFFIXES
from torch import nn

import gdn_intervene as gi
from gdn_intervene import analysis as an

T = 19
POSITIONS = [T - 1, 10]


# ---------------------------------------------------------------- 1. direct effect through the residual path


def decoder_of(model: nn.Module) -> nn.Module:
    """The module whose `layers` hold the GDN mixers (the text decoder)."""
    return next(
        m
        for m in model.modules()
        if isinstance(getattr(m, "layers", None), nn.ModuleList)
        and any(type(s).__name__.endswith(LAYER_SUFFIXES) for s in m.layers.modules())
    )


def true_direct_effect(ref, ids, mask, layer: int, t: int, a: int, b: int) -> torch.Tensor:
    """[B] direct effect of GDN layer `layer`'s output at position t on logit(a) - logit(b), by
    ablation with everything else frozen at its clean value (module docstring)."""
    dec = decoder_of(ref)
    mixer = next(m for m in dec.layers[layer].children() if type(m).__name__.endswith(LAYER_SUFFIXES))
    parts = [c for dl in dec.layers for c in dl.children()]
    clean, xs = {}, []

    def record(mod, args, out):
        clean[mod] = out

    def frozen(mod, args, out):
        if mod is mixer:
            y = clean[mod].clone()
            y[:, t] = 0
            return y
        return clean[mod]

    for hook in (record, frozen):
        handles = [c.register_forward_hook(hook) for c in parts]
        handles.append(dec.norm.register_forward_hook(lambda m, args, out: xs.append(args[0].double())))
        try:
            with torch.no_grad():
                ref(input_ids=ids, attention_mask=mask)
        finally:
            for h in handles:
                h.remove()
    x_clean, x_ablated = (x[:, t] for x in xs)  # [B, D]
    norm = dec.norm
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    xr = torch.randn(4, x_clean.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 3.0
    with torch.no_grad():
        gain = (norm(xr.float()).double() / (xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + eps))).mean(0)
    W = ref.get_output_embeddings().weight.double()
    scale = torch.rsqrt(x_clean.pow(2).mean(-1, keepdim=True) + eps)
    return (gain * (x_clean - x_ablated) * scale) @ (W[a] - W[b])


@functools.cache
def _glm_biased():
    """GLM-5-Next with the hyper-connections' stream-weight (post) biases set to [2, -1] (issue 22):
    its layers' outputs reach the final norm ~13% scaled. (patched, unpatched)."""
    ref = build("glm5_next")
    with torch.no_grad():
        for m in ref.modules():
            if hasattr(m, "hc_mult"):
                m.base[m.hc_mult : 2 * m.hc_mult] = torch.tensor([2.0, -1.0])
    return gi.patch(copy.deepcopy(ref)), ref


def _models(pair, name):
    return _glm_biased() if name == "glm5_next_biased" else pair(name)


READ_OUT = [n for n in MODELS if n != "qwen4_exp"] + (["glm5_next_biased"] if "glm5_next" in MODELS else [])


@pytest.mark.parametrize("name", READ_OUT)
def test_token_pair_attribution_is_the_true_direct_effect(pair, name):
    """The parts of a token-pair attribution sum to the ablation reference, per layer and position,
    to <= 1e-5 relative: for a plain residual add (path_scale 1) and through GLM-5-Next's
    hyper-connections (path_scale the frozen stream weights), default and biased."""
    patched, ref = _models(pair, name)
    ids, mask = ids_for(T), left_pad_mask(3, T)
    att = an.attribution_for(patched, ids, positions=POSITIONS, direction=(5, 7), attention_mask=mask)
    assert no_hooks(patched) and no_hooks(ref)
    want = torch.stack(
        [torch.stack([true_direct_effect(ref, ids, mask, l, t, 5, 7) for t in POSITIONS], 1) for l in att.layers], 1
    )  # [B, L, R]
    err = rel_error(att.total(), want)
    print(f"{name}: relative error vs the ablation reference {err:.2e}")
    assert err <= 1e-5
    assert rel_error(att.value, want) <= 1e-5
    hyper = name.startswith("glm5_next")
    assert (att.path_scale == 1).all() != hyper
    if name == "glm5_next_biased":  # the unscaled read-out (before the fix) is far off
        assert rel_error(att.total() / att.path_scale, want) > 0.05
    last = att.layers[-1]  # one layer alone: the same path (mHC calls of the other layers still counted)
    one = an.attribution_for(patched, ids, positions=POSITIONS, direction=(5, 7), attention_mask=mask, layers=[last])
    assert torch.equal(one.path_scale[:, 0], att.path_scale[:, -1]) and torch.equal(one.value[:, 0], att.value[:, -1])


def test_unknown_hyper_connections_are_refused(pair):
    if "qwen4_exp" not in MODELS:
        pytest.skip("this transformers release has no Qwen4-Exp")
    patched, _ = pair("qwen4_exp")
    ids = ids_for(9)
    with pytest.raises(ValueError) as e:
        an.attribution_for(patched, ids, direction=(5, 7))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(
        "direction=(token, token) needs each GDN layer's output to reach the final norm by a known linear path; "
    )
    assert (
        "Qwen4ExpTextModel keeps its residual as [3, 9, 64] hidden states, not [B, T, D] = [3, 9, 32] "
        "(hyper-connection streams)" in msg
    )
    assert msg.endswith("Pass a [D] direction instead.")
    assert no_hooks(patched)
    att = an.attribution_for(patched, ids, direction=torch.randn(32))  # a [D] direction projects y itself
    assert (att.path_scale == 1).all()


# ---------------------------------------------------------------- 2. the caller's cache is not advanced


def snapshot(cache) -> list:
    """Every attribute of every cache layer (tensors cloned) and the cache's length."""
    layers = getattr(cache, "layers", None) or [cache]
    fields = [
        {k: (v.clone() if torch.is_tensor(v) else copy.copy(v)) for k, v in vars(layer).items()} for layer in layers
    ]
    return [fields, int(cache.get_seq_length())]


def same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if hasattr(a, "_asdict"):
        return same(a._asdict(), b._asdict())
    if hasattr(a, "__dataclass_fields__"):
        return same(vars(a), vars(b))
    return a == b


CALLS = {
    "attribution_pair": lambda m, x, **kw: an.attribution_for(m, x, positions=[4, 0], direction=(5, 7), **kw),
    "attribution_vector": lambda m, x, **kw: an.attribution_for(m, x, direction=torch.ones(32), **kw),
    "effective_attention": lambda m, x, **kw: an.effective_attention_for(m, x, check=True, **kw),
    "states_at": lambda m, x, **kw: an.states_at(m, x, [1, 3], **kw),
    "capture": lambda m, x, **kw: an.capture(m, x, **kw),
    "written_values": lambda m, x, **kw: an.written_values_for(m, x, 0, **kw),
    "state_decomposition": lambda m, x, **kw: an.state_decomposition_for(m, x, 2, **kw).state(),
}


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad-prefill", "grad-prefill"])
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("name", present("qwen3_5", "glm5_next") or [ANY_GDN])
def test_a_callers_cache_is_left_as_it_was(pair, name, call, grad):
    """A 6-token cache stays a 6-token cache (bitwise, every field) after a 5-token analysis call,
    and the same call twice gives the same numbers. grad: the prefill ran with autograd on, so
    the cache's tensors carry history (`copy.deepcopy` alone refuses those)."""
    patched, _ = pair(name)
    if not next(iter(gi.gdn_layers(patched).values()))._gdn_convention.continues:
        pytest.skip("this transformers release restarts a multi-token cached call from zero states")
    cache = new_cache(patched)
    with torch.set_grad_enabled(grad):
        run(patched, input_ids=ids_for(6), cache=cache, use_cache=True)
    before = snapshot(cache)
    assert before[1] == 6
    cont = ids_for(5, seed=3)
    first = CALLS[call](patched, cont, cache=cache, use_cache=True)
    assert same(snapshot(cache), before), "the analysis call changed the caller's cache"
    second = CALLS[call](patched, cont, cache=cache, use_cache=True)
    assert same(first, second)
    assert snapshot(cache)[1] == 6
    assert no_hooks(patched)


# ---------------------------------------------------------------- 3. nnsight models


@pytest.mark.parametrize("name", present("qwen3_5", "glm5_next") or [ANY_GDN])
def test_attribution_of_an_nnsight_model_equals_the_plain_models(pair, name):
    pytest.importorskip("nnsight")
    from test_nnsight import tokenizer

    from gdn_intervene import nnsight as gnn

    patched, ref = pair(name)
    lm = gnn.load(gi.patch(copy.deepcopy(ref)), tokenizer=tokenizer())
    ids, mask = ids_for(T), left_pad_mask(3, T)
    for direction in ((5, 7), torch.randn(32, generator=torch.Generator().manual_seed(1))):
        want = an.attribution_for(patched, ids, positions=POSITIONS, direction=direction, attention_mask=mask)
        got = an.attribution_for(lm, ids, positions=POSITIONS, direction=direction, attention_mask=mask)
        assert same(got, want)
    assert no_hooks(lm._module)


# ---------------------------------------------------------------- 4. no LM head


def _headless():
    out = []
    if "qwen3_5" in MODELS:
        out.append(pytest.param(lambda: build("qwen3_5").model, "Qwen3_5TextModel", id="qwen3_5-text"))
    if present("glm5_next_text"):
        out.append(pytest.param(lambda: build("glm5_next_text"), "Glm5NextTextModel", id="glm5_next_text"))
    return out or [pytest.param(None, None, marks=pytest.mark.skip(reason="no headless model in this release"))]


@pytest.mark.parametrize("make,cls", _headless())
def test_a_token_pair_needs_an_lm_head(make, cls):
    model = gi.patch(make())
    ids = ids_for(9)
    with pytest.raises(ValueError) as e:
        an.attribution_for(model, ids, direction=(5, 7))
    assert str(e.value) == (
        f"direction=(token, token) needs an LM head to read the answer tokens from, and {cls} has none "
        "(a bare decoder, e.g. from AutoModel); pass a [D] direction vector (D=32) instead"
    )
    d = torch.randn(32, generator=torch.Generator().manual_seed(2))
    ys = {}
    hooks = [
        gi.site_module(model, l, "out_proj").register_forward_hook(lambda m, a, o, l=l: ys.__setitem__(l, o))
        for l in gi.gdn_layers(model)
    ]
    try:
        att = an.attribution_for(model, ids, positions=[8, 2], direction=d)
    finally:
        for h in hooks:
            h.remove()
    want = torch.stack([ys[l][:, [8, 2]].double() @ d.double() for l in att.layers], 1)
    assert rel_error(att.total(), want) <= 1e-5 and rel_error(att.value, want) <= 1e-6
    assert no_hooks(model)
