"""Which thread a hook acts for, and lazy nnsight models (pure: imports nothing of the package).

A capture, an intervention and `state_at` act only on the forwards that run in the thread that
opened them; another thread's forwards pass through untouched, so threads may each capture or
edit one model at the same time. A forward that a block's thread hands to a worker thread
(`generate` in a `Thread` beside a streamer, say) is not seen either: open the block in that
worker (a block that saw none of its own forwards while other threads ran some warns on exit).
Threads that torch itself runs (autograd's device threads) count as the one thread with open
blocks; with blocks open in several threads, such a forward raises.
"""

from __future__ import annotations

import collections
import threading
import warnings

__all__ = ["LOCK", "ThreadScope", "acting_thread", "dispatched", "open_threads"]

_OPEN: collections.Counter = collections.Counter()  # thread id -> its open captures, interventions, state_at
LOCK = threading.Lock()


def open_threads() -> list[int]:
    """The ids of the threads that have a capture, intervention or `state_at` block open."""
    return list(_OPEN)


def acting_thread() -> int:
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


class ThreadScope:
    """The hooks of one capture or intervention: `hook(fn)` acts only on forwards of the thread
    that entered the scope (see `acting_thread`) and passes other threads' through. Exiting
    warns if none of the thread's own forwards reached a hook while other threads' did."""

    def __init__(self, what: str):
        self.what, self.owner, self.own, self.foreign = what, threading.get_ident(), 0, 0

    def __enter__(self) -> ThreadScope:
        with LOCK:
            _OPEN[self.owner] += 1
        return self

    def __exit__(self, error, *_) -> None:
        with LOCK:
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
        """`fn(module, args, out)` as a forward hook that acts for this scope's thread only."""

        def scoped(module, args, out):
            if acting_thread() != self.owner:
                self.foreign += 1
                return None
            self.own += 1
            return fn(module, args, out)

        return scoped


def dispatched(model):
    """`model`, its real weights loaded first if it is a lazy nnsight model that has not run yet
    (until then its modules are meta-device placeholders that the first trace replaces)."""
    if getattr(model, "dispatched", True) is False and callable(getattr(model, "dispatch", None)):
        model.dispatch()
    return model
