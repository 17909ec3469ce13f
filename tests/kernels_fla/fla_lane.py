"""The fla lane's setup and helpers: HF's route to flash-linear-attention's Triton kernels, on a CPU.

transformers 5.25 routes the GDN and KDA kernels through `use_kernel_func_from_hub_with_fallback
(..., "fla")`: fla's function is resolved when the modeling module is imported, and each call
checks the inputs' device against `hub_kernels._PACKAGE_SUPPORTED_DEVICES["fla"]`, a tuple taken at
that import. On a CPU the route needs, before any modeling module (or fla) is imported:

- `TRITON_INTERPRET=1` (triton.jit decides at decoration time whether a kernel is interpreted);
- "cpu" added to that tuple (the device gate), in this process only;

and, at run time, two shims of the interpreter's gaps (no installed file is edited):

- every autotuner runs one config without benchmarking (benchmarking needs a driver: "0 active
  drivers"). The config is the LAST of each kernel's list: in fla 0.6.0's lists that is the one
  with the largest blocks, so the fewest interpreted programs (the KDA forward at T = 70 takes
  6.6 s instead of 13.6 s with the first). Both models of a comparison run the same config;
  `test_fla_route.py` checks the numbers against HF's torch kernels;
- fla's kernel modules get a `range` whose items are ints that also have `.to(dtype)`: compiled
  Triton loop variables are tensors (`i_t.to(tl.int64)` in `fla/ops/common/chunk_delta_h.py`),
  the interpreter hands the loop Python ints.

`setup()` does all of it; `tests/kernels_fla/conftest.py` calls it first thing, and only with
GDN_FLA_LANE=1. `require()` skips a test module, saying why, wherever the lane cannot run
(the main suite, or a process that imported the modeling modules before the setup).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import importlib.util
import os
import pathlib
import sys
from collections.abc import Callable

LANE = os.environ.get("GDN_FLA_LANE") == "1"
COMMAND = "GDN_FLA_LANE=1 python -m pytest -q tests/kernels_fla"
TESTS = pathlib.Path(__file__).resolve().parents[1]

# fla's entry points under HF's GDN / KDA kernels: counted, to prove the route is taken.
FLA_ENTRIES = (
    ("fla.ops.gated_delta_rule.chunk", "chunk_gated_delta_rule_fwd"),
    ("fla.ops.gated_delta_rule.chunk", "chunk_gated_delta_rule_bwd"),
    ("fla.ops.gated_delta_rule.fused_recurrent", "fused_recurrent_gated_delta_rule_fwd"),
    ("fla.ops.kda.chunk", "chunk_kda_fwd"),
    ("fla.ops.kda.chunk", "chunk_kda_bwd"),
    ("fla.ops.kda.fused_recurrent", "fused_recurrent_kda_fwd"),
)
CALLS: collections.Counter = collections.Counter()  # entry name -> calls so far
_FAMILY_MODULES = (
    "qwen3_next", "qwen3_5", "qwen3_5_moe", "olmo_hybrid", "lara_mini", "qwen4_exp", "kimi_linear", "glm5_next",
    "bailing_hybrid",
)  # fmt: skip
_reason: str | None = "tests/kernels_fla/conftest.py did not run"


def setup() -> None:
    """Interpreter, device gate, shims, call counters; sets the reason the lane cannot run, if any."""
    global _reason
    if not LANE:
        _reason = f"the fla lane runs only when asked, in its own process: {COMMAND} (docs/kernels-fla.md)"
        return
    early = sorted(
        m
        for m in sys.modules
        if m == "fla" or any(m.startswith(f"transformers.models.{f}.modeling_") for f in _FAMILY_MODULES)
    )
    if early:
        _reason = (
            f"the fla lane needs its own process ({', '.join(early[:3])} ... imported before its setup: the device "
            f"gate and the interpreter would come too late): {COMMAND}"
        )
        return
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The interpreter runs each kernel program's block ops in numpy on tiny arrays: BLAS threads
    # only add contention (and the lane runs two pytest workers on two cores).
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    # Loud, not a skip: a lane that was asked for and cannot import fla must fail.
    import triton
    from transformers.integrations import hub_kernels
    from triton.runtime import autotuner

    gate = hub_kernels._PACKAGE_SUPPORTED_DEVICES
    if "cpu" not in gate["fla"]:
        gate["fla"] = (*gate["fla"], "cpu")
    if not getattr(autotuner.Autotuner.prune_configs, "_fla_lane", False):
        prune = autotuner.Autotuner.prune_configs

        def one_config(self, kwargs):
            return prune(self, kwargs)[-1:]

        one_config._fla_lane = True
        autotuner.Autotuner.prune_configs = one_config
    import fla.ops.gated_delta_rule  # noqa: F401  (with every kernel module they import)
    import fla.ops.kda  # noqa: F401

    patch_ranges()
    for module, name in FLA_ENTRIES:
        mod = sys.modules[module]
        fn = getattr(mod, name)
        if not getattr(fn, "_fla_lane", False):
            setattr(mod, name, _counted(fn, name))
    _reason = None
    del triton


class _LoopIndex(int):
    """A loop index of an interpreted kernel: an int that also has `.to(dtype)`, as compiled
    Triton loop variables (tensors) do."""

    __slots__ = ()

    def to(self, dtype, *args, **kwargs):
        return int(self)


def _range(*args):
    return map(_LoopIndex, range(*args))


def patch_ranges() -> None:
    """Give every imported fla module the loop-index `range` (idempotent)."""
    for name, mod in list(sys.modules.items()):
        if (name == "fla" or name.startswith("fla.")) and mod is not None and mod.__dict__.get("range") is not _range:
            mod.__dict__["range"] = _range


def _counted(fn, name):
    @functools.wraps(fn)
    def counted(*args, **kwargs):
        CALLS[name] += 1
        return fn(*args, **kwargs)

    counted._fla_lane = True
    return counted


def require() -> None:
    """Skip the calling test module (at import) wherever the lane cannot run, saying why."""
    import pytest

    if _reason is not None:
        pytest.skip(_reason, allow_module_level=True)


@contextlib.contextmanager
def fla_calls():
    """Counts of fla's entry points (`FLA_ENTRIES`) called inside the block: yields a Counter
    filled on exit."""
    before = CALLS.copy()
    got: collections.Counter = collections.Counter()
    try:
        yield got
    finally:
        got.update(CALLS - before)


# ------------------------------------------------------------------ the main suite's helpers


def _root_conftest():
    """tests/conftest.py as a plain module (its helpers; its fixtures are not needed here)."""
    spec = importlib.util.spec_from_file_location("gdn_tests_conftest", TESTS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def helpers():
    """(ids_for, logits, new_cache, view) from tests/conftest.py."""
    root = sys.modules.get("gdn_tests_conftest") or _root_conftest()
    return root.ids_for, root.logits, root.new_cache, root.view


@functools.cache
def pair(name: str):
    """(patched, unpatched) tiny random models of family `name` (tests/models.py), shared per
    process: tests must leave no hooks behind, and must not train them. The patched model has
    run once (its class's first-call self-check, with its own kernel calls, is behind it)."""
    import torch
    from models import build

    import gdn_intervene as gi

    ref = build(name)
    patched = gi.patch(copy.deepcopy(ref))
    with torch.no_grad():
        patched(input_ids=torch.tensor([[3, 4]]))
    return patched, ref


def hf_layer(model, layer_idx: int):
    from reference import hf_gdn

    return hf_gdn(model, layer_idx)


# ------------------------------------------------------------------ a kernel reference with full control


@contextlib.contextmanager
def kernel_around(model, layer_idx: int, around: Callable):
    """Like `reference.kernel_edit`, for the UNPATCHED model: layer `layer_idx`'s delta-rule
    kernel calls become `around(kernel, q, k, v, **kwargs)`, where `kernel` is the object HF's
    forward would have called (on the fla route, fla's kernel behind HF's wrappers). The other
    layers' calls are untouched."""
    from reference import KERNELS, hf_gdn

    target = hf_gdn(model, layer_idx)
    ns = vars(sys.modules[type(target).__module__])
    active = [False]
    originals = {name: ns[name] for name in KERNELS if name in ns}

    def wrap(fn):
        def kernel(q, k, v, **kw):
            return around(fn, q, k, v, **kw) if active[0] else fn(q, k, v, **kw)

        return kernel

    h1 = target.register_forward_pre_hook(lambda *a: active.__setitem__(0, True))
    h2 = target.register_forward_hook(lambda *a: active.__setitem__(0, False))
    for name, fn in originals.items():
        ns[name] = wrap(fn)
    try:
        yield
    finally:
        ns.update(originals)
        h1.remove()
        h2.remove()


def torch_kernel(kernel_object):
    """HF's torch implementation behind a module-level kernel object (kernels' Func around
    `use_kernel_func_from_hub_with_fallback`'s wrapper, which `functools.wraps` the torch
    function): the reference the fla route replaces."""
    fn = kernel_object
    forward = getattr(type(fn), "forward", None)
    if forward is not None and forward.__closure__:
        fn = dict(zip(forward.__code__.co_freevars, (c.cell_contents for c in forward.__closure__)))["func"]
    return fn.__wrapped__
