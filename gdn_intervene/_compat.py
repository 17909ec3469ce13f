"""Every version-sensitive question lives here: which transformers / nnsight / pyvene releases
we test, how HF's GDN code is reached (its kernels, masking helper, decorators), and which
cache API a cached forward needs.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import types
from types import ModuleType
from typing import Any, NamedTuple

__all__ = [
    "TESTED",
    "UnsupportedVersionError",
    "check_version",
    "check_hf_module",
    "hf_function",
    "Step",
    "cache_step",
    "CACHE_API",
    "cache_gap",
    "cache_kwarg",
    "cache_view",
    "hf_cache_name",
    "gqa_in_layer",
    "force_accelerate_hooks",
    "deprecate_cache_params",
    "rebind_forwards",
    "remove_forward_hooks_where",
]

# package -> (lowest tested, first untested); for transformers (lowest supported, newest
# tested): releases below are refused, newer ones run behind the first-call self-check
# (gdn_intervene.selfcheck). Keep in step with pyproject.toml and the README's matrix.
TESTED: dict[str, tuple[str, str]] = {
    "transformers": ("5.15.0", "5.24.0"),
    "nnsight": ("0.8.1", "0.9.0"),
    "pyvene": ("0.1.8", "0.1.9"),
}
_SKIP_ENV = "GDN_INTERVENE_SKIP_VERSION_CHECK"
# Packages whose newer releases are not refused: a run-time check guards them instead.
RUNTIME_CHECKED = frozenset({"transformers"})


class UnsupportedVersionError(RuntimeError):
    """A dependency is outside the tested range."""


def _parse(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def check_version(package: str, version: str | None = None) -> None:
    """Raise `UnsupportedVersionError` if `package` is outside the tested range.

    transformers: only releases below the lowest supported one are refused; newer releases
    than the newest tested run, and each patched class checks itself on its first call
    (`gdn_intervene.selfcheck`). Set GDN_INTERVENE_SKIP_VERSION_CHECK=1 to proceed anyway.
    """
    if version is None:
        version = importlib.import_module(package).__version__
    lo, hi = TESTED[package]
    if os.environ.get(_SKIP_ENV):
        return
    if package in RUNTIME_CHECKED:
        if _parse(version) < _parse(lo):
            raise UnsupportedVersionError(
                f"gdn_intervene supports {package} >={lo} (newest tested: {hi}); found {package} {version}. "
                f"Install {package}>={lo}, or set {_SKIP_ENV}=1 to try anyway."
            )
    elif not (_parse(lo) <= _parse(version) < _parse(hi)):
        raise UnsupportedVersionError(
            f"gdn_intervene is tested with {package} >={lo},<{hi}; found {package} {version}. "
            f"Install a tested release, or set {_SKIP_ENV}=1 to try anyway."
        )


def modeling_module(name: str) -> ModuleType | None:
    """The transformers modeling module `name`, or None where this release does not have it
    (a family newer than the installed release)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name):
            return None
        raise


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
    missing = [n for n in (*kernels, *HELPERS) if n not in vars(module)]
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


class Step(NamedTuple):
    """What one layer call reads from the cache, decided once per call (before the conv writes
    the cache, as HF does).

    conv_state: [B, C, W] or None.  initial_state: S_0 [B, HV, K, V] or None.
    conv_decode: the conv runs the single-token update kernel (HF: a conv state, T == 1 and, in
        the GDN forwards, the cache is not recording past states; the KDA forwards do not ask).
    recurrent_decode: the recurrent kernel runs (HF: a recurrent state and T == 1).
    HF decides the two separately; so do we, in one place."""

    conv_state: Any
    initial_state: Any
    conv_decode: bool
    recurrent_decode: bool


_NO_CACHE = Step(None, None, False, False)


def cache_step(cache: Any, layer_idx: int, T: int, asks_recording: bool = True) -> Step:
    """The `Step` of a layer call with `cache` (None: no cache). `asks_recording`: whether the
    family's HF forward asks `is_recording_past` before the conv-update kernel."""
    if cache is None:
        return _NO_CACHE
    cache = cache_view(cache)
    conv_state = cache.get_conv_state(layer_idx, state_idx=0)
    S0 = cache.get_recurrent_state(layer_idx, state_idx=0)
    conv_decode = conv_state is not None and T == 1 and not (asks_recording and cache.is_recording_past(layer_idx))
    return Step(conv_state, S0, conv_decode, S0 is not None and T == 1)


# The transformers 5.x cache methods the decomposed cached forward calls (the 5.23+ API).
CACHE_API = ("get_conv_state", "get_recurrent_state", "update_conv_state", "update_recurrent_state", "is_recording_past")
# What a 5.15-5.20 cache has instead of the getters: `has_previous_state(i, state_idx)` and
# per-layer lists `layers[i].conv_states` / `.recurrent_states` / `.record_past`.
_LAYERS_API = ("has_previous_state", "update_conv_state", "update_recurrent_state")


def cache_gap(cache: Any) -> str | None:
    """Why the decomposed forward cannot serve `cache` (None if it can); decided per type."""
    return _cache_type_gap(type(cache))


def cache_view(cache: Any) -> Any:
    """`cache` as the 5.23+ linear-attention cache API (see CACHE_API) that the decomposed
    forward speaks: the cache itself where it has that API, else a thin adapter. Call only
    for caches `cache_gap` accepts."""
    if cache is None or _cache_adapter(type(cache)) is None:
        return cache
    return _LayersCacheView(cache)


@functools.lru_cache(maxsize=None)
def _cache_adapter(cls: type):
    if all(callable(getattr(cls, n, None)) for n in CACHE_API):
        return None
    if all(callable(getattr(cls, n, None)) for n in _LAYERS_API) and _takes(cls.has_previous_state, "state_idx"):
        return _LayersCacheView
    raise TypeError(cls)


@functools.lru_cache(maxsize=None)
def _cache_type_gap(cls: type) -> str | None:
    try:
        _cache_adapter(cls)
    except TypeError:
        missing = [n for n in CACHE_API if not callable(getattr(cls, n, None))]
        return f"cache type {cls.__name__} lacks {', '.join(missing)}"
    return None


def _takes(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class _LayersCacheView:
    """The 5.23+ getters over a 5.15-5.20 cache (`has_previous_state(i, state_idx)`,
    `layers[i].conv_states[state_idx]`); writes go to the cache's own update methods."""

    __slots__ = ("cache",)

    def __init__(self, cache):
        self.cache = cache

    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        if not self.cache.has_previous_state(layer_idx, state_idx=state_idx):
            return None
        return self.cache.layers[layer_idx].conv_states[state_idx]

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        if not self.cache.has_previous_state(layer_idx, state_idx=state_idx):
            return None
        return self.cache.layers[layer_idx].recurrent_states[state_idx]

    def is_recording_past(self, layer_idx: int) -> bool:
        return getattr(self.cache.layers[layer_idx], "record_past", False)

    def update_conv_state(self, *args, **kwargs):
        return self.cache.update_conv_state(*args, **kwargs)

    def update_recurrent_state(self, *args, **kwargs):
        return self.cache.update_recurrent_state(*args, **kwargs)


# --- how HF's GDN forward is called, and what it leaves to the layer ---


def hf_cache_name(cls: type) -> str:
    """The name under which HF's GDN forward takes the cache: `cache` (5.24 on) or
    `cache_params` (before)."""
    params = inspect.signature(undecorated(cls.forward)).parameters
    return "cache" if "cache" in params else "cache_params"


def gqa_in_layer(cls: type) -> bool:
    """True where HF's GDN forward repeats q and k to the value heads itself (before 5.23),
    so its kernel expects them repeated; from 5.23 on the kernel does it. Without HF's source
    (a bytecode-only install) the current shape is assumed; the self-check catches a mismatch."""
    try:
        return "repeat_interleave" in inspect.getsource(undecorated(cls.forward))
    except (OSError, TypeError):
        return False


def repeat_heads(q, k, num_v_heads: int):
    """q, k [B, T, HK, K] -> [B, T, HV, K], each key head serving HV/HK consecutive value heads."""
    r = num_v_heads // q.shape[2]
    if r == 1:
        return q, k
    return q.repeat_interleave(r, dim=2), k.repeat_interleave(r, dim=2)


def _decorators():
    try:
        from transformers.integrations.accelerate import force_accelerate_hooks as fah
        from transformers.utils.deprecation import deprecate_kwarg
    except ImportError as e:  # before 5.15: kernels bound in __init__, another cache API
        import transformers

        raise UnsupportedVersionError(
            f"transformers {transformers.__version__}: {e}. Its GDN code predates the shape gdn_intervene "
            f"serves; the first supported release is {TESTED['transformers'][0]}."
        ) from e
    return fah, deprecate_kwarg


def force_accelerate_hooks(name: str):
    """HF's decorator: the forward reads `self.conv1d.weight` without calling conv1d, so
    accelerate's offload hooks of that child must be fired by hand."""
    return _decorators()[0](name)


def deprecate_cache_params(fn, hf_cls: type | None = None):
    """Accept the cache under both names. Where HF's forward takes `cache` (5.24 on), as HF
    does: `cache_params` with a deprecation warning. Where it takes `cache_params` (before),
    silently: that is what HF's own decoder layers pass."""
    if hf_cls is None or hf_cache_name(hf_cls) == "cache":
        return _decorators()[1]("cache_params", "5.40.0", new_name="cache")(fn)

    @functools.wraps(fn)
    def renamed(self, *args, **kwargs):
        if "cache_params" in kwargs:
            kwargs["cache"] = kwargs.pop("cache_params")
        return fn(self, *args, **kwargs)

    return renamed


def remove_forward_hooks_where(module, predicate) -> None:
    """Remove the forward (pre-)hooks of `module` whose function satisfies `predicate`, with the
    bookkeeping torch keeps beside them (private dicts: `_forward_hooks_with_kwargs`, ...)."""
    for hooks, extra in (
        (module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called)),
        (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
    ):
        for hid in [h for h, fn in hooks.items() if predicate(fn)]:
            hooks.pop(hid)
            for d in extra:
                d.pop(hid, None)


def cache_kwarg(kwargs: dict) -> Any:
    """The cache a GDN forward was called with: `cache`, or its pre-5.24 name `cache_params`."""
    return kwargs.get("cache", kwargs.get("cache_params"))


def rebind_forwards(module, old_forward=None) -> None:
    """After a class swap, point every forward wrapper installed on the instance at the new
    class's forward.

    - accelerate's `add_hook_to_module` (device_map dispatch, CPU/disk offload) keeps the bound
      method it wrapped in `module._old_forward`; left alone, the old class's forward would keep
      running and no site would fire.
    - nnsight 0.8 wraps a module once, keeping the (unbound) forward it runs in
      `module.__dict__["__nnsight__"].body`. `old_forward` defaults to any base class's forward
      (the HF class after `patch`); bodies nnsight did not take from a class are left alone.
    """
    if "_old_forward" in module.__dict__:
        module._old_forward = type(module).forward.__get__(module)
    state = module.__dict__.get("__nnsight__")
    if state is None or state.original is type(module).forward:
        return
    if old_forward is None:
        inherited = any(vars(c).get("forward") is state.original for c in type(module).__mro__[1:])
    else:
        inherited = state.original is old_forward
    if inherited:
        state.body = state.original = type(module).forward
        state.sourced, state.compiled = False, None  # `.source` rebuilds from the new body


# --- the first-call self-check (gdn_intervene.selfcheck) ---

# The chunk kernel as HF's forward names it: a module-level function (5.15 on), or an
# instance attribute bound in `__init__` (4.57-5.10).
CHUNK_KERNEL_NAMES = ("torch_chunk_gated_delta_rule", "chunk_gated_delta_rule")


def undecorated(fn, name: str = "forward"):
    """`fn` (a method called `name`) without its decorators (HF's force_accelerate_hooks,
    deprecate_kwarg): through `__wrapped__` where the decorator used functools.wraps, else
    through the one closure cell holding a function (force_accelerate_hooks before 5.20 does
    not wrap)."""
    for _ in range(8):
        fn = inspect.unwrap(fn)
        if fn.__name__ == name:
            return fn
        inner = [c.cell_contents for c in (fn.__closure__ or ()) if inspect.isfunction(c.cell_contents)]
        if len(inner) != 1:
            return fn
        fn = inner[0]
    return fn


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


NNSIGHT_STATE = "__nnsight__"  # nnsight 0.8: per-module state; its controller sits in `forward`


def strip_nnsight(twin) -> None:
    """Remove nnsight 0.8's per-module controller from a private twin (`twin.__dict__` is a
    copy), keeping the body nnsight wraps when that body is not the class's forward."""
    state = twin.__dict__.pop(NNSIGHT_STATE, None)
    if state is None:
        return
    twin.__dict__.pop("forward", None)
    body = getattr(state, "original", None)
    if body is not None and body is not getattr(type(twin), "forward", None):
        twin.__dict__["forward"] = types.MethodType(body, twin)
