"""Record site values: `with gdn_intervene.capture(model) as cache:`, in the spirit of baukit's
`TraceDict` and TransformerLens's `run_with_cache`.

    with gi.capture(model, sites=["beta", "state"], layers=[0, 2]) as cache:
        model.generate(ids, max_new_tokens=4)
    cache[0, "beta"]            # [prefill beta [B, T, HV], step 1 [B, 1, HV], ...]: one per firing
    cache.stack("state")        # [L, B, HV, K, V]: the first firing of each captured layer
    cache.firings(0)            # which state each `state` firing of layer 0 was (sites.StateFiring)

Hooks are plain forward hooks on the site modules, removed on exit (also on error). They act on
forwards of the thread that opened the block (`hooking.scope`). Under activation checkpointing a
recomputation fires no hook, so each forward is recorded once (`gdn_intervene.replay`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from .. import replay
from ..layer import GDNLayer
from ..sites import SITE_NAMES, StateFiring, site
from . import scope
from .locate import select_layers, site_in

__all__ = ["Capture", "capture"]


class Capture:
    """Values recorded by `capture`: `cache[layer, site]` is the list of that site's values in
    firing order (prefill, then each decode step; `state` fires as `sites.state_firings` says,
    and `firings(layer)` tells which state each of its values is)."""

    def __init__(self, layers: Sequence[int], sites: Sequence[str]):
        self.layers = tuple(layers)
        self.sites = tuple(sites)
        self._values: dict[tuple[int, str], list[torch.Tensor]] = {(l, s): [] for l in self.layers for s in self.sites}
        self._firings: dict[int, list[StateFiring]] = {l: [] for l in self.layers}

    def __getitem__(self, key: tuple[int, str]) -> list[torch.Tensor]:
        try:
            return self._values[key]
        except (KeyError, TypeError):
            raise KeyError(
                f"{key!r} was not captured; keys are (layer, site) with layers {list(self.layers)} and sites "
                f"{list(self.sites)}"
            ) from None

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def items(self):
        return self._values.items()

    def firings(self, layer: int) -> list[StateFiring]:
        """Which state each recorded `state` value of `layer` is: its position in its call and
        whether it was the call's final state (one per value of `cache[layer, "state"]`)."""
        self[layer, "state"]  # raises unless the state was captured at that layer
        return list(self._firings[layer])

    def state_after(self, layer: int, position: int, call: int = 0) -> torch.Tensor:
        """The state [B, HV, K, V] after token `position` of the `call`-th forward call that fired
        `state` at `layer` (0: the first, e.g. the prefill). Raises unless it was recorded (inside
        `gdn_intervene.state_at(model, [position])`, or the final state, or a kept state)."""
        n, have = 0, []
        for value, f in zip(self[layer, "state"], self._firings[layer]):
            if n == call:
                if f.position == position:
                    return value
                have.append(f.position)
            n += f.final  # a call's last firing is its final state
        raise KeyError(
            f"no state after position {position} was recorded at layer {layer} in call {call} (recorded: {have}); "
            f"split there with gdn_intervene.state_at(model, [{position}])"
        )

    def stack(self, name: str, call: int = 0) -> torch.Tensor:
        """[L, ...]: firing `call` of site `name` in every captured layer, stacked in layer order.
        Shapes must agree across layers (they do within one model)."""
        missing = [l for l in self.layers if len(self[l, name]) <= call and not -len(self[l, name]) <= call < 0]
        if missing:
            raise IndexError(f"site {name!r} fired fewer than {call + 1} times in layers {missing}")
        return torch.stack([self[l, name][call] for l in self.layers])

    def __repr__(self) -> str:
        n = {k: len(v) for k, v in self._values.items()}
        return f"Capture(layers={list(self.layers)}, sites={list(self.sites)}, firings={sum(n.values())})"


@contextlib.contextmanager
def capture(
    model: nn.Module,
    *,
    sites: Iterable[str] = SITE_NAMES,
    layers: int | Iterable[int] | None = None,
    detach: bool = True,
    clone: bool = True,
    device: torch.device | str | None = None,
) -> Iterator[Capture]:
    """Record every firing of `sites` (default all) in GDN `layers` (default all) inside the block.

    detach: drop the autograd graph (default). With False, each stored value is the tensor the
    layer goes on with (the copy, where one is made on the same device), so
    `torch.autograd.grad(loss, cache[l, s][i])` is d loss / d that site value; a later in-place
    edit of it then shows in the record too. (Under reentrant gradient checkpointing the forward
    runs without autograd: `detach=False` raises there, saying what to change.)
    clone: copy each value (default), so that a later in-place edit cannot change what was
    recorded; `clone=False` keeps references (cheaper; values may then change).
    device: move each value there (e.g. "cpu"); a moved value is a copy the layer does not use,
    so gradients flow from it but not to it.
    Yields the `Capture`, filled as the model runs; hooks are removed on exit, also on error.
    """
    names = tuple(sites)
    for n in names:
        site(n)  # unknown names raise, listing the sites
    mods = select_layers(scope.dispatched(model), layers)
    cache = Capture(list(mods), names)

    def record(l, name):
        values, firings, layer = cache[l, name], cache._firings[l], GDNLayer(mods[l])

        def hook(module, args, out):
            if not detach and replay.reentrant_forward(module.training):
                raise replay.CheckpointEditError(
                    f"gdn_intervene.capture(detach=False): site {name} of layer {l} runs inside a layer that reentrant "
                    "gradient checkpointing (use_reentrant=True) runs without autograd, so its value has no gradient; "
                    "use gradient_checkpointing_kwargs={'use_reentrant': False} or gradient_checkpointing_disable()"
                )
            x = out.detach() if detach else out
            if device is not None:
                x = x.to(device)
            if clone and x.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
                x = x.clone()  # not already copied by the move
            values.append(x)
            if name == "state":
                firings.append(layer.firing or StateFiring(-1, True))  # -1: fired outside a layer call
            if not detach and x.device == out.device:
                return x  # the layer goes on with the recorded tensor: gradients reach it

        return hook

    handles = []
    try:
        with scope.ThreadScope("capture") as sc:
            for l in mods:
                for n in names:
                    handles.append(site_in(mods, l, n).register_forward_hook(sc.hook(record(l, n))))
            yield cache
    finally:
        for h in handles:
            h.remove()
