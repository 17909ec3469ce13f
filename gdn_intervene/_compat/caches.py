"""One cache API (5.23+'s) over every release's linear-attention cache: `Step`, `cache_step`, views."""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

from .conventions import Convention


class Step(NamedTuple):
    """What one layer call reads from the cache, decided once per call (before the conv writes
    the cache, as HF does).

    cache: the call's cache in the 5.23+ API (`cache_view`), or None.
    conv_state: [B, C, W] or None.  initial_state: S_0 [B, HV, K, V] or None.
    conv_decode: the conv runs the single-token update kernel (HF: a conv state, T == 1 and, in
        the GDN forwards, the cache is not recording past states; the KDA forwards do not ask).
    recurrent_decode: the recurrent kernel runs (HF: a recurrent state and T == 1).
    HF decides the two separately; so do we, in one place.
    keep: N, the intermediate states a non-decode call keeps for a later `crop` (5.25 on:
        `cache.get_recurrent_states_to_keep`, at most T); 0 otherwise."""

    cache: Any
    conv_state: Any
    initial_state: Any
    conv_decode: bool
    recurrent_decode: bool
    keep: int = 0


_NO_CACHE = Step(None, None, None, False, False)


_NEWEST = Convention()


def cache_step(
    cache: Any, layer_idx: int, T: int, asks_recording: bool = True, conv: Convention = _NEWEST, cache_position=None
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
    # the shared conv helper (5.25 on) asks is_recording_past in every family
    asks_recording = asks_recording or conv.conv_helper
    conv_decode = conv_state is not None and T == 1 and not (asks_recording and cache.is_recording_past(layer_idx))
    recurrent_decode = S0 is not None and T == 1
    keep = 0
    if conv.keeps_states and not recurrent_decode:
        keep = min(cache.get_recurrent_states_to_keep(layer_idx), T)
    return Step(cache, conv_state, S0, conv_decode, recurrent_decode, keep)


# The transformers 5.x cache methods the decomposed cached forward calls (the 5.23+ API).
CACHE_API = (
    "get_conv_state",
    "get_recurrent_state",
    "update_conv_state",
    "update_recurrent_state",
    "is_recording_past",
)


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
