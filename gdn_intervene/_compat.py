"""Every version-sensitive question lives here: which transformers / nnsight / pyvene releases
we test, how HF's GDN code is reached (its kernels, masking helper, decorators), and which
cache API a cached forward needs.
"""

from __future__ import annotations

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
    """Why the decomposed forward cannot serve `cache` (None if it can)."""
    missing = [n for n in CACHE_API if not callable(getattr(cache, n, None))]
    if missing:
        return f"cache type {type(cache).__name__} lacks {', '.join(missing)}"
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
