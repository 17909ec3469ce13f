"""Every version-sensitive question, one file per concern:

- `versions`: which transformers / nnsight / pyvene releases are tested; the refusal of others.
- `conventions`: how each HF GDN class's forward calls its kernels, cache and decorators
  (`Convention`, read from that forward, never from a version number); the layout check.
- `kernels`: which kernel objects HF's forward calls on an instance (module-level functions,
  instance attributes, kernels' per-instance routing) and what each runs on a device.
- `caches`: one cache API over every release's linear-attention cache (`Step`, views).
- `hooks`: forward wrappers other libraries put on a module (accelerate, nnsight).
- `checkpoint`: where a forward runs relative to torch's activation checkpointing.

A new transformers release is one new value in `Convention` (with the release that showed
it) and, where its cache differs, one view in `caches`.
"""

from . import checkpoint
from .caches import CACHE_API, Step, cache_gap, cache_step, cache_view
from .conventions import (
    CHUNK_KERNEL_NAMES,
    Convention,
    cache_kwarg,
    convention,
    deprecate_cache_params,
    force_accelerate_hooks,
    kernelized_wrapper,
    layout_gap,
    model_kwargs,
    repeat_heads,
    route_kwargs,
    undecorated,
    wrapped_chain,
)
from .hooks import NNSIGHT_STATE, rebind_forwards, remove_forward_hooks_where, strip_nnsight
from .kernels import (
    CONV_KERNELS,
    HELPERS,
    check_hf_module,
    conv_kernels,
    delta_rule_kernels,
    hf_function,
    hf_module_function,
    kernel_objects,
    kernel_route,
    kernel_router,
    redirect_chunk_kernel,
    torch_conv,
)
from .versions import (
    RUNTIME_CHECKED,
    TESTED,
    UnsupportedVersionError,
    check_version,
    install_hint,
    install_spec,
    modeling_module,
    parse_version,
)

# Everything the package reads as `_compat.<name>`.
__all__ = [
    "CACHE_API",
    "CHUNK_KERNEL_NAMES",
    "CONV_KERNELS",
    "Convention",
    "HELPERS",
    "NNSIGHT_STATE",
    "RUNTIME_CHECKED",
    "Step",
    "TESTED",
    "UnsupportedVersionError",
    "cache_gap",
    "checkpoint",
    "cache_kwarg",
    "cache_step",
    "cache_view",
    "check_hf_module",
    "check_version",
    "conv_kernels",
    "convention",
    "delta_rule_kernels",
    "deprecate_cache_params",
    "force_accelerate_hooks",
    "hf_function",
    "hf_module_function",
    "install_hint",
    "install_spec",
    "kernel_objects",
    "kernel_route",
    "kernel_router",
    "kernelized_wrapper",
    "layout_gap",
    "model_kwargs",
    "modeling_module",
    "parse_version",
    "rebind_forwards",
    "redirect_chunk_kernel",
    "remove_forward_hooks_where",
    "repeat_heads",
    "route_kwargs",
    "strip_nnsight",
    "torch_conv",
    "undecorated",
    "wrapped_chain",
]
