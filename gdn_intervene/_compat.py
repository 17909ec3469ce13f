"""Every version-sensitive question lives here: which transformers / nnsight / pyvene releases
we test, how HF's GDN code is reached (its kernels, masking helper, decorators), and which
cache API a cached forward needs.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from types import ModuleType
from typing import Any

__all__ = [
    "TESTED",
    "UnsupportedVersionError",
    "check_version",
    "hf_namespace",
    "CACHE_API",
    "cache_gap",
    "force_accelerate_hooks",
    "deprecate_cache_params",
    "rebind_wrapped_forward",
]

# package -> (lowest tested, first untested). Keep in step with pyproject.toml.
TESTED: dict[str, tuple[str, str]] = {
    "transformers": ("5.24.0", "5.25.0"),
    "nnsight": ("0.8.1", "0.9.0"),
    "pyvene": ("0.1.8", "0.1.9"),
}
_SKIP_ENV = "GDN_INTERVENE_SKIP_VERSION_CHECK"


class UnsupportedVersionError(RuntimeError):
    """A dependency is outside the tested range."""


def _parse(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def check_version(package: str, version: str | None = None) -> None:
    """Raise `UnsupportedVersionError` if `package` is outside the tested range.

    Set GDN_INTERVENE_SKIP_VERSION_CHECK=1 to proceed at your own risk.
    """
    if version is None:
        version = importlib.import_module(package).__version__
    lo, hi = TESTED[package]
    if not (_parse(lo) <= _parse(version) < _parse(hi)) and not os.environ.get(_SKIP_ENV):
        raise UnsupportedVersionError(
            f"gdn_intervene is tested with {package} >={lo},<{hi}; found {package} {version}. "
            f"Install a tested release, or set {_SKIP_ENV}=1 to try anyway."
        )


def hf_namespace(cls: type) -> dict[str, Any]:
    """Globals of the modeling file that defines an HF GDN class.

    The native forward calls module-level functions (`torch_chunk_gated_delta_rule`,
    `torch_recurrent_gated_delta_rule`, `causal_conv1d_fn`, `causal_conv1d_update`,
    `apply_mask_to_padding_states`) that transformers binds to flash-linear-attention /
    causal-conv1d when installed. We look them up in the same namespace at call time, so both
    forwards always run the same kernels, even if someone rebinds them later.
    """
    module: ModuleType = sys.modules[cls.__module__]
    missing = [n for n in KERNELS if n not in vars(module)]
    if missing:
        raise UnsupportedVersionError(
            f"{cls.__name__}: {cls.__module__} no longer defines {missing}; this transformers release "
            f"changed the GDN code (tested: transformers >={TESTED['transformers'][0]},<{TESTED['transformers'][1]})."
        )
    return vars(module)


KERNELS = (
    "torch_chunk_gated_delta_rule",
    "torch_recurrent_gated_delta_rule",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "apply_mask_to_padding_states",
)

# The transformers 5.x cache methods the decomposed cached forward calls.
CACHE_API = ("get_conv_state", "get_recurrent_state", "update_conv_state", "update_recurrent_state", "is_recording_past")


def cache_gap(cache: Any) -> str | None:
    """Why the decomposed forward cannot serve `cache` (None if it can); decided per type."""
    return _cache_type_gap(type(cache))


@functools.lru_cache(maxsize=None)
def _cache_type_gap(cls: type) -> str | None:
    missing = [n for n in CACHE_API if not callable(getattr(cls, n, None))]
    if missing:
        return f"cache type {cls.__name__} lacks {', '.join(missing)}"
    return None


def _decorators():
    from transformers.integrations.accelerate import force_accelerate_hooks as fah
    from transformers.utils.deprecation import deprecate_kwarg

    return fah, deprecate_kwarg


def force_accelerate_hooks(name: str):
    """HF's decorator: the forward reads `self.conv1d.weight` without calling conv1d, so
    accelerate's offload hooks of that child must be fired by hand."""
    return _decorators()[0](name)


def deprecate_cache_params(fn):
    """Accept the pre-5.x keyword `cache_params` as HF's GDN forward does."""
    return _decorators()[1]("cache_params", "5.40.0", new_name="cache")(fn)


def rebind_wrapped_forward(module) -> None:
    """After a class swap, point forward wrappers installed on the instance at the new class's
    forward. accelerate's `add_hook_to_module` (device_map dispatch, CPU/disk offload) keeps
    the bound method it wrapped in `module._old_forward`; left alone, the old class's forward
    would keep running and no site would fire."""
    if "_old_forward" in module.__dict__:
        module._old_forward = type(module).forward.__get__(module)


# --- nnsight integration (gdn_intervene.nnsight) ---


def pipeline_class(task: str | None) -> type | None:
    """The pipeline class of a transformers task, or None if unknown.

    transformers 5.24 lists it as a dotted string in `check_task(task)[1]["impl"]`; nnsight
    0.8.1 reads class flags (`_load_tokenizer`, ...) off that entry, finds none on a string, and
    so its lazy build loads no tokenizer ("Impossible to guess which tokenizer to use")."""
    from transformers.pipelines import check_task

    try:
        impl = check_task(task)[1]["impl"]
    except Exception:  # unknown or unset task: let nnsight decide
        return None
    if isinstance(impl, str):
        module, _, name = impl.rpartition(".")
        impl = getattr(importlib.import_module(module), name)
    return impl


def rebind_nnsight_body(module, old_forward=None) -> None:
    """After a class swap, point nnsight's controller at the new class's forward.

    nnsight 0.8 wraps a module once, keeping the (unbound) forward it runs in
    `module.__dict__["__nnsight__"].body`; a module wrapped before `patch` would keep running
    HF's forward, and no site would fire. `old_forward` defaults to any base class's forward
    (the HF class after `patch`). Bodies nnsight did not take from a class are left alone."""
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


# --- pyvene integration (gdn_intervene.pyvene) ---


def wrap_pyvene(wrappers: dict) -> None:
    """Replace functions of pyvene 0.1.8's `pyvene.models.intervenable_base`, once each:
    `{name: make}` sets `name` there to `make(original)`. `IntervenableModel` calls
    `get_module_hook`, `get_dimension_by_component` and `remove_forward_hooks` through that
    module's globals (star-imported from `modeling_utils`), so this is where they are reached."""
    import pyvene.models.intervenable_base as base

    for name, make in wrappers.items():
        original = getattr(base, name)
        if not getattr(original, "_gdn_wrapped", False):
            new = make(original)
            new._gdn_wrapped = True
            setattr(base, name, new)
