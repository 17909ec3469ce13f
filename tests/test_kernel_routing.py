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
from models import MODELS, build

import gdn_intervene as gi
from gdn_intervene import selfcheck
from gdn_intervene.layer import HubKernelWarning

NAMES = list(MODELS)
SITE_NAMES = [s.name for s in gi.SITES]


def _kernel_funcs(model) -> list[dict]:
    """The per-instance kernel copies of every GDN / KDA layer (keyed by hub names:
    `chunk_gated_delta_rule`, `chunk_kda`, `causal_conv1d_fn`, ...)."""
    return [
        m.__dict__["_kernel_funcs"] for m in model.modules() if "_kernel_funcs" in m.__dict__ and hasattr(m, "conv1d")
    ]


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


def _layout(x: torch.Tensor) -> tuple:
    """What a Triton kernel reads a tensor through: shape, dtype, strides, contiguity, storage offset."""
    return (tuple(x.shape), x.dtype, x.stride(), x.is_contiguous(), x.storage_offset())


def _norm(x):
    """A comparable form of a kernel argument: tensors by value and layout (`_layout`), modules
    and caches by type."""
    if isinstance(x, torch.Tensor):
        return ("tensor", x.detach(), _layout(x))
    if isinstance(x, (list, tuple)):
        return type(x)(_norm(v) for v in x)
    if isinstance(x, dict):
        return {k: _norm(v) for k, v in x.items()}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return ("object", type(x).__name__)


def _equal(a, b) -> bool:
    if isinstance(a, tuple) and len(a) == 3 and a[0] == "tensor":
        return isinstance(b, tuple) and b[0] == "tensor" and a[2] == b[2] and torch.equal(a[1], b[1])
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
    same order, with the same arguments: the same values and the same layouts (shape, dtype,
    strides, contiguity, storage offset: a Triton kernel reads memory through strides)."""
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


def _arguments(args: tuple, kwargs: dict) -> dict:
    """A kernel call's arguments by name: positions as `#0`, `#1`, ...; nested lists by index."""
    out = {}

    def walk(key, x):
        if isinstance(x, (list, tuple)):
            for i, y in enumerate(x):
                walk(f"{key}[{i}]", y)
        else:
            out[key] = x

    for i, a in enumerate(args):
        walk(f"#{i}", a)
    for k, v in kwargs.items():
        walk(k, v)
    return out


def _differences(mine: list, hf: list) -> set[tuple]:
    """Every way the recorded kernel calls `mine` differ from HF's `hf`, once per kind:
    (kernel, argument, what differs: "layout" / "values" / the keyword's pair, our layout, HF's)."""
    names = ([n for n, *_ in mine], [n for n, *_ in hf])
    if names[0] != names[1]:
        return {("calls", "", f"{names[0]} vs HF's {names[1]}", None, None)}
    out = set()
    for (name, ap, kp), (_, ar, kr) in zip(mine, hf):
        a, b = _arguments(ap, kp), _arguments(ar, kr)
        for key in sorted(a.keys() | b.keys()):
            x, y = a.get(key, "<absent>"), b.get(key, "<absent>")
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
                if _layout(x) != _layout(y):
                    out.add((name, key, "layout", _layout(x)[1:], _layout(y)[1:]))
                elif not torch.equal(x, y):
                    out.add((name, key, "values", None, None))
            elif not _equal(_norm(x), _norm(y)):
                out.add((name, key, f"{_norm(x)!r} vs HF's {_norm(y)!r}", None, None))
    return out


def _hooks(model, site: str, mode: str) -> list:
    """A forward hook on `site` of every GDN layer: a listener that changes nothing, an in-place
    edit that keeps the values (x.mul_(1)), or an out-of-place one (x.clone())."""
    fn = {
        "listened": lambda m, a, o: None,
        "in place": lambda m, a, o: o.mul_(1),
        "out of place": lambda m, a, o: o.clone(),
    }[mode]
    return [gi.site_module(model, layer, site).register_forward_hook(fn) for layer in gi.gdn_layers(model)]


# A listener, or an edit, that changes the layout of a kernel argument, found by the test below
# (every family, transformers 5.25): (site, mode) -> the delta-rule kernels' positional
# arguments (#0 q, #1 k, #2 v) whose layout differs from HF's. Values, shapes, dtypes are HF's.
# - listened / in place: the listener's own copy (`modules.own_storage`) keeps HF's strides
#   (HF's q, k, v are channel-major views of the conv output: time stride 1, not contiguous)
#   but starts its own storage: storage offset 0 (or the q / k width) where HF's view sits at
#   an offset into the conv output (e.g. 4 for q in a cached call, 112 for KDA's k in a prefill);
# - out of place: the replacement is the caller's tensor (here x.clone(), which compacts HF's
#   strided view: strides (112, 1, 56, 7) for HF's (560, 1, 56, 7); contiguous in decode).
# fla's kernels take every input through `input_guard` (.contiguous()), so none of these changes
# a number (tests/kernels_fla checks listened and edited sites bitwise on fla's kernels); the
# conv kernels' arguments (causal_conv1d_*) never differ. docs/kernels-fla.md, "Layouts", has
# the exact change that would restore HF's layouts. The test fails when one appears or goes.
_QKV = {"q": {"#0"}, "k": {"#1"}, "v": {"#2"}, "conv": {"#0", "#1", "#2"}}
KNOWN_LAYOUTS: dict[tuple[str, str], set[str]] = {
    (site, mode): args for site, args in _QKV.items() for mode in ("listened", "in place", "out of place")
}
DELTA_RULE_KERNELS = ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "chunk_kda", "fused_recurrent_kda")
# HF asks the chunk kernel for its final state only with a cache; a listened `state` site always
# asks (it must fire; o does not change). A keyword, not a layout.
ASKS_FOR_STATE = ("output_final_state", "True vs HF's False")  # (argument, what differs), as `_differences` says it


def layout_differences(name: str) -> dict[tuple[str, str], set[tuple]]:
    """(site, mode) -> the differences (`_differences`) of the scenario's kernel calls from HF's,
    with a listener, an in-place or an out-of-place edit on that site of every GDN layer."""
    ref = build(name)
    patched = gi.patch(copy.deepcopy(ref), selfcheck=False)
    hf: list = []
    _fake_hub(ref, hf)
    _scenario(ref)
    found = {}
    for site in SITE_NAMES:
        for mode in ("listened", "in place", "out of place"):
            log: list = []
            _fake_hub(patched, log)
            handles = _hooks(patched, site, mode)
            try:
                _scenario(patched)
            finally:
                for h in handles:
                    h.remove()
            diffs = {d for d in _differences(log, hf) if not (site == "state" and d[1:3] == ASKS_FOR_STATE)}
            if diffs:
                found[site, mode] = diffs
    return found


@pytest.mark.parametrize("name", NAMES)
def test_kernel_arguments_keep_hf_layouts_under_listeners_and_edits(name):
    """The recording hub kernel of every name, on the scenario above (prefill, decode, kept
    states), with a listener, an in-place edit or an out-of-place edit (all value-preserving) on
    each site of every GDN layer in turn: every kernel call's tensor arguments have HF's
    values and layouts, but for the differences listed in KNOWN_LAYOUTS (each one reported)."""
    found = layout_differences(name)

    def known(site, mode, d) -> bool:
        kernel, arg, what = d[:3]
        return what == "layout" and kernel in DELTA_RULE_KERNELS and arg in KNOWN_LAYOUTS.get((site, mode), ())

    unexpected = [f"{site} {mode}: {d[0]} {d[1]} {d[2]}: ours {d[3]} vs HF's {d[4]}"
                  for (site, mode), diffs in found.items() for d in sorted(diffs, key=str) if not known(site, mode, d)]  # fmt: skip
    assert not unexpected, "kernel arguments that differ from HF's call:\n" + "\n".join(unexpected)
    if _newest_release():  # the list was measured there; older releases pass q, k, v in other layouts
        gone = [key for key in KNOWN_LAYOUTS if {d[1] for d in found.get(key, ())} != KNOWN_LAYOUTS[key]]
        assert not gone, f"layouts that now equal HF's (or others that differ): update KNOWN_LAYOUTS for {gone}"


def _newest_release() -> bool:
    import transformers

    from gdn_intervene._compat import TESTED, parse_version

    return parse_version(transformers.__version__)[:2] >= parse_version(TESTED["transformers"][1])[:2]


def _allowed_under_wrappers(d) -> bool:
    """Under nnsight every site counts as listened: the listened differences of KNOWN_LAYOUTS
    (q, k, v copies) and the final state asked for."""
    return (d[2] == "layout" and d[0] in DELTA_RULE_KERNELS and d[1] in _QKV["conv"]) or d[1:3] == ASKS_FOR_STATE


@pytest.mark.parametrize("name", NAMES)
def test_kernel_arguments_under_nnsight(name):
    """An nnsight trace over the patched model reading every site of every layer and editing
    beta in place (x 1): each kernel call has HF's arguments (values, layouts) but for the
    listened differences (KNOWN_LAYOUTS) and the final state nnsight's `state` listener asks for."""
    pytest.importorskip("nnsight")
    from gdn_intervene.nnsight import load

    ref = build(name)
    patched = gi.patch(copy.deepcopy(ref), selfcheck=False)
    lm = load(patched)
    hf: list = []
    mine: list = []
    _fake_hub(ref, hf)
    _fake_hub(patched, mine)
    x = ids_for(7)
    with torch.no_grad():
        ref(input_ids=x, attention_mask=torch.ones_like(x))
        with lm.trace(x):
            for layer, module in gi.gdn_layers(patched).items():
                path = next(n for n, m in patched.named_modules() if m is module)
                node = lm
                for part in path.split("."):
                    node = node[int(part)] if part.isdigit() else getattr(node, part)
                children = {id(m): n for n, m in module.named_children()}
                for site in SITE_NAMES:  # every site, in execution order (HF-owned ones by their name: o_norm, ...)
                    envoy = getattr(node, children[id(gi.site_module(patched, layer, site))])
                    if site == "beta":
                        envoy.output[:] *= 1
                    envoy.output.save()
    diffs = _differences(mine, hf)
    assert not [d for d in diffs if not _allowed_under_wrappers(d)], sorted(diffs, key=str)


@pytest.mark.parametrize("name", NAMES)
def test_kernel_arguments_under_pyvene(name):
    """A pyvene head swap of beta with the base run as its own source (values unchanged): the
    kernel calls of both pyvene forwards have HF's arguments, values and layouts."""
    pv = pytest.importorskip("pyvene")
    import gdn_intervene.pyvene as gp

    gp.register()
    ref = build(name)
    patched = gi.patch(copy.deepcopy(ref), selfcheck=False)
    hf: list = []
    mine: list = []
    _fake_hub(ref, hf)
    _fake_hub(patched, mine)
    base = ids_for(7, B=2)
    layer = max(gi.gdn_layers(patched))
    with torch.no_grad():
        ref(input_ids=base, use_cache=False)
        ref(input_ids=base, use_cache=False)
        iv = pv.IntervenableModel([{"layer": layer, "component": "head_linear_attn_beta", "unit": "h.pos"}], patched)
        loc = [[[1]] * 2, [[3]] * 2]
        iv(
            {"input_ids": base, "use_cache": False},
            [{"input_ids": base, "use_cache": False}],
            {"sources->base": ([loc], [loc])},
        )
    for p in patched.parameters():
        p.requires_grad_(True)
    assert _differences(mine, hf) == set()


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
    monkeypatch.setattr("gdn_intervene._compat.kernel_router", lambda cls: lambda fn: fn)
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
        if m.__class__.__name__.endswith(("GatedDeltaNet", "DeltaAttention", "LinearAttention")) and hasattr(
            m, "conv1d"
        ):
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
    with pytest.warns(
        HubKernelWarning, match=r"whole-layer hub kernel .*_HubLayer.* kernels-community/fake-gdn.* on cpu"
    ):
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
    assert any(
        m.__dict__.get("_old_forward").__func__ is _HubLayer.forward
        for m in model.modules()
        if "_old_forward" in m.__dict__
    )
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
        if m.__class__.__name__.endswith(("GatedDeltaNet", "DeltaAttention", "LinearAttention")) and hasattr(
            m, "conv1d"
        ):
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
