"""The cache protocol of transformers 5.25 on, bitwise: the per-layer token count, kept
intermediate states (`activate_past_recording(recurrent_states_to_keep=N)`), `crop`, and the
generation paths built on them (assisted generation, prompt lookup), with the sites firing in
every verify forward. Skipped where the release's cache has no rollback (before 5.25).
"""

import copy

import pytest
import torch
from conftest import ids_for, logits, new_cache, run
from models import MODELS, build
from reference import cache_tensors

import gdn_intervene as gi

NAMES = list(MODELS)


def _rollback() -> bool:
    from transformers import DynamicCache

    return hasattr(DynamicCache, "get_recurrent_states_to_keep")


pytestmark = [
    pytest.mark.compat,
    pytest.mark.skipif(not _rollback(), reason="this release's cache keeps no intermediate states (5.25 on)"),
]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", NAMES)
def test_count_and_every_cache_field_through_decode(pair, name):
    """Prefill, then decode steps: logits, states, conv states and the layer's token count
    (`get_seq_length`, from which Qwen3.5 builds position ids) equal after every call."""
    patched, ref = pair(name)
    caches = {k: new_cache(m) for k, m in (("p", patched), ("r", ref))}
    step = ids_for(9)
    for i in range(5):
        outs = {k: logits(m, step, cache=caches[k], use_cache=True) for k, m in (("p", patched), ("r", ref))}
        assert torch.equal(outs["p"], outs["r"]), f"logits differ at call {i}"
        assert _same(cache_tensors(caches["p"]), cache_tensors(caches["r"])), f"cache differs at call {i}"
        step = outs["p"][:, -1:].argmax(-1)
    assert int(caches["p"].layers[next(iter(gi.gdn_layers(patched)))].get_seq_length()) == 9 + 4


@pytest.mark.parametrize("keep", [1, 3, 5])
@pytest.mark.parametrize("name", NAMES)
def test_kept_states_and_crop(pair, name, keep):
    """A recording cache keeps N intermediate states of a 5-token call (N = 5: the chunk kernel
    runs on zero tokens); crop(-2) and crop(-1) roll back to them; the next call continues from
    there. Every field equal after every step; `state` fires once per kept state."""
    patched, ref = pair(name)
    layer = next(iter(gi.gdn_layers(patched)))
    caches = {k: new_cache(m) for k, m in (("p", patched), ("r", ref))}
    prefix, draft, after = ids_for(11), ids_for(5, seed=1), ids_for(1, seed=2)
    for k, m in (("p", patched), ("r", ref)):
        logits(m, prefix, cache=caches[k], use_cache=True)
        caches[k].activate_past_recording(recurrent_states_to_keep=keep)
    fired = []
    h = gi.site_module(patched, layer, "state").register_forward_hook(lambda m, a, o: fired.append(o.clone()))
    try:
        outs = {k: logits(m, draft, cache=caches[k], use_cache=True) for k, m in (("p", patched), ("r", ref))}
    finally:
        h.remove()
    assert torch.equal(outs["p"], outs["r"])
    assert _same(cache_tensors(caches["p"]), cache_tensors(caches["r"]))
    assert len(fired) == keep  # one firing per kept state, the last one the cached state
    assert torch.equal(fired[-1], caches["p"].layers[layer].recurrent_states[0].to(fired[-1].dtype))
    for n in (2, 1):
        if n > keep:
            continue
        cp, cr = copy.deepcopy(caches["p"]), copy.deepcopy(caches["r"])
        cp.crop(-n), cr.crop(-n)
        assert _same(cache_tensors(cp), cache_tensors(cr)), f"crop(-{n})"
        nxt = {
            k: logits(m, after, cache=c, use_cache=True) for (k, m), c in zip((("p", patched), ("r", ref)), (cp, cr))
        }
        assert torch.equal(nxt["p"], nxt["r"]), f"the call after crop(-{n})"


@pytest.mark.parametrize("name", NAMES)
def test_kept_states_gradients_bitwise(pair, name):
    """The split (tensor_split, a zero-length chunk call, N recurrent steps, cat) under
    autograd, on a recording cache from the first call (HF's cache overwrites a cached initial
    state in place, which HF's own backward refuses): every parameter's gradient equal."""
    patched, ref = pair(name)
    grads = {}
    for key, model in (("p", patched), ("r", ref)):
        for T, keep in ((7, 3), (4, 4)):  # a chunk part and three steps; a zero-length chunk call
            cache = new_cache(model)
            cache.activate_past_recording(recurrent_states_to_keep=keep)
            run(model, input_ids=ids_for(T), cache=cache, use_cache=True).logits.float().pow(2).mean().backward()
        grads[key] = [p.grad for p in model.parameters()]
        model.zero_grad(set_to_none=True)
    assert any(g is not None for g in grads["p"])
    for gp, gr in zip(grads["p"], grads["r"]):
        assert (gp is None and gr is None) or torch.equal(gp, gr)


@pytest.mark.parametrize("name", NAMES)
def test_an_edited_kept_state_carries_forward(pair, name):
    """Zeroing the first kept state (after position 3 of 6; N = 3) under autograd, in place:
    the later outputs and the kept states follow from the edited state. Reference: the same
    edit on a call without a cache, split there by `gi.state_at` (the chunk kernel from the
    edited state: another kernel, so to kernel tolerance); backward runs through the edit."""
    patched, _ = pair(name)
    layer = next(iter(gi.gdn_layers(patched)))
    ids = ids_for(6)

    def first_only(edit):
        seen = []

        def f(S):
            seen.append(1)
            if len(seen) == 1:
                S.zero_()

        return f

    cache = new_cache(patched)
    cache.activate_past_recording(recurrent_states_to_keep=3)
    with gi.intervene(patched, {(layer, "state"): first_only(None)}):
        kept = run(patched, input_ids=ids, cache=cache, use_cache=True).logits
    kept.float().pow(2).mean().backward()  # the in-place edit keeps autograd consistent
    patched.zero_grad(set_to_none=True)
    with (
        torch.no_grad(),
        gi.state_at(patched, [3], [layer]),
        gi.intervene(patched, {(layer, "state"): first_only(None)}),
    ):
        split = logits(patched, ids)
    unedited_cache = new_cache(patched)
    unedited_cache.activate_past_recording(recurrent_states_to_keep=3)
    with torch.no_grad():
        plain = logits(patched, ids, cache=unedited_cache, use_cache=True)
    kept = kept.detach()
    assert torch.equal(kept[:, :4], plain[:, :4])  # positions up to the edit are untouched
    assert not torch.allclose(kept[:, 4:], plain[:, 4:], atol=1e-3)
    torch.testing.assert_close(kept, split, rtol=1e-5, atol=1e-5)
    history = cache.layers[layer].recurrent_states_history[0]  # [state before the call, kept 1, kept 2]
    assert len(history) == 3 and not history[1].any()  # the zeroed state is kept as such


def _count_calls(patched):
    """Per GDN call of the first layer: (T, kept N, state firings); HF's rule for N read off the
    call's cache (independent of the layer's code)."""
    layer_idx = next(iter(gi.gdn_layers(patched)))
    mod = gi.gdn_layers(patched)[layer_idx]
    calls = []

    def pre(m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("cache", kwargs.get("cache_params"))
        T = x.shape[1]
        decode = cache is not None and cache.get_recurrent_state(layer_idx) is not None and T == 1
        N = 0 if cache is None or decode else min(cache.get_recurrent_states_to_keep(layer_idx), T)
        calls.append([T, N, 0])

    def fire(*_):
        calls[-1][2] += 1

    handles = [mod.register_forward_pre_hook(pre, with_kwargs=True), mod.state.register_forward_hook(fire)]
    return calls, handles


@pytest.mark.parametrize("name", NAMES)
def test_assisted_generation_and_prompt_lookup(name):
    """Patched target and assistant equal unpatched, token for token; the target's sites fire
    in every verify forward, once per kept state."""
    target, assistant = build(name), build(name, seed=1)
    ref_t, ref_a = copy.deepcopy(target), copy.deepcopy(assistant)
    gi.patch(target), gi.patch(assistant)
    ids = ids_for(10, B=1)
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    calls, handles = _count_calls(target)
    try:
        mine = target.generate(ids, assistant_model=assistant, **kw)
        looked = target.generate(torch.cat([ids, ids], 1), prompt_lookup_num_tokens=3, **kw)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(mine, ref_t.generate(ids, assistant_model=ref_a, **kw))
    assert torch.equal(looked, ref_t.generate(torch.cat([ids, ids], 1), prompt_lookup_num_tokens=3, **kw))
    verify = [c for c in calls if c[1] > 0]
    assert verify, "no verify forward kept states"
    assert all(fired == max(N, 1) for _, N, fired in calls), calls


def _recording(patched, ref, prefix, keep):
    """(patched cache, unpatched cache): both after `prefix`, the patched one then recording
    (keeping `keep` states per call, as after assisted generation or prompt lookup), the
    unpatched one as it was."""
    caches = [new_cache(m) for m in (patched, ref)]
    for model, cache in zip((patched, ref), caches):
        logits(model, prefix, cache=cache, use_cache=True)
    caches[0].activate_past_recording(recurrent_states_to_keep=keep)
    return caches


def _ref_state_after(ref, cache, ids, p, layer):
    """HF's unpatched model: the recurrent state after token p of `ids`, continued from a copy
    of `cache` (the chunk kernel on p + 1 tokens)."""
    c = copy.deepcopy(cache)
    logits(ref, ids[:, : p + 1], cache=c, use_cache=True)
    return c.get_recurrent_state(layer) if hasattr(c, "get_recurrent_state") else None


@pytest.mark.parametrize("name", NAMES)
def test_the_state_after_p_whatever_mode_the_cache_is_in(pair, name):
    """A recording cache keeps the last N states of each call (N = 3 of T = 6 here). The state
    after p, for p before and inside those N, from `analysis.states_at` and from a `gi.state_at`
    capture, equals HF's unpatched state after p (the defect: the state after T - N came back
    for every p >= T - N). Kernels differ (chunk vs recurrent steps): 1e-5."""
    from gdn_intervene import analysis as an

    patched, ref = pair(name)
    layer = next(iter(gi.gdn_layers(patched)))
    prefix, ids = ids_for(5), ids_for(6, seed=1)
    mine, theirs = _recording(patched, ref, prefix, keep=3)
    positions = [1, 3, 4]  # 3, 4 lie inside the kept states (T - N = 3)
    got = an.states_at(patched, ids, positions, cache=mine)[layer]  # the cache is copied, not advanced
    with gi.capture(patched, sites=["state"], layers=[layer]) as cache, gi.state_at(patched, positions, [layer]):
        logits(patched, ids, cache=copy.deepcopy(mine), use_cache=True)
    assert [f.position for f in cache.firings(layer)] == [1, 3, 4, 5]  # the listed ones, then the final state
    for i, p in enumerate(positions):
        want = _ref_state_after(ref, theirs, ids, p, layer)
        torch.testing.assert_close(got[:, i].float(), want.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.state_after(layer, p).float(), want.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_an_edit_of_the_state_after_p_in_a_recording_cache(pair, name):
    """Zeroing the state after p = 4 (inside the kept states) through `gi.state_at` +
    `gi.intervene`: the later logits equal HF's unpatched model continued from a zero state
    after p (a stateful first-firing callback meets the state after p first, whatever the mode)."""
    patched, ref = pair(name)
    layer = next(iter(gi.gdn_layers(patched)))
    prefix, ids = ids_for(5), ids_for(6, seed=1)
    mine, theirs = _recording(patched, ref, prefix, keep=3)
    seen = []

    def zero_first(S):
        seen.append(gi.gdn_layer(patched, layer).firing)
        return S * 0 if len(seen) == 1 else None

    with gi.state_at(patched, [4], [layer]), gi.intervene(patched, {(layer, "state"): zero_first}):
        got = logits(patched, ids, cache=mine, use_cache=True)
    assert [f.position for f in seen] == [4, 5]
    c = copy.deepcopy(theirs)
    head = logits(ref, ids[:, :5], cache=c, use_cache=True)
    for S in _recurrent_tensors(c, layer):
        S.zero_()
    tail = logits(ref, ids[:, 5:], cache=c, use_cache=True)
    torch.testing.assert_close(got[:, :5], head, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, 5:], tail, rtol=1e-5, atol=1e-5)


def _recurrent_tensors(cache, layer) -> list:
    """The recurrent state tensor(s) the cache holds for `layer` (the current one)."""
    S = cache.get_recurrent_state(layer)
    return [S] if S is not None else []
