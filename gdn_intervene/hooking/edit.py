"""Interventions in plain PyTorch: edit sites with callbacks, split a prefill to reach the state
at any position. Both are context managers that undo themselves, also on error, and act only on
forwards that run in the thread that opened them (`hooking.scope`). Under activation
checkpointing, a recomputation in backward replays the edited values and the split positions,
and calls no callback again (`gdn_intervene.replay`): gradients are exact after the block too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from .._positions import check_positions
from ..layer import GDNLayer
from . import scope
from .locate import gdn_layers, select_layers, site_in

__all__ = ["intervene", "state_at"]

Edit = Callable[[torch.Tensor], "torch.Tensor | None"]


@contextlib.contextmanager
def intervene(model: nn.Module, edits: Mapping[tuple[int, str], Edit]) -> Iterator[None]:
    """Plain-PyTorch interventions: `{(layer, site): fn}`; `fn(value)` returns a replacement
    or None (after editing in place; fine under autograd too). Hooks are removed on exit, also
    on error. They act on forwards of the calling thread only.

        with gdn_intervene.intervene(model, {(0, "beta"): lambda b: b * 0}):
            logits = model(ids).logits

    An edit of `state` inside `state_at(model, [p])` meets the state after p first; to tell the
    firings apart, ask `gdn_intervene.gdn_layer(model, layer).firing` in the callback.
    """
    handles = []
    try:
        with scope.ThreadScope("intervene") as sc:
            layers = gdn_layers(scope.dispatched(model)) if edits else {}
            for (layer, name), fn in edits.items():
                module = site_in(layers, layer, name)
                handles.append(module.register_forward_hook(sc.hook(lambda mod, args, out, fn=fn: fn(out))))
            yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def state_at(model: nn.Module, positions, layers=None) -> Iterator[dict]:
    """Split each prefill of the chosen GDN layers (default all) after each of `positions`.

    Inside the block, the `state` site of those layers fires once per position (the state
    [B, HV, K, V] after that token), then once more for the final state unless the last
    position is T - 1 (`sites.state_firings`; intermediate states a recording cache keeps fire
    only where listed). A replaced state carries into later tokens and into the cache. Cached
    single-token decode steps are not split. Splitting moves the kernel's chunk boundaries, so
    unedited outputs match an unsplit call to kernel tolerance (fp32 torch path: ~1e-6
    relative), not bitwise. Positions (an int, a sequence or a 1-D integer tensor; ints >= 0,
    strictly increasing) are checked on entry; positions beyond a call's length raise in that
    call. The split applies to forwards of the calling thread only, and each layer's setting is
    restored on exit, also on error. Yields {layer: module}.
    """
    ps = tuple(check_positions(positions, "state_at"))
    mods = select_layers(scope.dispatched(model), layers)
    with contextlib.ExitStack() as stack:
        for m in mods.values():
            stack.enter_context(GDNLayer(m).split_after(ps))
        with scope.ThreadScope("state_at"):  # no hooks: counts as open for torch's threads
            yield mods
