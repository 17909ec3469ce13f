"""Activation checkpointing replays what the sites produced; a recomputation fires no hook.

`model.gradient_checkpointing_enable()` runs each decoder layer's forward, drops what autograd
saved inside it, and runs the forward again during backward to get those values back. The hooks
of a site (an edit of `gdn_intervene.intervene`, pyvene or nnsight; a capture) ran in the first
forward. The rule here: **a recomputation computes with the values the forward used, and runs no
hook**.

- Non-reentrant checkpointing (`use_reentrant=False`, transformers' default): in the forward,
  each site something listens to records its output (what its hooks made of it; detached, so the
  record holds no graph) and runs its hooks under saved-tensor hooks that keep what they save; the
  layer records the state positions and kernel options it ran with. A recomputation returns the
  records instead of calling the sites and runs with the recorded positions. So gradients are
  exact after the block that made the edit has closed too, in every backward pass (several with
  `retain_graph=True`); a stateful edit callback is called once; a capture records once. The cost:
  what a listened site's hooks compute is kept in memory instead of recomputed.
- Reentrant checkpointing (`use_reentrant=True`): the forward runs without autograd, so an edit
  cannot be replayed with a gradient: an edit there raises `CheckpointEditError` (one line saying
  what to change); a capture (`detach=True`) works and records once.

Records live as long as torch's checkpoint frame of that call (the autograd graph).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ._compat import checkpoint as _ck

__all__ = ["CheckpointEditError", "active", "decision", "reentrant_forward", "refuse_reentrant", "site_call"]


class CheckpointEditError(RuntimeError):
    """An edit inside a layer that reentrant gradient checkpointing will recompute in backward,
    where the edit cannot be replayed."""


class _Records:
    """One checkpointed call's records: per key, the values in firing order; per (backward, key),
    how many a recomputation has replayed."""

    __slots__ = ("values", "cursors", "__weakref__")

    def __init__(self):
        self.values: dict[Any, list] = {}
        self.cursors: dict[tuple, int] = {}

    def next(self, gid, key):
        i = self.cursors.get((gid, key), 0)
        values = self.values[key]
        if i >= len(values):
            raise RuntimeError(
                f"gdn_intervene: a recomputation under gradient checkpointing reached {_name(key)} more often than "
                f"the forward did ({len(values)} times); the checkpointed forward is not deterministic"
            )
        self.cursors[(gid, key)] = i + 1
        return values[i].get() if isinstance(values[i], _Value) else values[i]


class _Value:
    """A recorded site value, detached (the record holds no graph), and whether it required grad:
    the recomputation gets a leaf that requires grad as the value did, so the ops after it save
    what they saved in the forward (torch checks that they do)."""

    __slots__ = ("tensor", "requires_grad")

    def __init__(self, tensor: torch.Tensor, requires_grad: bool):
        self.tensor, self.requires_grad = tensor, requires_grad

    def get(self) -> torch.Tensor:
        return self.tensor.detach().requires_grad_(self.requires_grad)


_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # torch's checkpoint frame -> _Records
_LOCK = threading.Lock()


def _name(key) -> str:
    module = key[0] if isinstance(key, tuple) else key
    where = getattr(module, "site_name", None) or type(module).__name__
    return f"{where} of layer {getattr(module, 'layer_idx', '?')}"


def active() -> bool:
    """Whether any checkpointed call holds records (else a site nobody listens to needs no check)."""
    return bool(_RECORDS)


def _record(frame, key, value) -> None:
    with _LOCK:
        records = _RECORDS.get(frame)
        if records is None:
            records = _RECORDS[frame] = _Records()
        records.values.setdefault(key, []).append(value)


def site_call(key, listened: bool, run: Callable[[], torch.Tensor], passthrough: Callable[[], torch.Tensor]):
    """The output of one site call: `run()` (the site with its hooks) where something listens,
    else `passthrough()` (the value, no hook); in a recomputation, the forward's record (or
    `passthrough()` where the forward recorded none: nothing listened then)."""
    ck = _ck.checkpointed()
    if ck is not None:
        if ck.recompute:
            records = _RECORDS.get(ck.frame)
            if records is not None and key in records.values:
                return records.next(ck.gid, key)
            return passthrough()
        if not listened:
            return passthrough()
        with _ck.saved_normally():  # what the hooks compute is not recomputed: keep what they save
            out = run()
        _record(ck.frame, key, _Value(out.detach(), out.requires_grad))
        return out
    if not listened:
        return passthrough()
    if torch.is_grad_enabled() and _ck.in_backward() and _ck.reentrant_phase() == "recompute":
        return passthrough()  # reentrant checkpointing recomputing: its forward already ran the hooks
    return run()


def decision(key, now, default):
    """A per-call choice of the layer (split positions, kernel options): `now` in a forward (and
    recorded under checkpointing), the recorded one in a recomputation (`default` if none)."""
    ck = _ck.checkpointed()
    if ck is None:
        return now
    if ck.recompute:
        records = _RECORDS.get(ck.frame)
        return records.next(ck.gid, key) if records is not None and key in records.values else default
    _record(ck.frame, key, now)
    return now


def reentrant_forward(training: bool) -> bool:
    """Whether the running forward is reentrant checkpointing's first one (autograd off; backward
    runs it again). `training`: the module's mode (checkpointing runs only in training mode)."""
    return training and not torch.is_grad_enabled() and _ck.reentrant_phase() == "forward"


def refuse_reentrant(where: str, training: bool) -> None:
    """Raise `CheckpointEditError` if the running forward is reentrant checkpointing's (an edit
    of `where` could not be replayed in backward). Call after an edit."""
    if reentrant_forward(training):
        raise CheckpointEditError(
            f"gdn_intervene: {where} was edited inside a layer that reentrant gradient checkpointing "
            "(use_reentrant=True) recomputes in backward without the edit; use "
            "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}) "
            "(edits are replayed exactly) or model.gradient_checkpointing_disable()"
        )
