"""Record site values: `with gdn_intervene.capture(model) as cache:`, in the spirit of baukit's
`TraceDict` and TransformerLens's `run_with_cache`.

    with gi.capture(model, sites=["beta", "state"], layers=[0, 2]) as cache:
        model.generate(ids, max_new_tokens=4)
    cache[0, "beta"]            # [prefill beta [B, T, HV], step 1 [B, 1, HV], ...]: one per firing
    cache.stack("state")        # [L, B, HV, K, V]: the first firing of each captured layer

Hooks are plain forward hooks on the site modules, removed on exit (also on error).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from .patching import _site_in, select_layers
from .sites import SITE_NAMES, site

__all__ = ["Capture", "capture"]


class Capture:
    """Values recorded by `capture`: `cache[layer, site]` is the list of that site's values in
    firing order (prefill, then each decode step; `state` fires once per split of a prefill)."""

    def __init__(self, layers: Sequence[int], sites: Sequence[str]):
        self.layers = tuple(layers)
        self.sites = tuple(sites)
        self._values: dict[tuple[int, str], list[torch.Tensor]] = {(l, s): [] for l in self.layers for s in self.sites}

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

    detach: drop the autograd graph (default); pass False to keep it (e.g. for `autograd.grad`).
    clone: copy each value (default), so that a later in-place edit cannot change what was
    recorded; `clone=False` keeps references (cheaper; values may then change).
    device: move each value there (e.g. "cpu").
    Yields the `Capture`, filled as the model runs; hooks are removed on exit, also on error.
    """
    names = tuple(sites)
    for n in names:
        site(n)  # unknown names raise, listing the sites
    mods = select_layers(model, layers)
    cache = Capture(list(mods), names)

    def record(key):
        values = cache[key]

        def hook(module, args, out):
            x = out.detach() if detach else out
            if device is not None:
                x = x.to(device)
            if clone and x.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
                x = x.clone()  # not already copied by the move
            values.append(x)

        return hook

    handles = []
    try:
        for l in mods:
            for n in names:
                handles.append(_site_in(mods, l, n).register_forward_hook(record((l, n))))
        yield cache
    finally:
        for h in handles:
            h.remove()
