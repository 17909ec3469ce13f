"""Which kernel objects HF's forward of a GDN class calls, on which instance and device."""

from __future__ import annotations

import functools
import sys
import types
from types import ModuleType

from .conventions import CHUNK_KERNEL_NAMES, Convention, kernelized_wrapper
from .versions import TESTED, UnsupportedVersionError

# Besides the family's two delta-rule kernels (`Family.kernels`).
HELPERS = (
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "apply_mask_to_padding_states",
)


def check_hf_module(
    cls: type, kernels: tuple[str, ...] = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")
) -> None:
    """Raise `UnsupportedVersionError` unless the modeling file of HF GDN class `cls` defines
    the module-level functions the decomposed forward calls (the family's `kernels`, e.g.
    `chunk_kimi_delta_attention` / `recurrent_kimi_delta_attention` for KDA, and `HELPERS`)."""
    module: ModuleType = sys.modules[cls.__module__]
    ns = vars(module)
    missing = [n for n in (*kernels, *HELPERS) if n not in ns]
    if (
        ns.get("causal_conv1d_update", 0) is None and "torch_causal_conv1d_update" not in ns
    ):  # HF's fallback (4.57-5.14)
        missing.append("torch_causal_conv1d_update")
    if missing:
        raise UnsupportedVersionError(
            f"{cls.__name__}: {cls.__module__} no longer defines {missing}; this transformers release "
            f"changed the GDN code (supported: transformers >={TESTED['transformers'][0]}, newest tested {TESTED['transformers'][1]})."
        )


def hf_function(cls: type, name: str):
    """The module-level function `name` of the modeling file that defines HF GDN class `cls`.

    The native forward calls `torch_chunk_gated_delta_rule`, `torch_recurrent_gated_delta_rule`
    (KDA: `chunk_kimi_delta_attention`, `recurrent_kimi_delta_attention`),
    `causal_conv1d_fn`, `causal_conv1d_update` and `apply_mask_to_padding_states`, which
    transformers binds to flash-linear-attention / causal-conv1d when installed. Looked up at
    call time, so both forwards always run the same kernels, even if someone rebinds them."""
    return vars(sys.modules[cls.__module__])[name]


def hf_module_function(hf_module: str, name: str):
    """`hf_function` by the modeling module's name (what a site module keeps: a name survives
    deepcopy and pickle)."""
    return vars(sys.modules[hf_module])[name]


def kernel_router(hf_cls: type):
    """`route(fn)`: `fn` (a forward) run inside HF's own kernel routing of `hf_cls`, or `fn`
    itself where the class has none (before 5.25).

    From 5.25 the modeling module's kernels (`torch_chunk_gated_delta_rule`, the KDA pair,
    `causal_conv1d_fn/_update/_forward`) are `kernels` objects; called inside the forward that
    kernels' `use_kernelized_func` wraps, each routes to the instance's own copy
    (`module._kernel_funcs[name]`), which `kernelize` may have replaced by a hub kernel. `route`
    builds that very wrapper (HF's code object, its kernel list) around `fn` instead of HF's
    forward, so a forward calling the module-level kernels reaches exactly what HF's reaches."""
    wrapper = kernelized_wrapper(hf_cls.forward)
    if wrapper is None:
        return _unrouted

    def route(fn):
        cells = tuple(
            types.CellType(fn) if name == "orig_forward" else cell
            for name, cell in zip(wrapper.__code__.co_freevars, wrapper.__closure__)
        )
        new = types.FunctionType(wrapper.__code__, wrapper.__globals__, wrapper.__name__, wrapper.__defaults__, cells)
        new.__kwdefaults__ = wrapper.__kwdefaults__
        return functools.update_wrapper(new, fn)

    return route


def _unrouted(fn):
    return fn


def delta_rule_kernels(module, names: tuple[str, str], conv: Convention, hf_class: type):
    """(chunk, recurrent): the delta-rule kernels HF's forward of `module` (of HF class
    `hf_class`) calls, looked up at call time: the instance attributes `__init__` bound
    (`chunk_gated_delta_rule`, ...) where the convention has them, else the modeling module's
    functions `names`."""
    if conv.kernels_on_instance:
        return tuple(module.__dict__[n.removeprefix("torch_")] for n in names)
    return tuple(hf_function(hf_class, n) for n in names)


# Besides the family's delta-rule kernels: the conv kernels HF's forward reaches.
CONV_KERNELS = ("causal_conv1d_forward", "causal_conv1d_fn", "causal_conv1d_update")
_ORIGINS = (("fla", "fla"), ("causal_conv1d", "causal-conv1d"))  # module prefix -> route name


def kernel_objects(module, names: tuple[str, ...], conv: Convention, hf_class: type) -> dict:
    """{name: the kernel object HF's forward of `module` calls under that name}, for the
    family's delta-rule kernels `names` and the conv kernels: kernels' per-instance copies
    (`_kernel_funcs`, 5.25 on), instance attributes bound in `__init__` (4.57-5.14: listed under
    the module-level name, as on every release), else the modeling module's functions."""
    ns = vars(sys.modules[hf_class.__module__])
    funcs = module.__dict__.get("_kernel_funcs") or {}
    out = {}
    for name in (*names, *CONV_KERNELS):
        key = name.removeprefix("torch_")
        if conv.kernels_on_instance and key in module.__dict__:  # None: HF's torch path
            out[name] = module.__dict__[key]
        elif name in ns:
            obj = ns[name]
            out[name] = funcs.get(getattr(obj, "kernel_layer_name", None), obj)
    return out


def _closure(fn) -> dict:
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    return dict(zip(code.co_freevars, (c.cell_contents for c in cells))) if code else {}


def _origin(fn) -> str:
    module = getattr(fn, "__module__", None) or ""
    return next((name for prefix, name in _ORIGINS if module.split(".")[0] == prefix), "torch")


def kernel_route(obj, device_type: str) -> str:
    """What calling kernel object `obj` runs for inputs on `device_type`: "torch", "fla",
    "causal-conv1d", "hub (repo)", or "unknown (...)" for a layout this code does not know."""
    from torch import nn

    try:
        if obj is None:  # an absent optional kernel: HF's torch path
            return "torch"
        if isinstance(obj, nn.Module):  # kernels' Func: a hub kernel bound by kernelize, or the function it wraps
            if "forward" in obj.__dict__:
                repo = obj.__dict__.get("_kernel_repo")
                return f"hub ({repo if isinstance(repo, str) else getattr(repo, '_repo_id', None) or repo})"
            obj = _closure(type(obj).forward)["func"]
        c = _closure(obj)  # transformers' use_kernel_func_from_hub_with_fallback wrapper
        if "implementation" in c and "torch_function" in c:
            devices = c.get("supported_devices")
            if c["implementation"] is c["torch_function"] or (devices is not None and device_type not in devices):
                return "torch"
            obj = c["implementation"]
        if not callable(obj):
            raise TypeError
        return _origin(obj)
    except Exception:
        return f"unknown ({obj!r})"


def conv_kernels(hf_module: str):
    """(conv_fn or None, conv_update) of a modeling module, resolved as HF resolves them: the
    update kernel falls back to `torch_causal_conv1d_update`; a missing conv kernel (None,
    4.57-5.14 without causal-conv1d) means HF runs `F.silu(self.conv1d(x))` (`torch_conv`)."""
    ns = vars(sys.modules[hf_module])
    return ns.get("causal_conv1d_fn"), ns.get("causal_conv1d_update") or ns["torch_causal_conv1d_update"]


def torch_conv(x, weight, bias):
    """HF's conv without the causal-conv1d kernel: `F.silu(conv1d(x)[..., :L])`, the zero-padded
    depthwise conv of `nn.Conv1d(C, C, W, groups=C, padding=W - 1)` (the same call).
    x [B, C, L], weight [C, 1, W] -> [B, C, L]."""
    import torch.nn.functional as F

    L, W = x.shape[-1], weight.shape[-1]
    return F.silu(F.conv1d(x, weight, bias, padding=W - 1, groups=x.shape[1])[:, :, :L])


def redirect_chunk_kernel(module, fn, wrap, kernel: str = "torch_chunk_gated_delta_rule"):
    """`fn` (an undecorated forward) such that, called on `module`, it runs `wrap(kernel)` in
    place of its chunk kernel. Nothing shared changes: a module-level kernel is replaced in
    a copy of the function's globals, an instance-attribute kernel on `module` itself (a
    private twin)."""
    candidates = (kernel, *CHUNK_KERNEL_NAMES)  # the family's (KDA: chunk_kimi_delta_attention), GDN's
    for name in candidates:
        if callable(module.__dict__.get(name)):
            module.__dict__[name] = wrap(module.__dict__[name])
    names = [n for n in dict.fromkeys(candidates) if n in fn.__code__.co_names and n in fn.__globals__]
    if names:
        g = dict(fn.__globals__)
        for n in names:
            g[n] = wrap(g[n])
        new = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
        new.__kwdefaults__ = fn.__kwdefaults__
        fn = new
    return fn
