"""Where a forward runs relative to torch's activation checkpointing (torch.utils.checkpoint), read
off torch's own objects by feature detection.

Non-reentrant checkpointing (`use_reentrant=False`, transformers' default) runs the checkpointed
forward under saved-tensor hooks whose pack function closes over the call's `_CheckpointFrame`
(`frame`); backward recomputes the forward under other hooks that close over a weak reference to
that frame (`target_frame_ref`) and the backward's graph task id (`gid`). Reentrant checkpointing
(`use_reentrant=True`) runs the forward without autograd inside `CheckpointFunction.forward` and
recomputes it in `CheckpointFunction.backward`; only the call stack tells.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

__all__ = [
    "Checkpointed",
    "checkpointed",
    "in_backward",
    "reentrant_checkpointing_off",
    "reentrant_phase",
    "saved_normally",
]


class Checkpointed(NamedTuple):
    """A forward under non-reentrant checkpointing: `frame` identifies the checkpointed call (the
    same object in its forward and every recomputation); `recompute` says whether this run is a
    recomputation (in backward), `gid` then names the backward pass recomputing it."""

    frame: Any
    recompute: bool
    gid: Any = None


def _cells(fn) -> dict:
    fn = getattr(fn, "__wrapped__", fn)  # the recomputation's pack hook is wrapped by torch._dynamo.disable
    code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    out = {}
    for name, cell in zip(code.co_freevars, closure):
        try:
            out[name] = cell.cell_contents
        except ValueError:  # an empty cell
            pass
    return out


_TOP = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def checkpointed() -> Checkpointed | None:
    """The non-reentrant checkpoint the running forward belongs to, or None (not checkpointed,
    reentrant, or a torch whose checkpoint this code does not know)."""
    top = _TOP(True) if _TOP is not None else None
    if not top:
        return None
    cells = _cells(top[0])
    if "frame" in cells and hasattr(cells["frame"], "recompute_fn"):
        return Checkpointed(cells["frame"], False)
    ref = cells.get("target_frame_ref")
    if callable(ref) and "gid" in cells:
        frame = ref()
        return None if frame is None else Checkpointed(frame, True, cells["gid"])
    return None


def _reentrant_codes() -> tuple:
    fn = getattr(torch.utils.checkpoint, "CheckpointFunction", None)
    return (
        tuple(getattr(getattr(fn, n, None), "__code__", None) for n in ("forward", "backward")) if fn else (None, None)
    )


_FORWARD, _BACKWARD = _reentrant_codes()


def reentrant_phase(depth: int = 64) -> str | None:
    """ "forward" inside reentrant checkpointing's forward (run without autograd), "recompute"
    inside its backward's recomputation, else None. Walks the call stack: call it only where
    that can be the case (a listened site with autograd off in training mode; a forward run
    inside a backward pass)."""
    f = sys._getframe(1)
    while f is not None and depth:
        if f.f_code is _FORWARD:
            return "forward"
        if f.f_code is _BACKWARD:
            return "recompute"
        f, depth = f.f_back, depth - 1
    return None


def in_backward() -> bool:
    """Whether a backward pass is running in this thread (a forward now is a recomputation)."""
    return torch._C._current_graph_task_id() != -1


def _pack(t):
    return t.detach() if t.requires_grad else t


def _unpack(t):
    return t


def saved_normally():
    """Saved-tensor hooks under which what autograd saves is kept as usual, not dropped for
    recomputation (pushed over a checkpoint's hooks: the innermost hooks are the ones used)."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)


def _reentrant_layers(model) -> list:
    """The modules of `model` that transformers' gradient checkpointing runs reentrantly now
    (`gradient_checkpointing` on, the checkpoint function asked for `use_reentrant=True`)."""
    out = []
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True and m.training:
            fn = getattr(m, "_gradient_checkpointing_func", None)
            if getattr(fn, "keywords", {}).get("use_reentrant", True):
                out.append(m)
    return out


@contextlib.contextmanager
def reentrant_checkpointing_off(model) -> Iterator[None]:
    """transformers' reentrant gradient checkpointing switched off in `model` for the block (its
    forward runs without autograd, so no gradient reaches a value inside a layer); restored on
    exit, also on error. Non-reentrant checkpointing stays (`replay` makes it exact)."""
    layers = _reentrant_layers(model)
    for m in layers:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in layers:
            m.gradient_checkpointing = True
