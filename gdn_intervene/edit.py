"""Interventions in plain PyTorch: edit sites with callbacks, split a prefill to reach the state
at any position. Both are context managers that undo themselves, also on error."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from ._positions import check_positions
from .patching import _site_in, gdn_layers, select_layers

__all__ = ["intervene", "state_at"]

Edit = Callable[[torch.Tensor], "torch.Tensor | None"]


@contextlib.contextmanager
def intervene(model: nn.Module, edits: Mapping[tuple[int, str], Edit]) -> Iterator[None]:
    """Plain-PyTorch interventions: `{(layer, site): fn}`; `fn(value)` returns a replacement
    or None (after editing in place; fine under autograd too). Hooks are removed on exit, also
    on error.

        with gdn_intervene.intervene(model, {(0, "beta"): lambda b: b * 0}):
            logits = model(ids).logits
    """
    handles = []
    try:
        layers = gdn_layers(model) if edits else {}
        for (layer, name), fn in edits.items():
            module = _site_in(layers, layer, name)
            handles.append(module.register_forward_hook(lambda mod, args, out, fn=fn: fn(out)))
        yield
    finally:
        for h in handles:
            h.remove()


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
    call. Restores each layer's previous `state_positions` on exit, also on error. Yields
    {layer: module}.
    """
    ps = tuple(check_positions(positions, "state_at"))
    mods = select_layers(model, layers)
    saved = {l: m.state_positions for l, m in mods.items()}
    try:
        for m in mods.values():
            m.state_positions = ps
        yield mods
    finally:
        for l, m in mods.items():
            m.state_positions = saved[l]
