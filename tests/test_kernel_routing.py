"""Kernel routing (transformers 5.25 on): the patched forward calls exactly the kernel objects
HF's forward calls on that instance, after `kernelize` too; whole-layer hub kernels are set
aside by `patch`, said in one warning line, and never silently bypass the sites.

A hub kernel is simulated as kernels' `kernelize` installs one (`_replace_forward`: a forward
bound to the instance, `_kernel_repo` beside it): no download, no accelerator.
"""

import copy
import types
import warnings

import pytest
import torch
from conftest import ids_for, logits, new_cache

import gdn_intervene as gi
from gdn_intervene import selfcheck
from gdn_intervene.layer import HubKernelWarning
from models import MODELS, build

NAMES = list(MODELS)


def _kernel_funcs(model) -> list[dict]:
    """The per-instance kernel copies of every GDN / KDA layer (keyed by hub names:
    `chunk_gated_delta_rule`, `chunk_kda`, `causal_conv1d_fn`, ...)."""
    return [m.__dict__["_kernel_funcs"] for m in model.modules() if "_kernel_funcs" in m.__dict__ and hasattr(m, "conv1d")]


pytestmark = [
    pytest.mark.compat,
    pytest.mark.skipif(not _kernel_funcs(build(next(iter(MODELS)))), reason="kernels route per instance from 5.25 on"),
]


def _fake_hub(model, log: list) -> set[str]:
    """Register a recording 'hub kernel' for every kernel name of every GDN layer; it runs the
    kernel's own function, so numbers are unchanged. Returns the names."""
    names = set()
    for funcs in _kernel_funcs(model):
        for name, kf in funcs.items():
            def fake(self, *args, _name=name, **kwargs):
                log.append((_name, args, kwargs))
                return type(self).forward(self, *args, **kwargs)

            kf.forward = types.MethodType(fake, kf)
            kf.__dict__["_kernel_repo"] = "kernels-community/fake"
            names.add(name)
    return names


def _norm(x):
    """A comparable form of a kernel argument: tensors by value, modules and caches by type."""
    if isinstance(x, torch.Tensor):
        return ("tensor", x.detach())
    if isinstance(x, (list, tuple)):
        return type(x)(_norm(v) for v in x)
    if isinstance(x, dict):
        return {k: _norm(v) for k, v in x.items()}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return ("object", type(x).__name__)


def _equal(a, b) -> bool:
    if isinstance(a, tuple) and len(a) == 2 and a[0] == "tensor":
        return isinstance(b, tuple) and b[0] == "tensor" and a[1].shape == b[1].shape and torch.equal(a[1], b[1])
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def _scenario(model):
    """No cache; a cached prefill and two decode steps; a call keeping 3 states (5.25 on)."""
    logits(model, ids_for(7))
    cache = new_cache(model)
    step = ids_for(9)
    for _ in range(3):
        step = logits(model, step, cache=cache, use_cache=True)[:, -1:].argmax(-1)
    if hasattr(cache, "get_recurrent_states_to_keep"):
        cache.activate_past_recording(recurrent_states_to_keep=3)
        logits(model, ids_for(4, seed=1), cache=cache, use_cache=True)


@pytest.mark.parametrize("name", NAMES)
def test_every_kernel_is_called_as_hf_calls_it(name):
    """With a hub kernel registered for every name (chunk, recurrent, conv fn / update /
    forward; GDN and KDA), HF and the patched model call each the same number of times, in the
    same order, with the same arguments."""
    ref = build(name)
    patched = gi.patch(copy.deepcopy(ref), selfcheck=False)  # the check's own calls reach the kernels too
    logs = {"p": [], "r": []}
    names = _fake_hub(ref, logs["r"])
    # chunk, recurrent, conv fn and update, and (5.25 on) the conv helper
    assert len(names) >= 4 and names == _fake_hub(patched, logs["p"])
    for model, log in ((ref, logs["r"]), (patched, logs["p"])):
        _scenario(model)
    called = {n for n, *_ in logs["r"]}
    assert called == names, f"the scenario does not reach {names - called}"
    assert [n for n, *_ in logs["p"]] == [n for n, *_ in logs["r"]]
    for (n, ap, kp), (_, ar, kr) in zip(logs["p"], logs["r"]):
        assert _equal(_norm(ap), _norm(ar)) and _equal(_norm(kp), _norm(kr)), f"arguments of {n} differ"


def test_the_self_check_sees_a_forward_that_misses_hf_routing(monkeypatch):
    """A patched class built without HF's routing, on a layer whose chunk kernel is a hub kernel
    with other numbers: the self-check compares against HF's routed forward and refuses."""
    name = next(iter(MODELS))
    model = build(name)
    for funcs in _kernel_funcs(model):
        chunk = next(k for n, k in funcs.items() if n.startswith(("torch_chunk", "chunk")))

        def doubled(self, *args, **kwargs):
            o, S = type(self).forward(self, *args, **kwargs)
            return 2 * o, S

        chunk.forward = types.MethodType(doubled, chunk)
    monkeypatch.setattr("gdn_intervene.layer._CLASSES", {})
    monkeypatch.setattr("gdn_intervene._compat.kernel_router", lambda cls: (lambda fn: fn))
    selfcheck.reset()
    try:
        gi.patch(model)
        with pytest.raises(selfcheck.SelfCheckError, match="outputs differ"):
            logits(model, ids_for(8))
    finally:
        selfcheck.reset()


class _HubLayer(torch.nn.Module):
    """What a whole-layer hub kernel's forward looks like to us: another function."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


def _kernelize_layers(model, repo="kernels-community/fake-gdn") -> None:
    """What kernels' `kernelize` does to a layer it maps (`_replace_forward`)."""
    for m in model.modules():
        if m.__class__.__name__.endswith(("GatedDeltaNet", "DeltaAttention", "LinearAttention")) and hasattr(m, "conv1d"):
            m.forward = types.MethodType(_HubLayer.forward, m)
            m.__dict__["_kernel_repo"] = repo


def _sites_fire_with_hf_numbers(model, ref, accelerate: bool = False) -> None:
    """Each GDN layer runs the decomposed forward (no instance forward; under accelerate's
    hooks, `_old_forward` is it); the `state` site fires; logits equal HF's own forward's."""
    for m in gi.gdn_layers(model).values():
        if accelerate:
            assert m.__dict__["_old_forward"].__func__ is type(m).forward
        else:  # none, or (kernels 0.18's fallback) the class's own forward bound on the instance
            assert getattr(m.__dict__.get("forward"), "__func__", type(m).forward) is type(m).forward
    fired = []
    layer = next(iter(gi.gdn_layers(model)))
    h = gi.site_module(model, layer, "state").register_forward_hook(lambda *a: fired.append(1))
    try:
        assert torch.equal(logits(model, ids_for(9)), logits(ref, ids_for(9)))
    finally:
        h.remove()
    assert fired


@pytest.mark.parametrize("name", NAMES)
def test_patch_restores_hf_forward_over_a_whole_layer_hub_kernel(name):
    """A model loaded where transformers maps a whole-layer GDN kernel: patch restores HF's
    layer forward (decomposed), warns once naming the kernel and device; the sites fire and the
    numbers are HF's own forward's."""
    ref = build(name)
    model = copy.deepcopy(ref)
    _kernelize_layers(model)
    with pytest.warns(HubKernelWarning, match=r"whole-layer hub kernel .*_HubLayer.* kernels-community/fake-gdn.* on cpu"):
        gi.patch(model)
    _sites_fire_with_hf_numbers(model, ref)


@pytest.mark.parametrize("name", NAMES)
def test_rekernelizing_a_patched_model_keeps_the_sites(name):
    """train() / eval() re-kernelize on 5.25 when the mode changes: a hub forward bound to a
    patched layer is set aside with a warning, never silently."""
    ref = build(name)
    model = gi.patch(copy.deepcopy(ref))
    with pytest.warns(HubKernelWarning, match="kept the decomposed forward"):
        _kernelize_layers(model)
    _sites_fire_with_hf_numbers(model, ref)


@pytest.mark.parametrize("name", NAMES)
def test_a_hub_kernel_hidden_in_accelerates_old_forward(name):
    """device_map: accelerate's hook wraps `_old_forward`, where kernelize leaves the hub
    forward (`keep_accelerate_hooks`); patch replaces it by the decomposed forward and says so."""
    accelerate = pytest.importorskip("accelerate.hooks")
    ref = build(name)
    model = copy.deepcopy(ref)
    for m in model.modules():
        if hasattr(m, "conv1d") and hasattr(m, "layer_idx"):
            accelerate.add_hook_to_module(m, accelerate.AlignDevicesHook(execution_device="cpu"))
    hooked = {m: m.forward for m in model.modules() if hasattr(m, "_hf_hook")}
    _kernelize_layers(model)
    for m, fwd in hooked.items():  # what transformers' keep_accelerate_hooks does (5.25) around kernelize
        if m.forward is not fwd:
            m._old_forward, m.forward = m.forward, fwd
    assert any(m.__dict__.get("_old_forward").__func__ is _HubLayer.forward
               for m in model.modules() if "_old_forward" in m.__dict__)
    with pytest.warns(HubKernelWarning, match="patch restored HF's layer forward"):
        gi.patch(model)
    _sites_fire_with_hf_numbers(model, ref, accelerate=True)


@pytest.mark.parametrize("name", NAMES)
def test_patch_and_unpatch_over_kernels_fallback_binding(name):
    """kernels 0.18's fallback binds the class's own forward on the instance: patching after it
    must not leave HF's forward shadowing the patched one (sites silent), nor unpatching leave
    the patched forward behind."""
    ref = build(name)
    model = copy.deepcopy(ref)
    for m in model.modules():
        if m.__class__.__name__.endswith(("GatedDeltaNet", "DeltaAttention", "LinearAttention")) and hasattr(m, "conv1d"):
            m.forward = types.MethodType(type(m).forward, m)
    gi.patch(model)
    _sites_fire_with_hf_numbers(model, ref)
    for m in gi.gdn_layers(model).values():
        m.forward = types.MethodType(type(m).forward, m)
    gi.unpatch(model)
    assert not any("forward" in m.__dict__ for m in model.modules() if hasattr(m, "conv1d") and hasattr(m, "layer_idx"))
    assert torch.equal(logits(model, ids_for(9)), logits(ref, ids_for(9)))


@pytest.mark.parametrize("name", NAMES)
def test_set_use_kernels_then_train_and_eval_on_cpu(name):
    """The real `kernelize` (no mapping for the CPU: HF's fallbacks) after patching, and the
    re-kernelization train()/eval() trigger: the sites still fire, the numbers are HF's."""
    ref = build(name)
    model = gi.patch(copy.deepcopy(ref))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.set_use_kernels(True)
        model.train()
        model.eval()
    _sites_fire_with_hf_numbers(model, ref)
