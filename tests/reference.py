"""Independent references for intervention tests.

`kernel_edit` runs the UNPATCHED model with HF's own forward and edits the arguments or
results of the GDN kernel call of one layer, by swapping the kernel functions in HF's modeling
module for the duration. It shares no code with gdn_intervene's decomposed forward.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

import torch
from torch import nn

# Gated DeltaNet and Kimi Delta Attention kernels; a modeling module binds one pair.
KERNELS = (
    "torch_chunk_gated_delta_rule",
    "torch_recurrent_gated_delta_rule",
    "chunk_kimi_delta_attention",
    "recurrent_kimi_delta_attention",
)
INSTANCE_KERNELS = ("chunk_gated_delta_rule", "recurrent_gated_delta_rule")
# HF's delta-rule layer classes, by name ending (KDA: Kimi/Bailing `...DeltaAttention`,
# GLM-5-Next `...LinearAttention`).
LAYER_SUFFIXES = ("GatedDeltaNet", "DeltaAttention", "TextLinearAttention")


def unrepeat(x, heads: int):
    """A kernel argument q or k as the `q`/`k` sites hold it: releases before 5.23 repeat the
    key heads to the value heads in the layer (each head r times, consecutively) before the
    kernel; the sites hold them before that. [B, T, HV, K] -> [B, T, heads, K] (a view)."""
    return x if x.shape[2] == heads else x[:, :, :: x.shape[2] // heads]


def hf_gdn(model: nn.Module, layer_idx: int) -> nn.Module:
    for m in model.modules():
        if type(m).__name__.endswith(LAYER_SUFFIXES) and m.layer_idx == layer_idx:
            return m
    raise LookupError(layer_idx)


@contextlib.contextmanager
def kernel_edit(
    model: nn.Module,
    layer_idx: int,
    *,
    before: Callable[[dict], None] | None = None,
    after: Callable[[tuple], tuple] | None = None,
):
    """before(kwargs) edits the kernel's arguments (q, k, v, g, beta, ...) in place;
    after((o, S)) returns replacement results. Only layer `layer_idx`'s calls are edited."""
    target = hf_gdn(model, layer_idx)
    ns = vars(sys.modules[type(target).__module__])
    active = [False]
    originals = {name: ns[name] for name in KERNELS if name in ns}

    def wrap(fn):
        def kernel(q, k, v, **kw):
            if not active[0]:
                return fn(q, k, v, **kw)
            kw = dict(q=q, k=k, v=v, **kw)
            if before:
                before(kw)
            out = fn(kw.pop("q"), kw.pop("k"), kw.pop("v"), **kw)
            return after(out) if after else out

        return kernel

    # Releases before 5.15 bind the kernels to the instance in __init__ (`self.chunk_gated_delta_rule`).
    bound = {n: target.__dict__[n] for n in INSTANCE_KERNELS if callable(target.__dict__.get(n))}
    h1 = target.register_forward_pre_hook(lambda *a: active.__setitem__(0, True))
    h2 = target.register_forward_hook(lambda *a: active.__setitem__(0, False))
    for name, fn in originals.items():
        ns[name] = wrap(fn)
    for name, fn in bound.items():
        target.__dict__[name] = wrap(fn)
    try:
        yield
    finally:
        ns.update(originals)
        target.__dict__.update(bound)
        h1.remove()
        h2.remove()


def cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor a linear-attention cache layer holds: conv and recurrent states, the token
    count, the kept history (in order), detached copies."""
    out = []
    for layer in cache.layers:
        if not hasattr(layer, "cumulative_length_linear"):
            continue
        out.append(layer.cumulative_length_linear.clone())
        for i in range(layer.number_of_states):
            for d in (layer.conv_states, layer.recurrent_states):
                if d[i] is not None:
                    out.append(d[i].detach().clone())
    return out
