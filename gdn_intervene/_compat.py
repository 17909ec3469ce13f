"""Every version-sensitive question lives here: which transformers / nnsight / pyvene releases
we test, how HF's GDN code is reached (its kernels, masking helper, decorators), how each GDN
class's forward calls its kernels and cache (`Convention`, read from that forward), and the
views that give the decomposed forward one cache API over every release's cache.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import os
import sys
import textwrap
import types
from types import ModuleType
from typing import Any, NamedTuple

__all__ = [
    "TESTED",
    "UnsupportedVersionError",
    "check_version",
    "check_hf_module",
    "hf_function",
    "Convention",
    "convention",
    "delta_rule_kernels",
    "conv_kernels",
    "route_kwargs",
    "layout_gap",
    "Step",
    "cache_step",
    "CACHE_API",
    "cache_gap",
    "cache_kwarg",
    "cache_view",
    "force_accelerate_hooks",
    "deprecate_cache_params",
    "rebind_forwards",
    "remove_forward_hooks_where",
]

# package -> (lowest tested, first untested); for transformers (lowest supported, newest
# tested): releases below are refused, newer ones run behind the first-call self-check
# (gdn_intervene.selfcheck). Keep in step with pyproject.toml and the README's matrix.
TESTED: dict[str, tuple[str, str]] = {
    "transformers": ("4.57.0", "5.24.0"),
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
    ns = vars(module)
    missing = [n for n in (*kernels, *HELPERS) if n not in ns]
    if ns.get("causal_conv1d_update", 0) is None and "torch_causal_conv1d_update" not in ns:  # HF's fallback (4.57-5.14)
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


class Convention(NamedTuple):
    """How HF's forward of one GDN class calls its kernels and reads its cache, detected once
    per class from the forward itself (its signature, names and source), never from a version
    number. Fields, with the releases that showed each value:

    cache_kw: the forward's cache argument: `cache` (5.24 on) or `cache_params`.
    gqa_in_layer: q, k are repeated to the value heads before the kernel (before 5.23).
    kernels_on_instance: the kernels are instance attributes bound in `__init__`
        (`self.chunk_gated_delta_rule`, `self.causal_conv1d_fn`, ...: 4.57-5.14), not module-level
        functions (5.15 on).
    continues: a cached call of several tokens continues from the cached states (5.7 on);
        False: it restarts from zero states, as a prefill (4.57-5.6).
    kernel_kwargs: what of the forward's `**kwargs` reaches the kernels: "all" (5.15 on: the
        conv gets them, the delta-rule kernels `cu_seqlens` plus them), "packed" (5.9-5.14:
        the conv `seq_idx`, the chunk kernel `cu_seqlens`), "none" (4.57-5.8).
    decode_needs_position: a cached decode step also needs `cache_position` (4.57-5.3).
    extra_params: where the forward takes no `**kwargs` (4.57, 5.5), the names it takes besides
        the hidden states, the cache and the mask (4.57: `cache_position`); any other keyword is
        a TypeError, as in HF. None: it takes `**kwargs`.
    trim_with_cache: the conv output is cut to the last T positions on every cached call
        (5.15 on), not only where cached context was prepended (5.10) or never (4.57, 5.5).
        A no-op on the values, not on the gradient's layout.
    """

    cache_kw: str = "cache"
    gqa_in_layer: bool = False
    kernels_on_instance: bool = False
    continues: bool = True
    kernel_kwargs: str = "all"
    decode_needs_position: bool = False
    trim_with_cache: bool = True
    extra_params: tuple[str, ...] | None = None


@functools.lru_cache(maxsize=None)
def convention(cls: type, chunk_kernel: str = "torch_chunk_gated_delta_rule") -> Convention:
    """The `Convention` of HF GDN class `cls` (`chunk_kernel`: the family's module-level chunk
    kernel). Without HF's source (a bytecode-only install) the newest shape is assumed for what
    only the source tells; the first-call self-check catches a mismatch."""
    fwd = undecorated(cls.forward)
    params = inspect.signature(fwd).parameters
    on_instance = chunk_kernel not in fwd.__code__.co_names and chunk_kernel.removeprefix("torch_") in fwd.__code__.co_names
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    base = Convention(
        cache_kw="cache" if "cache" in params else "cache_params",
        kernels_on_instance=on_instance,
        kernel_kwargs="all" if takes_kwargs else "none",
        extra_params=None if takes_kwargs else tuple(
            n for n in params if n not in ("self", "hidden_states", "cache", "cache_params", "attention_mask")
        ),
    )
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fwd)))
    except (OSError, TypeError, SyntaxError):
        return base
    src = ast.unparse(tree)
    decides = [ast.unparse(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
               and any(isinstance(t, ast.Name) and t.id == "use_precomputed_states" for t in n.targets)]
    restarts = any("seq_len == 1" in d for d in decides)
    chunk_calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _callee(n) in (chunk_kernel, chunk_kernel.removeprefix("torch_"))]
    keywords = {k.arg for c in chunk_calls for k in c.keywords}
    if base.kernel_kwargs == "all" and chunk_calls and None not in keywords:  # no `**kwargs` on to the kernel
        kernel_kwargs = "packed" if "cu_seqlens" in keywords else "none"
    else:
        kernel_kwargs = base.kernel_kwargs
    trims_after_context = any(
        "-seq_len" in ast.unparse(n.body[0]) and "use_precomputed_states" in ast.unparse(n.test)
        for n in ast.walk(tree) if isinstance(n, ast.If) and len(n.body) == 1
    )
    return base._replace(
        gqa_in_layer="repeat_interleave" in src,
        trim_with_cache=not restarts and not trims_after_context,
        continues=not restarts,
        kernel_kwargs=kernel_kwargs,
        decode_needs_position=any("cache_position" in d for d in decides),
    )


def _callee(call: ast.Call) -> str | None:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def delta_rule_kernels(module, names: tuple[str, str], conv: Convention):
    """(chunk, recurrent): the delta-rule kernels HF's forward of `module` calls, looked up at
    call time: the instance attributes `__init__` bound (`chunk_gated_delta_rule`, ...) where
    the convention has them, else the modeling module's functions `names`."""
    if conv.kernels_on_instance:
        return tuple(module.__dict__[n.removeprefix("torch_")] for n in names)
    return tuple(hf_function(module._gdn_hf_class, n) for n in names)


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


def route_kwargs(conv: Convention, kwargs: dict, packed_kwarg: bool, hf_name: str = "forward") -> tuple[dict, dict, dict]:
    """(conv, chunk, recurrent) keyword arguments from the forward's `kwargs`, as HF's forward
    passes them (see `Convention.kernel_kwargs`; `packed_kwarg`: the family's kernels take
    `cu_seq_lens_q` as `cu_seqlens`). A keyword HF's forward does not take is HF's TypeError
    (`hf_name`: its class's name), never silently dropped."""
    if conv.extra_params is not None:
        for k in kwargs:
            if k not in conv.extra_params:
                raise TypeError(f"{hf_name}.forward() got an unexpected keyword argument '{k}'")
    if conv.kernel_kwargs == "none":
        return {}, {}, {}
    if conv.kernel_kwargs == "packed":
        return {"seq_idx": kwargs.get("seq_idx")}, {"cu_seqlens": kwargs.get("cu_seq_lens_q")}, {}
    rest = dict(kwargs)
    packed = {"cu_seqlens": rest.pop("cu_seq_lens_q", None)} if packed_kwarg else {}
    delta = {**packed, **rest}
    return kwargs, delta, delta


def layout_gap(cls: type, attrs: tuple[str, ...], since: str | None) -> str | None:
    """Why HF GDN class `cls` has a layout the decomposed forward cannot serve (None if it can):
    its `__init__` must create every submodule in `attrs` (e.g. OLMo-Hybrid's one fused
    `conv1d`, which 5.3-5.14 split into q/k/v convs). `since`: the first release with it."""
    made = set()
    for c in cls.__mro__:
        init = vars(c).get("__init__")
        if inspect.isfunction(init) and c.__module__.startswith("transformers."):
            made.update(init.__code__.co_names)
    missing = [a for a in attrs if a not in made]
    if not missing:
        return None
    import transformers

    return (
        f"{cls.__name__} on transformers {transformers.__version__} has no {', '.join(missing)} (another layout of "
        f"its GDN layer); gdn_intervene serves it from transformers {since or 'a later release'} on"
    )


class Step(NamedTuple):
    """What one layer call reads from the cache, decided once per call (before the conv writes
    the cache, as HF does).

    cache: the call's cache in the 5.23+ API (`cache_view`), or None.
    conv_state: [B, C, W] or None.  initial_state: S_0 [B, HV, K, V] or None.
    conv_decode: the conv runs the single-token update kernel (HF: a conv state, T == 1 and, in
        the GDN forwards, the cache is not recording past states; the KDA forwards do not ask).
    recurrent_decode: the recurrent kernel runs (HF: a recurrent state and T == 1).
    HF decides the two separately; so do we, in one place."""

    cache: Any
    conv_state: Any
    initial_state: Any
    conv_decode: bool
    recurrent_decode: bool


_NO_CACHE = Step(None, None, None, False, False)


def cache_step(
    cache: Any, layer_idx: int, T: int, asks_recording: bool = True, conv: Convention = Convention(), cache_position=None
) -> Step:
    """The `Step` of a layer call with `cache` (None: no cache). `asks_recording`: whether the
    family's HF forward asks `is_recording_past` before the conv-update kernel; `conv`: the
    class's `Convention` (a cached multi-token call may restart; a decode step may need
    `cache_position`)."""
    if cache is None:
        return _NO_CACHE
    cache = cache_view(cache, conv.continues)
    fresh = (not conv.continues and T != 1) or (conv.decode_needs_position and cache_position is None)
    if fresh:  # HF reads no state: the call runs as a prefill (and overwrites the cache)
        return Step(cache, None, None, False, False)
    conv_state = cache.get_conv_state(layer_idx, state_idx=0)
    S0 = cache.get_recurrent_state(layer_idx, state_idx=0)
    conv_decode = conv_state is not None and T == 1 and not (asks_recording and cache.is_recording_past(layer_idx))
    return Step(cache, conv_state, S0, conv_decode, S0 is not None and T == 1)


# The transformers 5.x cache methods the decomposed cached forward calls (the 5.23+ API).
CACHE_API = ("get_conv_state", "get_recurrent_state", "update_conv_state", "update_recurrent_state", "is_recording_past")


def cache_gap(cache: Any) -> str | None:
    """Why the decomposed forward cannot serve `cache` (None if it can); decided per type."""
    return _cache_kind(type(cache))[1]


def cache_view(cache: Any, continues: bool = True) -> Any:
    """`cache` as the 5.23+ linear-attention cache API (see CACHE_API) that the decomposed
    forward speaks: the cache itself where it has that API, else a thin adapter (`continues`:
    whether a multi-token call continues from the cached conv state, `Convention.continues`).
    Call only for caches `cache_gap` accepts."""
    if cache is None:
        return cache
    adapter = _cache_kind(type(cache))[0]
    return cache if adapter is None else adapter(cache, continues)


# cache type -> (adapter class or None, gap or None). A plain dict, not lru_cache: torch.compile
# traces through this lookup without a warning.
_CACHE_KINDS: dict[type, tuple[Any, str | None]] = {}


def _cache_kind(cls: type) -> tuple[Any, str | None]:
    if cls not in _CACHE_KINDS:
        _CACHE_KINDS[cls] = _classify_cache(cls)
    return _CACHE_KINDS[cls]


def _classify_cache(cls: type) -> tuple[Any, str | None]:
    if all(callable(getattr(cls, n, None)) for n in CACHE_API):
        return None, None
    prev = inspect.getattr_static(cls, "has_previous_state", None)
    if isinstance(prev, property) and not callable(getattr(cls, "update_conv_state", None)):
        return _ListsCacheView, None  # 4.57-5.4: Qwen3NextDynamicCache, Qwen3_5DynamicCache
    if callable(prev) and all(callable(getattr(cls, n, None)) for n in ("update_conv_state", "update_recurrent_state")):
        return (_LayersCacheView if _takes(prev, "state_idx") else _FlatLayersCacheView), None
    missing = [n for n in CACHE_API if not callable(getattr(cls, n, None))]
    return None, f"cache type {cls.__name__} lacks {', '.join(missing)}"


def _takes(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class _CacheView:
    """The 5.23+ getters and writers over an older cache. The writers do what HF's forward of
    that release does around its cache: `update_conv_state` returns the conv input (the cached
    left context, then the new columns) and stores its last W columns, zero-padded on the left."""

    __slots__ = ("cache", "continues")

    def __init__(self, cache, continues: bool = True):
        self.cache, self.continues = cache, continues

    def is_recording_past(self, layer_idx: int) -> bool:
        return getattr(self.cache.layers[layer_idx], "record_past", False)

    def update_conv_state(self, x, layer_idx: int, conv_kernel_size: int, **_):
        import torch
        import torch.nn.functional as F

        prev = self.get_conv_state(layer_idx) if self.continues else None
        full = x if prev is None else torch.cat([prev, x], dim=-1)
        self._store_conv(F.pad(full, (conv_kernel_size - full.shape[-1], 0)), layer_idx)
        return full


class _LayersCacheView(_CacheView):
    """5.15-5.22: `has_previous_state(i, state_idx)`, per-layer lists `layers[i].conv_states`;
    its own `update_conv_state` already returns the conv input."""

    __slots__ = ()

    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        if not self.cache.has_previous_state(layer_idx, state_idx=state_idx):
            return None
        return self.cache.layers[layer_idx].conv_states[state_idx]

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        if not self.cache.has_previous_state(layer_idx, state_idx=state_idx):
            return None
        return self.cache.layers[layer_idx].recurrent_states[state_idx]

    def update_conv_state(self, *args, **kwargs):
        return self.cache.update_conv_state(*args, **kwargs)

    def update_recurrent_state(self, *args, **kwargs):
        return self.cache.update_recurrent_state(*args, **kwargs)


class _FlatLayersCacheView(_CacheView):
    """5.5-5.14: `has_previous_state(i)`, one tensor `layers[i].conv_states`; its
    `update_conv_state(x, i)` stores what it is given (HF pads to W first)."""

    __slots__ = ()

    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        return self.cache.layers[layer_idx].conv_states if self.cache.has_previous_state(layer_idx) else None

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        return self.cache.layers[layer_idx].recurrent_states if self.cache.has_previous_state(layer_idx) else None

    def _store_conv(self, state, layer_idx: int):
        self.cache.update_conv_state(state, layer_idx)

    def update_recurrent_state(self, state, layer_idx: int, **_):
        return self.cache.update_recurrent_state(state, layer_idx)


class _ListsCacheView(_CacheView):
    """4.57-5.4: the model's own cache (Qwen3NextDynamicCache, Qwen3_5DynamicCache), lists
    `conv_states[i]` / `recurrent_states[i]` that the forward assigns, and one
    `has_previous_state` property for every layer."""

    __slots__ = ()

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        return self.cache.conv_states[layer_idx] if self.cache.has_previous_state else None

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        return self.cache.recurrent_states[layer_idx] if self.cache.has_previous_state else None

    def _store_conv(self, state, layer_idx: int):
        self.cache.conv_states[layer_idx] = state

    def update_recurrent_state(self, state, layer_idx: int, **_):
        self.cache.recurrent_states[layer_idx] = state
        return state


# --- how HF's GDN forward is called, and what it leaves to the layer ---


def repeat_heads(q, k, num_v_heads: int):
    """q, k [B, T, HK, K] -> [B, T, HV, K], each key head serving HV/HK consecutive value heads."""
    r = num_v_heads // q.shape[2]
    if r == 1:
        return q, k
    return q.repeat_interleave(r, dim=2), k.repeat_interleave(r, dim=2)


def force_accelerate_hooks(names: list[str]):
    """HF's decorator (5.13 on; the same here before): the forward reads `self.conv1d.weight`
    without calling conv1d, so accelerate's offload hooks of those children must be fired by
    hand, before the forward and (reversed) after it."""
    try:
        from transformers.integrations.accelerate import force_accelerate_hooks as hf_decorator
    except ImportError:
        pass
    else:
        return hf_decorator(names)

    def decorator(forward):
        @functools.wraps(forward)
        def wrapped(self, *args, **kwargs):
            hooked = [(m, getattr(m, "_hf_hook", None)) for m in (getattr(self, n) for n in names)]
            for m, hook in hooked:
                if hook is not None:
                    hook.pre_forward(m)
            out = forward(self, *args, **kwargs)
            for m, hook in reversed(hooked):
                if hook is not None:
                    hook.post_forward(m, None)
            return out

        return wrapped

    return decorator


def deprecate_cache_params(fn, hf_cls: type | None = None):
    """Accept the cache under both names. Where HF's forward takes `cache` (5.24 on), as HF
    does: `cache_params` with a deprecation warning. Where it takes `cache_params` (before),
    silently: that is what HF's own decoder layers pass."""
    if hf_cls is None or convention(hf_cls).cache_kw == "cache":
        from transformers.utils.deprecation import deprecate_kwarg

        return deprecate_kwarg("cache_params", "5.40.0", new_name="cache")(fn)

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


def model_kwargs(model, kwargs: dict) -> dict:
    """`kwargs` for `model`'s forward, with a `cache=` renamed to `past_key_values=` where the
    forward predates the `cache` name (before 5.24): those forwards take `**kwargs` and would
    drop it silently, running without the cache."""
    if "cache" not in kwargs or "past_key_values" in kwargs:
        return kwargs
    forward = getattr(type(model), "forward", None)
    if forward is None or "cache" in inspect.signature(forward).parameters:
        return kwargs
    kwargs = dict(kwargs)
    kwargs["past_key_values"] = kwargs.pop("cache")
    return kwargs


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
# instance attribute bound in `__init__` (4.57-5.14).
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
