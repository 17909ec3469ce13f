"""Record site values: `with gdn_intervene.capture(model) as cache:`, in the spirit of baukit's
`TraceDict` and TransformerLens's `run_with_cache`.

    with gi.capture(model, sites=["beta", "state"], layers=[0, 2]) as cache:
        model.generate(ids, max_new_tokens=4)
    cache[0, "beta"]            # [prefill beta [B, T, HV], step 1 [B, 1, HV], ...]: one per firing
    cache.stack("state")        # [L, B, HV, K, V]: the first firing of each captured layer

Hooks are plain forward hooks on the site modules, removed on exit (also on error).

Threads: a capture, an intervention (`gdn_intervene.intervene`) and `state_at` act only on the
forwards that run in the thread that opened them; another thread's forwards pass through
untouched, so threads may each capture or edit one model at the same time. A forward that a
block's thread hands to a worker thread (`generate` in a `Thread` beside a streamer, say) is not
seen either: open the block in that worker (a block that saw none of its own forwards while
other threads ran some warns on exit). Threads that torch itself runs (autograd's device
threads, which recompute checkpointed layers during a GPU backward) count as the one thread
with open blocks; with blocks open in several threads, such a forward raises.
An nnsight model built lazily (`gdn_intervene.nnsight.load(...)`, `dispatch=False`) gets its
real weights first: hooks on its meta-device placeholders would never run.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import warnings
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from .patching import _site_in, select_layers
from .sites import SITE_NAMES, site

__all__ = ["Capture", "capture"]

_OPEN: collections.Counter = collections.Counter()  # thread id -> its open captures, interventions, state_at
_LOCK = threading.Lock()


def _acting_thread() -> int:
    """The thread whose blocks act on the forward running now: this one; in a thread torch runs
    (not a Python `threading` thread: autograd's device threads), the only thread with open blocks."""
    me = threading.get_ident()
    if not isinstance(threading.current_thread(), threading._DummyThread):  # what threading calls foreign threads
        return me
    owners = list(_OPEN)
    if len(owners) > 1:
        raise RuntimeError(
            f"gdn_intervene: a GDN site fired in a thread torch runs (thread {me}, e.g. autograd recomputing a "
            f"checkpointed layer) while threads {owners} each have a capture or intervention open; it cannot "
            "tell whose forward this is. Keep checkpointed backward passes to one thread at a time."
        )
    return owners[0] if owners else me


class _ThreadScope:
    """The hooks of one capture or intervention: `hook(fn)` acts only on forwards of the thread
    that entered the scope (see `_acting_thread`) and passes other threads' through. Exiting
    warns if none of the thread's own forwards reached a hook while other threads' did."""

    def __init__(self, what: str):
        self.what, self.owner, self.own, self.foreign = what, threading.get_ident(), 0, 0

    def __enter__(self) -> "_ThreadScope":
        with _LOCK:
            _OPEN[self.owner] += 1
        return self

    def __exit__(self, error, *_) -> None:
        with _LOCK:
            _OPEN[self.owner] -= 1
            if not _OPEN[self.owner]:
                del _OPEN[self.owner]
        if error is None and self.foreign and not self.own:
            warnings.warn(
                f"gdn_intervene.{self.what} (opened in thread {threading.current_thread().name!r}) saw none of its "
                f"thread's forwards, while {self.foreign} site firings of other threads passed through: blocks act "
                "only on forwards of the thread that opens them; open it in the thread that runs the model.",
                stacklevel=3,
            )

    def hook(self, fn):
        def scoped(module, args, out):
            if _acting_thread() != self.owner:
                self.foreign += 1
                return None
            self.own += 1
            return fn(module, args, out)

        return scoped


def _dispatched(model):
    """`model`, its real weights loaded first if it is a lazy nnsight model that has not run yet
    (until then its modules are meta-device placeholders that the first trace replaces)."""
    if getattr(model, "dispatched", True) is False and callable(getattr(model, "dispatch", None)):
        model.dispatch()
    return model


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

    detach: drop the autograd graph (default). With False, each stored value is the tensor the
    layer goes on with (the copy, where one is made on the same device), so
    `torch.autograd.grad(loss, cache[l, s][i])` is d loss / d that site value; a later in-place
    edit of it then shows in the record too.
    clone: copy each value (default), so that a later in-place edit cannot change what was
    recorded; `clone=False` keeps references (cheaper; values may then change).
    device: move each value there (e.g. "cpu"); a moved value is a copy the layer does not use,
    so gradients flow from it but not to it.
    Yields the `Capture`, filled as the model runs; hooks are removed on exit, also on error.
    """
    names = tuple(sites)
    for n in names:
        site(n)  # unknown names raise, listing the sites
    mods = select_layers(_dispatched(model), layers)
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
            if not detach and x.device == out.device:
                return x  # the layer goes on with the recorded tensor: gradients reach it

        return hook

    handles = []
    try:
        with _ThreadScope("capture") as scope:
            for l in mods:
                for n in names:
                    handles.append(_site_in(mods, l, n).register_forward_hook(scope.hook(record((l, n)))))
            yield cache
    finally:
        for h in handles:
            h.remove()
