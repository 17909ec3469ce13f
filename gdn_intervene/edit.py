"""Interventions in plain PyTorch: edit sites with callbacks, split a prefill to reach the state
at any position. Both are context managers that undo themselves, also on error.

Threads: both act only on forwards that run in the thread that opened them (other threads'
forwards pass through untouched; `state_at` positions are kept per thread), as captures do; see
`gdn_intervene.capturing` for the rule. A lazy nnsight model gets its real weights first.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from ._positions import check_positions
from .capturing import _LOCK, _acting_thread, _dispatched, _ThreadScope
from .patching import _site_in, gdn_layers, select_layers

__all__ = ["intervene", "state_at"]

Edit = Callable[[torch.Tensor], "torch.Tensor | None"]


@contextlib.contextmanager
def intervene(model: nn.Module, edits: Mapping[tuple[int, str], Edit]) -> Iterator[None]:
    """Plain-PyTorch interventions: `{(layer, site): fn}`; `fn(value)` returns a replacement
    or None (after editing in place; fine under autograd too). Hooks are removed on exit, also
    on error. They act on forwards of the calling thread only.

        with gdn_intervene.intervene(model, {(0, "beta"): lambda b: b * 0}):
            logits = model(ids).logits
    """
    handles = []
    try:
        with _ThreadScope("intervene") as scope:
            layers = gdn_layers(_dispatched(model)) if edits else {}
            for (layer, name), fn in edits.items():
                module = _site_in(layers, layer, name)
                handles.append(module.register_forward_hook(scope.hook(lambda mod, args, out, fn=fn: fn(out))))
            yield
    finally:
        for h in handles:
            h.remove()


class _ThreadPositions(Sequence):
    """A layer's `state_positions` while `state_at` blocks are open on it: the positions of the
    innermost block of the thread whose forward runs (`capturing._acting_thread`), else those
    the layer had before (`before`)."""

    def __init__(self, before):
        self.before = before
        self.by_thread: dict[int, list[tuple[int, ...]]] = {}

    def _now(self) -> tuple[int, ...]:
        stack = self.by_thread.get(_acting_thread())
        return stack[-1] if stack else tuple(self.before or ())

    def __getitem__(self, i):
        return self._now()[i]

    def __len__(self) -> int:
        return len(self._now())

    def __iter__(self):
        return iter(self._now())

    def __eq__(self, other) -> bool:  # compares as the tuple it reads as (not hashable then)
        return self._now() == other

    def __repr__(self) -> str:
        return f"_ThreadPositions({self._now()!r} in this thread)"


@contextlib.contextmanager
def state_at(model: nn.Module, positions, layers=None) -> Iterator[dict]:
    """Split each prefill of the chosen GDN layers (default all) after each of `positions`.

    Inside the block, the `state` site of those layers fires once per position (the state
    [B, HV, K, V] after that token) and once more for the final state, unless the last
    position is T - 1; a replaced state carries into later tokens and into the cache. Cached
    single-token decode steps are not split. Splitting moves the kernel's chunk boundaries, so
    unedited outputs match an unsplit call to kernel tolerance (fp32 torch path: ~1e-6
    relative), not bitwise. Positions (an int, a sequence or a 1-D integer tensor; ints >= 0,
    strictly increasing) are checked on entry; positions beyond a call's length raise in that
    call. The split applies to forwards of the calling thread only: each layer's
    `state_positions` reads per thread while blocks are open, and is restored on exit, also on
    error. Yields {layer: module}.
    """
    ps = tuple(check_positions(positions, "state_at"))
    mods = select_layers(_dispatched(model), layers)
    me = threading.get_ident()
    with _LOCK:
        for m in mods.values():
            if not isinstance(m.state_positions, _ThreadPositions):
                m.state_positions = _ThreadPositions(m.state_positions)
            m.state_positions.by_thread.setdefault(me, []).append(ps)
        held = {l: m.state_positions for l, m in mods.items()}
    try:
        with _ThreadScope("state_at"):  # no hooks: counts as open for torch's threads
            yield mods
    finally:
        with _LOCK:
            for l, m in mods.items():
                per = held[l]
                per.by_thread[me].pop()
                if not per.by_thread[me]:
                    del per.by_thread[me]
                if not per.by_thread and m.__dict__.get("state_positions") is per:
                    m.state_positions = per.before
