"""First-call self-check: a patched class proves, on real input, that it computes HF's numbers.

transformers releases newer than the tested range are not refused; instead, the first call of
each patched class runs HF's own forward and the decomposed forward on a short slice of that
call's input (first batch row, first `TOKENS` tokens, no cache, no mask, no grad, eval mode,
the caller's random state untouched) and compares
the layer output and the final recurrent state with `torch.equal`. A difference raises
`SelfCheckError` (a `gdn_intervene.UnsupportedVersionError`) naming the class, the release and
what differed, on that call and every later call of the class.

    GDN_INTERVENE_SKIP_SELFCHECK=1 python run.py     # skip it everywhere
    gdn_intervene.patch(model, selfcheck=False)      # skip it for this model's classes

`doctor` re-runs the check on demand (`verify`) without touching what this process recorded.

The check runs on a private twin of the module: the same parameters and children, with every
observing hook (user code, pyvene, nnsight's per-module controller) left out, so they see
nothing of it; hooks of torch, transformers and accelerate stay (tensor parallelism gathers
sharded projections in forward hooks). HF's final state is read at its chunk kernel,
which is asked for the final state (that does not change the output).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import nn

from . import _compat

__all__ = ["SelfCheckError", "ENV", "TOKENS", "Check", "first_call", "mark_checked", "reset", "suspended", "verify"]

ENV = "GDN_INTERVENE_SKIP_SELFCHECK"
TOKENS = 8  # crosses no chunk boundary, covers the conv's left context (kernel 4)

_DONE: set[type] = set()  # classes checked (or skipped)
_FAILED: dict[type, SelfCheckError] = {}


class SelfCheckError(_compat.UnsupportedVersionError):
    """The decomposed forward does not reproduce HF's forward bit for bit on this release."""


def mark_checked(cls: type) -> None:
    """Skip the check for `cls` (what `patch(..., selfcheck=False)` does)."""
    _DONE.add(cls)


def reset() -> None:
    """Forget which classes were checked (tests)."""
    _DONE.clear()
    _FAILED.clear()


_LOCAL = threading.local()


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """No first-call check in this thread inside the block (`doctor` runs `verify` itself)."""
    before = getattr(_LOCAL, "suspended", False)
    _LOCAL.suspended = True
    try:
        yield
    finally:
        _LOCAL.suspended = before


class Check(NamedTuple):
    """How one patched class proves itself: `ours` and `hf` are the undecorated functions
    `(module, hidden_states)` compared, the decomposed forward and HF's own; `chunk_kernel` names
    the family's chunk kernel in HF's modeling module (where HF's final state is read); `route`
    puts ours inside HF's kernel routing (`_compat.kernel_router`), as the patched class runs it,
    while HF's forward runs inside the routing built from `hf_class`: a kernel reached by one and
    not the other shows as a difference. `accelerate_children`: children whose offload hooks the
    patched forward fires by hand. `private(twin)`: drops the caller's per-call settings from the
    twin (the layer's owner says which)."""

    ours: Callable
    hf: Callable
    chunk_kernel: str
    route: Callable
    hf_class: type
    accelerate_children: tuple = ()
    private: Callable = lambda twin: None


def first_call(forward: Callable, check: Check) -> Callable:
    """Wrap a patched class's `forward` so that its first call per class runs `check`; the
    result is recorded for the class (a failure raises on that call and every later one)."""

    @functools.wraps(forward)
    def checked(self, *args, **kwargs):
        cls = type(self)
        if cls not in _DONE and not os.environ.get(ENV) and not getattr(_LOCAL, "suspended", False):
            if cls in _FAILED:
                raise _FAILED[cls]
            x = args[0] if args else kwargs.get("hidden_states")
            if _checkable(x):
                try:
                    _run(self, check, x)
                except SelfCheckError as e:
                    _FAILED[cls] = e
                    raise
                _DONE.add(cls)
        return forward(self, *args, **kwargs)

    return checked


def verify(module: nn.Module, check: Check, x: torch.Tensor) -> None:
    """Run `check` on `module` with layer input `x` [B, T, D] now; raise `SelfCheckError` on a
    difference. Records nothing (a class skipped or checked before stays so)."""
    _run(module, check, x)


def _checkable(x) -> bool:
    """Real numbers on a real device, outside compilation/tracing (else: retry next call)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.numel() == 0 or x.is_meta:
        return False
    if type(x) is not torch.Tensor and not isinstance(x, nn.Parameter):  # FakeTensor, subclasses
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return True


def _run(module: nn.Module, check: Check, x: torch.Tensor) -> None:
    cls = type(module)
    with torch.inference_mode(False):  # an inference tensor has no version counter for the sites
        x = x[:1, :TOKENS].detach().clone()
    twin = _twin(module)
    check.private(twin)
    for name in check.accelerate_children:
        # The patched forward's decorator has loaded these children's offloaded weights already;
        # HF's forward calling the child (before 5.15: `self.conv1d(x)`) through accelerate's
        # wrapper would offload them again, under the decomposed forward's feet.
        child = twin._modules.get(name)
        if child is not None and getattr(child, "_hf_hook", None) is not None:
            child.__dict__.pop("forward", None)
    try:
        devices = [x.device] if x.device.type != "cpu" else []
        with (
            torch.inference_mode(False),
            torch.no_grad(),
            torch.random.fork_rng(devices=devices, device_type=x.device.type),
        ):
            ref, ref_state = _hf_with_state(twin, check, x)
            states = []
            handle = twin.state.register_forward_hook(lambda m, a, out: states.append(out))
            out = check.route(check.ours)(twin, x)
            handle.remove()
    except Exception as e:
        raise SelfCheckError(
            f"gdn_intervene self-check of {cls.__name__}: {_release()}: running the two forwards on a "
            f"{list(x.shape)} slice failed: {type(e).__name__}: {e}. {_HINT}"
        ) from e
    problems = []
    if not torch.equal(out, ref):
        problems.append(f"outputs differ (max abs diff {_maxdiff(out, ref)})")
    if ref_state is None:
        problems.append("HF's forward did not call its chunk kernel where expected, so its state could not be read")
    elif not states or not torch.equal(states[-1], ref_state):
        problems.append(f"final states differ (max abs diff {_maxdiff(states[-1], ref_state) if states else 'n/a'})")
    if problems:
        raise SelfCheckError(
            f"gdn_intervene self-check of {cls.__name__} on {_release()}: the decomposed forward does not "
            f"reproduce HF's forward bit for bit on a {list(x.shape)} {x.dtype} slice on {x.device}: "
            f"{'; '.join(problems)}. {_HINT}"
        )


_HINT = (
    f"This transformers release changed the GDN code (tested: transformers >={_compat.TESTED['transformers'][0]}, "
    f"newest tested {_compat.TESTED['transformers'][1]}); install a tested release or report it. "
    f"Set {ENV}=1 (or patch(..., selfcheck=False)) to skip the check at your own risk."
)


def _release() -> str:
    import transformers

    return f"transformers {transformers.__version__}"


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {list(a.shape)} vs {list(b.shape)}"
    return f"{(a.double() - b.double()).abs().max().item():.3g}"


# Per-module call-hook dicts of torch.nn.Module, each with the dicts of per-hook flags keyed
# by the same ids (absent names are skipped).
_HOOK_DICTS = (
    ("_forward_hooks", ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
    ("_forward_pre_hooks", ("_forward_pre_hooks_with_kwargs",)),
    ("_backward_hooks", ()),
    ("_backward_pre_hooks", ()),
)
# Hooks that are part of how the model computes, not observers: torch's tensor parallelism
# (`distribute_module` gathers a colwise_gather_output projection in a forward hook),
# transformers' and accelerate's. They stay on the twin; every other hook (user code, pyvene,
# gdn_intervene.intervene) is left out.
_INFRASTRUCTURE = ("torch.", "transformers.", "accelerate.")


def _infrastructure(hook) -> bool:
    fn = getattr(hook, "func", hook)  # functools.partial
    return (getattr(fn, "__module__", None) or "").startswith(_INFRASTRUCTURE)


def _twin(module: nn.Module) -> nn.Module:
    """A shallow copy of `module` and its children: parameters, buffers and instance
    attributes shared, call hooks and nnsight controllers left out. accelerate's instance
    forwards are kept (they load offloaded weights, and call the original's undecorated
    forward, which fires no hook)."""
    twin = object.__new__(type(module))
    d = twin.__dict__
    d.update(module.__dict__)
    for hooks, flags in _HOOK_DICTS:
        if hooks in d:
            kept = OrderedDict((i, h) for i, h in d[hooks].items() if _infrastructure(h))
            d[hooks] = kept
            for f in flags:
                if f in d:
                    d[f] = OrderedDict((i, v) for i, v in d[f].items() if i in kept)
    d["training"] = False  # no dropout; the caller's RNG is forked around the check
    d["_modules"] = {k: (None if m is None else _twin(m)) for k, m in module._modules.items()}
    for k, m in module._modules.items():  # children also kept in the instance dict (a fast path)
        if m is not None and d.get(k) is m:
            d[k] = d["_modules"][k]
    _compat.strip_nnsight(twin)
    return twin


def _hf_with_state(twin: nn.Module, check: Check, x: torch.Tensor):
    """HF's forward on `twin` inside HF's kernel routing, with its chunk kernel asked for (and
    giving us) the final state."""
    seen = []

    def capture(kernel):
        def chunk(*args, **kwargs):
            kwargs["output_final_state"] = True
            o, S = kernel(*args, **kwargs)
            seen.append(S)
            return o, S

        return chunk

    # HF's routing built here from HF's class, not taken from the patched class, so a forward
    # that misses HF's routing cannot agree with it by construction.
    hf_route = _compat.kernels.kernel_router(check.hf_class)
    out = hf_route(_compat.redirect_chunk_kernel(twin, check.hf, capture, check.chunk_kernel))(twin, x)
    return out, (seen[-1] if seen else None)
