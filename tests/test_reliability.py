"""What researchers do besides the happy path: copies and pickles, skipped sites, re-patching,
nnsight models passed to the core, bad replacement values, hub kernels, torch.compile.
Each check compares against an independent reference or asserts the exact error."""

from __future__ import annotations

import copy
import io
import pickle
import types

import pytest
import torch
from conftest import cache_kw, ids_for, logits, new_cache, no_hooks, view
from models import ANY_GDN, MODELS, build

import gdn_intervene as gi
from gdn_intervene import SiteValueError
from gdn_intervene.layer import GDNMixin, HubKernelWarning

NAMES = list(MODELS)
L = 2


def halve(module, args, out):  # a picklable hook
    return out * 0.5


def _decode(model, ids, steps=3):
    """Prefill with a cache, then `steps` greedy decode steps: every step's logits."""
    cache = new_cache(model)
    out, x = [], ids
    for _ in range(steps + 1):
        y = logits(model, x, cache=cache, use_cache=True)
        out.append(y)
        x = y[:, -1:].argmax(-1)
    return out


# ---------------------------------------------------------------- copies and serialisation


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("name", NAMES)
def test_copies_are_patched_models_equal_to_the_original(pair, name, how):
    patched, ref = pair(name)
    handle = gi.site_module(patched, L, "beta").register_forward_hook(halve)
    try:
        if how == "deepcopy":
            twin = copy.deepcopy(patched)
        elif how == "pickle":
            twin = pickle.loads(pickle.dumps(patched))
        else:
            buf = io.BytesIO()
            torch.save(patched, buf)
            buf.seek(0)
            twin = torch.load(buf, weights_only=False)
    finally:
        handle.remove()
    ids = ids_for(9)
    assert all(isinstance(m, GDNMixin) for m in gi.gdn_layers(twin).values())
    assert type(gi.gdn_layers(twin)[L]) is type(gi.gdn_layers(patched)[L])
    # hooks are copied with the module (PyTorch semantics): the copy halves beta too
    with gi.intervene(patched, {(L, "beta"): lambda b: b * 0.5}):
        assert torch.equal(logits(twin, ids), logits(patched, ids))
    for h in list(gi.site_module(twin, L, "beta")._forward_hooks):
        gi.site_module(twin, L, "beta")._forward_hooks.pop(h)
    assert torch.equal(logits(twin, ids), logits(ref, ids))
    with gi.capture(twin, sites=["beta"]) as cache:
        logits(twin, ids)
    assert all(len(cache[layer, "beta"]) == 1 for layer in cache.layers)
    assert [torch.equal(a, b) for a, b in zip(_decode(twin, ids), _decode(ref, ids))] == [True] * 4


# ---------------------------------------------------------------- skipping the conv


@pytest.mark.parametrize("name", NAMES)
def test_a_skipped_conv_still_writes_its_cache(pair, name):
    """A caller that bypasses the conv's forward (nnsight `.skip(value)` does; here an instance
    forward returning the value) still gets the conv cache written, so decode steps match."""
    patched, ref = pair(name)
    ids = ids_for(9)
    conv = gi.site_module(patched, L, "conv")
    with gi.capture(patched, sites=["conv"], layers=[L]) as seen:
        want = _decode(patched, ids)
    values = iter(seen[L, "conv"])
    conv.forward = lambda qkv, *a, **k: next(values)
    try:
        got = _decode(patched, ids)
    finally:
        del conv.forward
    assert [torch.equal(a, b) for a, b in zip(got, want)] == [True] * 4
    assert [torch.equal(a, b) for a, b in zip(want, _decode(ref, ids))] == [True] * 4


def _nnsight_over_a_copy(pair):
    """(gdn_intervene.nnsight, nnsight model, its patched qwen3_5, the unpatched reference). The
    patched model is a copy: nnsight installs its controllers for good, not on the shared pair."""
    pytest.importorskip("nnsight")
    from test_nnsight import tokenizer

    from gdn_intervene import nnsight as gnn

    patched, ref = pair(ANY_GDN)
    patched = copy.deepcopy(patched)
    return gnn, gnn.load(patched, tokenizer=tokenizer()), patched, ref


def test_nnsight_skip_of_the_conv_keeps_the_cache(pair):
    gnn, lm, patched, ref = _nnsight_over_a_copy(pair)
    ids = ids_for(9)
    mask = torch.ones_like(ids)
    with gi.capture(patched, sites=["conv"], layers=[L]) as seen:
        patched(input_ids=ids, attention_mask=mask, cache=new_cache(patched), use_cache=True)
    cache = new_cache(patched)
    with lm.trace(ids, attention_mask=mask, **{cache_kw(patched): cache}, use_cache=True):
        gnn.site(lm, L, "conv").skip(seen[L, "conv"][0])
        first = lm.output.logits.save()
    ref_cache = new_cache(ref)
    assert torch.equal(first, logits(ref, ids, mask, cache=ref_cache, use_cache=True))
    assert torch.equal(view(cache).get_conv_state(L), view(ref_cache).get_conv_state(L))
    x = first[:, -1:].argmax(-1)
    for _ in range(3):
        mask = torch.cat([mask, torch.ones_like(x)], 1)
        a = logits(patched, x, mask, cache=cache, use_cache=True)
        b = logits(ref, x, mask, cache=ref_cache, use_cache=True)
        assert torch.equal(a, b)
        x = a[:, -1:].argmax(-1)


# ---------------------------------------------------------------- settings survive re-patching


def test_repatching_keeps_settings_the_caller_did_not_pass():
    model = gi.patch(build(ANY_GDN), native_cached=True)
    gi.patch(model)
    assert all(m.native_cached for m in gi.gdn_layers(model).values())
    with gi.patched(model):
        assert all(m.native_cached for m in gi.gdn_layers(model).values())
    gi.patch(model, native_cached=False)
    assert not any(m.native_cached for m in gi.gdn_layers(model).values())


# ---------------------------------------------------------------- nnsight models in the core


def test_the_core_accepts_the_librarys_nnsight_model(pair):
    from gdn_intervene import analysis

    _, lm, patched, ref = _nnsight_over_a_copy(pair)
    ids = ids_for(9)
    assert gi.gdn_layers(lm) == gi.gdn_layers(patched)
    gi.patch(lm)  # idempotent, no error
    with gi.intervene(lm, {(L, "beta"): lambda b: b * 0}):
        zeroed = logits(patched, ids)

    def before(kw):
        kw["beta"] = kw["beta"] * 0

    from reference import kernel_edit

    with kernel_edit(ref, L, before=before):
        assert torch.equal(zeroed, logits(ref, ids))
    with gi.capture(lm, sites=["decay"]) as cache:
        logits(patched, ids)
    assert len(cache[L, "decay"]) == 1
    a = analysis.effective_attention_for(lm, ids)
    b = analysis.effective_attention_for(patched, ids)
    assert all(torch.equal(a[layer].matrix, b[layer].matrix) for layer in a)


# ---------------------------------------------------------------- bad values: loud, never broadcast


@pytest.mark.parametrize("name", NAMES)
def test_hf_owned_sites_and_the_conv_are_validated(pair, name):
    patched, _ = pair(name)
    ids = ids_for(6, B=2)
    D = patched.config.get_text_config().hidden_size
    cases = {
        "out_proj": [lambda o: o[:1], lambda o: o[:, :1], lambda o: o.double()],
        "norm": [lambda o: o[..., :1], lambda o: o.reshape(-1, o.shape[-1])],
        "conv": [lambda o: o.to("meta"), lambda o: o[:, :, :-1]],
        "beta": [lambda o: o[:1]],
    }
    for sname, bads in cases.items():
        for bad in bads:
            with pytest.raises(
                SiteValueError, match=rf"site (linear_attn|self_attn)\.{sname} of layer {L}: expected a tensor"
            ):
                with gi.intervene(patched, {(L, sname): bad}):
                    logits(patched, ids)
    assert D and no_hooks(patched)


@pytest.mark.parametrize(
    "sname, value, shown",
    [
        ("decay", float("-inf"), "-inf"),
        ("beta", float("nan"), "nan"),
        ("v", float("inf"), "inf"),
        ("state", float("nan"), "nan"),
    ],
)
@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "replaced"])
def test_non_finite_values_are_refused_with_the_position(pair, sname, value, shown, in_place):
    patched, _ = pair(ANY_GDN)
    ids = ids_for(6, B=2)

    def edit(x):
        y = x if in_place else x.clone()
        y[1, 3] = value  # the state: row 1, head 3
        return None if in_place else y

    at = "position 3" if sname != "state" else "head 3"
    with pytest.raises(
        SiteValueError,
        match=rf"linear_attn\.{sname} of layer {L}: the new value is not finite \({shown} at batch row 1, {at}\).*state_at",
    ):
        with gi.intervene(patched, {(L, sname): edit}):
            logits(patched, ids)
    assert no_hooks(patched)


# ---------------------------------------------------------------- hub kernels


def test_a_replaced_forward_is_never_silent(pair):
    """kernels' `kernelize` binds a hub layer's forward to the instance
    (`module.forward = MethodType(layer.forward, module)`); the sites would never fire. A patched
    layer keeps its forward and warns; `patch` restores HF's forward over one and warns
    (tests/test_kernel_routing.py covers the device_map case and the numbers)."""
    patched, _ = pair(ANY_GDN)
    m = gi.gdn_layers(patched)[L]

    def hub_forward(self, hidden_states, **kwargs):
        return hidden_states

    with pytest.warns(HubKernelWarning, match=r"hub_forward.*bypass every site.*kept the decomposed forward"):
        m.forward = types.MethodType(hub_forward, m)
    assert "forward" not in m.__dict__
    m.forward = types.MethodType(type(m).forward, m)  # kernelize's own restore path is fine
    del m.forward

    plain = build(ANY_GDN)
    layer = next(x for x in plain.modules() if type(x).__name__.endswith("GatedDeltaNet"))
    layer.forward = types.MethodType(hub_forward, layer)
    with pytest.warns(HubKernelWarning, match=r"hub_forward.*patch restored HF's layer forward"):
        gi.patch(plain)
    assert isinstance(layer, GDNMixin) and "forward" not in layer.__dict__


# ---------------------------------------------------------------- torch.compile


def test_compiled_patched_equals_compiled_unpatched(pair):
    patched, ref = pair(ANY_GDN)
    ids = ids_for(9)
    torch._dynamo.reset()
    a = torch.compile(patched, backend="aot_eager")
    b = torch.compile(ref, backend="aot_eager")
    assert torch.equal(logits(a, ids), logits(b, ids))
    assert torch.equal(logits(a, ids), logits(ref, ids))
    torch._dynamo.reset()
