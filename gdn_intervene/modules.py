"""The parameter-free site modules a patched GDN layer routes its values through.

A site's output is the value: read it with a forward hook (nnsight `.output`, pyvene), or
replace it by returning another tensor from the hook. A replacement must keep the value's
shape, dtype and device; anything else is an error that names the site, never a broadcast.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["SiteValueError", "Tap", "CausalConv"]


class SiteValueError(ValueError):
    """A site's output was replaced by a value of the wrong type, shape, dtype or device."""


class _SiteModule(nn.Module):
    """Base of every site: knows its name and layer, checks replaced outputs."""

    def __init__(self, site_name: str, layer_idx: int):
        super().__init__()
        self.site_name = site_name
        self.layer_idx = layer_idx

    def _expect(self, out: Any, like: torch.Tensor) -> None:
        # Only called when a hook returned a new object; in-place edits cannot change shape.
        if (
            isinstance(out, torch.Tensor)
            and out.shape == like.shape
            and out.dtype == like.dtype
            and out.device == like.device
        ):
            return
        got = (
            f"{list(out.shape)} {out.dtype} on {out.device}"
            if isinstance(out, torch.Tensor)
            else f"a {type(out).__name__}"
        )
        raise SiteValueError(
            f"site linear_attn.{self.site_name} of layer {self.layer_idx}: expected a tensor "
            f"{list(like.shape)} {like.dtype} on {like.device}, received {got}"
        )

    def extra_repr(self) -> str:
        return f"site={self.site_name!r}"


class Tap(_SiteModule):
    """Identity site: `forward(x) -> x`, output shape = input shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = super().__call__(x)
        if out is not x:
            self._expect(out, x)
        return out


class CausalConv(_SiteModule):
    """Causal depthwise conv + activation over the concatenated q, k, v, as HF computes it.

    `forward(qkv [B, T, C], weight [C, 1, W], bias, *, cache, conv_state) -> [B, T, C]`.
    Decode steps (T == 1 with a conv state) use the per-step update kernel, which advances
    the conv cache in place; other calls write the cache first and run the full conv kernel.
    The kernels are HF's module-level functions, looked up in `ns` at call time.
    """

    def __init__(self, site_name: str, layer_idx: int, ns: dict, activation: str, kernel_size: int):
        super().__init__(site_name, layer_idx)
        self._ns = ns  # a plain dict: not a submodule, not a parameter
        self.activation = activation
        self.kernel_size = kernel_size

    def forward(self, qkv, weight, bias=None, *, cache=None, conv_state=None, **kwargs) -> torch.Tensor:
        T = qkv.shape[1]
        x = qkv.transpose(1, 2)
        if conv_state is not None and T == 1 and not cache.is_recording_past(self.layer_idx):
            x = self._ns["causal_conv1d_update"](x, conv_state, weight.squeeze(1), bias, self.activation)
        else:
            if cache is not None:
                x = cache.update_conv_state(x, self.layer_idx, conv_kernel_size=self.kernel_size)
            x = self._ns["causal_conv1d_fn"](x, weight.squeeze(1), bias, activation=self.activation, **kwargs)
            if cache is not None:  # drop the cached left context
                x = x[:, :, -T:]
        return x.transpose(1, 2)

    def __call__(self, qkv, *args, **kwargs) -> torch.Tensor:
        out = super().__call__(qkv, *args, **kwargs)
        if not (isinstance(out, torch.Tensor) and out.shape == qkv.shape and out.dtype == qkv.dtype):
            self._expect(out, qkv)
        return out
