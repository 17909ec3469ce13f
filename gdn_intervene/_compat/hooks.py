"""Forward wrappers other libraries install on a module (accelerate, nnsight), and hook removal."""

from __future__ import annotations

import types


def remove_forward_hooks_where(module, predicate) -> None:
    """Remove the forward (pre-)hooks of `module` whose function satisfies `predicate`, with the
    bookkeeping torch keeps beside them (private dicts: `_forward_hooks_with_kwargs`, ...)."""
    for hooks, extra in (
        (module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called)),
        (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
    ):
        for hid in [h for h, fn in hooks.items() if predicate(fn)]:
            hooks.pop(hid)
            for d in extra:
                d.pop(hid, None)


def rebind_forwards(module, old_forward=None) -> None:
    """After a class swap, point every forward wrapper installed on the instance at the new
    class's forward.

    - accelerate's `add_hook_to_module` (device_map dispatch, CPU/disk offload) keeps the bound
      method it wrapped in `module._old_forward`; left alone, the old class's forward would keep
      running and no site would fire.
    - kernels' `kernelize` (0.18) binds the class's own forward on the instance where it maps
      no kernel (its fallback); left alone, that old forward would shadow the new class's. It is
      dropped (the new class's forward then runs), as kernels 0.19 drops it itself.
    - nnsight 0.8 wraps a module once, keeping the (unbound) forward it runs in
      `module.__dict__["__nnsight__"].body`. `old_forward` defaults to any base class's forward
      (the HF class after `patch`); bodies nnsight did not take from a class are left alone.
    """
    bound = module.__dict__.get("forward")
    if isinstance(bound, types.MethodType) and bound.__self__ is module and bound.__func__ is not type(module).forward:
        if bound.__func__ is old_forward or (
            old_forward is None and any(vars(c).get("forward") is bound.__func__ for c in type(module).__mro__[1:])
        ):
            del module.__dict__["forward"]
    if "_old_forward" in module.__dict__:
        module._old_forward = type(module).forward.__get__(module)
    state = module.__dict__.get("__nnsight__")
    if state is None or state.original is type(module).forward:
        return
    if old_forward is None:
        inherited = any(vars(c).get("forward") is state.original for c in type(module).__mro__[1:])
    else:
        inherited = state.original is old_forward
    if inherited:
        state.body = state.original = type(module).forward
        state.sourced, state.compiled = False, None  # `.source` rebuilds from the new body


NNSIGHT_STATE = "__nnsight__"  # nnsight 0.8: per-module state; its controller sits in `forward`


def strip_nnsight(twin) -> None:
    """Remove nnsight 0.8's per-module controller from a private twin (`twin.__dict__` is a
    copy), keeping the body nnsight wraps when that body is not the class's forward."""
    state = twin.__dict__.pop(NNSIGHT_STATE, None)
    if state is None:
        return
    twin.__dict__.pop("forward", None)
    body = getattr(state, "original", None)
    if body is not None and body is not getattr(type(twin), "forward", None):
        twin.__dict__["forward"] = types.MethodType(body, twin)
