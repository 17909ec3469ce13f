"""The parameter-free site modules a patched GDN layer routes its values through.

A site's output is the value: read it with a forward hook (nnsight `.output`, pyvene), or
replace it by returning another tensor from the hook, or edit it in place. A replaced or edited
value must keep its shape, dtype and device and stay finite; anything else is a
`SiteValueError` that names the site, never a broadcast.

A site nobody listens to (no hooks, no instance `forward` wrapper of nnsight or accelerate, no
global hooks) is skipped entirely: calling it costs one check, not an `nn.Module` call. Under
activation checkpointing a recomputation replays what the forward's site produced and runs no
hook (`gdn_intervene.replay`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from . import _compat, replay
from .sites import site

__all__ = ["SiteValueError", "Tap", "CausalConv", "listened", "own_storage", "value_layout_grad"]


class SiteValueError(ValueError):
    """A site's output was replaced by a value of the wrong type, shape, dtype or device, or
    by a non-finite value."""


_GLOBAL_HOOKS = (
    _torch_module._global_forward_hooks,
    _torch_module._global_forward_pre_hooks,
    _torch_module._global_backward_hooks,
    _torch_module._global_backward_pre_hooks,
)  # torch mutates these dicts in place, never rebinds them


def listened(module: nn.Module) -> bool:
    """Whether anything can observe `module`'s call: its own hooks, an instance `forward`
    (nnsight's controller, accelerate's wrapper, a user's patch) or torch's global hooks."""
    d = module.__dict__
    return bool(
        d["_forward_hooks"]
        or d["_forward_pre_hooks"]
        or d["_backward_hooks"]
        or d["_backward_pre_hooks"]
        or "forward" in d
        or any(_GLOBAL_HOOKS)
    )


class _SiteModule(nn.Module):
    """Base of every site: knows its name and layer, checks replaced or edited outputs."""

    def __init__(self, site_name: str, layer_idx: int, parent: str = "linear_attn"):
        super().__init__()
        self.site_name = site_name
        self.layer_idx = layer_idx
        self.parent = parent  # the decoder layer's attribute holding the GDN module (KDA: self_attn)

    def _where(self) -> str:
        return f"site {self.parent}.{self.site_name} of layer {self.layer_idx}"

    def _expect(self, out: Any, like: torch.Tensor) -> None:
        """Raise `SiteValueError` unless `out` is a finite tensor like `like` (shape, dtype, device)."""
        if not (
            isinstance(out, torch.Tensor)
            and out.shape == like.shape
            and out.dtype == like.dtype
            and out.device == like.device
        ):
            got = (
                f"{list(out.shape)} {out.dtype} on {out.device}"
                if isinstance(out, torch.Tensor)
                else f"a {type(out).__name__}"
            )
            raise SiteValueError(
                f"{self._where()}: expected a tensor {list(like.shape)} {like.dtype} on {like.device}, received {got}"
            )
        bad = ~torch.isfinite(out.detach())
        if bool(bad.any()):
            where = bad.nonzero()[0].tolist()
            value = out.detach()[tuple(where)].item()
            at = f"position {where[1]}" if site(self.site_name).has_time else f"head {where[1]}"
            raise SiteValueError(
                f"{self._where()}: the new value is not finite ({value} at batch row {where[0]}, {at}). "
                "The chunk kernel mixes every position of a 64-token chunk, so a NaN or inf would "
                "silently corrupt earlier positions too. To forget the state at position p, split the "
                "prefill with gdn_intervene.state_at(model, [p - 1]) and set the `state` site to zero "
                "there (README, 'Resetting the state')."
            )

    def extra_repr(self) -> str:
        return f"site={self.site_name!r}"


def _version(x: torch.Tensor) -> int | None:
    """`x`'s version counter, or None for an inference tensor (`torch.inference_mode()`), which
    has none: its value is then always checked, edited or not."""
    return None if x.is_inference() else x._version


class Tap(_SiteModule):
    """Identity site: `forward(x) -> x`, output shape = input shape."""

    def __init__(self, site_name: str, layer_idx: int, parent: str = "linear_attn"):
        super().__init__(site_name, layer_idx, parent)
        self.saved_by_producer = site(site_name).saved_by_producer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        heard = listened(self)
        if not heard and not replay.active():
            return x
        return replay.site_call(self, heard, lambda: self._heard(x), lambda: x)

    def _heard(self, x: torch.Tensor) -> torch.Tensor:
        """The site called as a module (hooks, nnsight, pyvene), its new value checked."""
        x = own_storage(x, self.saved_by_producer)
        version = _version(x)
        out = super().__call__(x)
        if out is not x or version is None or out._version != version:  # replaced, or edited in place
            self._expect(out, x)
            if out is not x or version is not None:
                replay.refuse_reentrant(self._where(), self.training)
        return value_layout_grad(out)


class CausalConv(_SiteModule):
    """Causal depthwise conv + activation over the concatenated q, k, v, as HF computes it.

    `forward(qkv [B, T, C], weight [C, 1, W], bias, *, cache, conv_state, decode) -> [B, T, C]`.
    A decode step (`decode`, decided once per layer call) uses the per-step update kernel,
    which advances the conv cache in place; other calls write the cache first and run the full
    conv kernel. The kernels are HF's (`_compat.conv_kernels`), looked up by module name at call
    time (a module name, unlike the module's globals, survives `deepcopy` and `pickle`).
    `trim_always`: HF slices the output to the last T positions on every call, not only with a
    cache (OLMo-Hybrid); the slice is a no-op on values but not on gradient layout.
    `trim_with_cache`: HF slices on every cached call (`_compat.Convention.trim_with_cache`).
    `keywords`: HF passes the conv kernels weight, bias and activation by keyword.
    `helper`: HF runs its modeling module's shared `causal_conv1d_forward(conv1d, x, cache, i)`
    (5.25 on), which decides the decode step, counts the layer's tokens and trims; we call it.
    """

    def __init__(
        self,
        site_name: str,
        layer_idx: int,
        parent: str,
        hf_module: str,
        activation: str,
        kernel_size: int,
        trim_always: bool,
        trim_with_cache: bool = True,
        helper: bool = False,
        keywords: bool = False,
    ):
        super().__init__(site_name, layer_idx, parent)
        self.hf_module = hf_module
        self.activation = activation
        self.kernel_size = kernel_size
        self.trim_always = trim_always
        self.trim_with_cache = trim_with_cache
        self.helper = helper
        self.keywords = keywords
        self.wrote_cache = False
        self._produced = None

    def forward(
        self, qkv, weight, bias=None, *, cache=None, conv_state=None, decode=False, conv1d=None, **kwargs
    ) -> torch.Tensor:
        out = own_storage(
            self._conv(qkv, weight, bias, cache=cache, conv_state=conv_state, decode=decode, conv1d=conv1d, **kwargs)
        )
        self._produced = (out, _version(out))  # lets __call__ tell a hook's edit from our output
        return out

    def _conv(
        self, qkv, weight, bias=None, *, cache=None, conv_state=None, decode=False, conv1d=None, **kwargs
    ) -> torch.Tensor:
        T = qkv.shape[1]
        x = qkv.transpose(1, 2)
        if self.helper:  # HF's own helper, the kernel object HF calls (kernelize may replace it)
            helper = _compat.hf_module_function(self.hf_module, "causal_conv1d_forward")
            x = helper(conv1d, x, cache, self.layer_idx, activation=self.activation, **kwargs)
            self.wrote_cache = cache is not None
            return x.transpose(1, 2)
        conv_fn, conv_update = _compat.conv_kernels(self.hf_module)
        w = weight.squeeze(1)
        if decode:
            if self.keywords:
                x = conv_update(x, conv_state, weight=w, bias=bias, activation=self.activation)
            else:
                x = conv_update(x, conv_state, w, bias, self.activation)
        else:
            if cache is not None:
                x = cache.update_conv_state(x, self.layer_idx, conv_kernel_size=self.kernel_size)
            if conv_fn is None:  # releases that run nn.Conv1d without causal-conv1d
                x = _compat.torch_conv(x, weight, bias)
            elif self.keywords:
                x = conv_fn(x, weight=w, bias=bias, activation=self.activation, **kwargs)
            else:
                x = conv_fn(x, w, bias, activation=self.activation, **kwargs)
            if self.trim_always or (cache is not None and (self.trim_with_cache or x.shape[-1] != T)):
                x = x[:, :, -T:]  # drop the cached left context, where HF does
        self.wrote_cache = cache is not None
        return x.transpose(1, 2)

    def write_cache(self, qkv, *, cache, conv_state, decode) -> None:
        """What `forward` writes to the conv cache, without the conv: for a call whose forward
        did not run (nnsight `.skip()` with a replacement value)."""
        x = qkv.transpose(1, 2)
        if decode:  # the update kernel rolls the window by one column
            if self.helper:  # and HF's helper counts the token (5.25 on)
                cache.increase_count(self.layer_idx, 0)
            conv_state.copy_(torch.cat([conv_state, x.to(conv_state.dtype)], dim=-1)[:, :, -conv_state.shape[-1] :])
        else:
            cache.update_conv_state(x, self.layer_idx, conv_kernel_size=self.kernel_size)

    def __call__(self, qkv, *args, cache=None, conv_state=None, decode=False, **kwargs) -> torch.Tensor:
        heard = listened(self)
        if not heard and not replay.active():
            return self._conv(qkv, *args, cache=cache, conv_state=conv_state, decode=decode, **kwargs)
        kw = dict(kwargs, cache=cache, conv_state=conv_state, decode=decode)
        return replay.site_call(
            self, heard, lambda: self._heard(qkv, *args, **kw), lambda: self._conv(qkv, *args, **kw)
        )

    def _heard(self, qkv, *args, cache=None, conv_state=None, decode=False, **kwargs) -> torch.Tensor:
        """The conv called as a module (hooks, nnsight, pyvene), its output checked and the cache
        written where a hook skipped the conv (nnsight `.skip()`)."""
        self.wrote_cache = False
        self._produced = None
        try:
            out = super().__call__(qkv, *args, cache=cache, conv_state=conv_state, decode=decode, **kwargs)
        finally:
            produced, self._produced = self._produced, None
        if produced is None or out is not produced[0] or produced[1] is None or out._version != produced[1]:
            self._expect(out, qkv)
            replay.refuse_reentrant(self._where(), self.training)
        if cache is not None and not self.wrote_cache:  # skipped: keep the cache consistent
            self.write_cache(qkv, cache=cache, conv_state=conv_state, decode=decode)
        return value_layout_grad(out)


# ------------------------------------------------------------------ autograd plumbing
#
# Only for a site something listens to: a site nobody listens to passes its value through
# untouched, so the forward and the backward are HF's, bit for bit. (For a listened site the
# gradient's layout may change, and with it the last bits of the parameter gradients that sum
# over positions, such as A_log's and dt_bias's.)


def own_storage(x: torch.Tensor, saved: bool = False) -> torch.Tensor:
    """A value listeners may edit in place or read `.grad` of must own its storage. As a view of
    another value (q, k, v of the conv output; the pre-conv slices of a fused projection) an
    in-place edit would silently change that value too, autograd may refuse the edit, and
    nnsight 0.8.1 reads a batched invoke's gradient by the value's strides and offset in its
    base. Views are copied with their exact strides (gaps included): elementwise kernels take
    their vectorised or scalar paths by layout, so any other layout changes the last bits.
    `saved`: the producer keeps the value for its own backward (`Site.saved_by_producer`): under
    autograd it is copied too, so an in-place edit cannot invalidate that backward."""
    if x._base is None and not (saved and torch.is_grad_enabled() and x.requires_grad):
        return x
    return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=x.device).copy_(x)


class _GradInValueLayout(torch.autograd.Function):
    """Identity whose backward hands upstream the gradient laid out as the value is.

    The kernels transpose their inputs, so the gradient reaching beta, g, q, k, v arrives
    transposed. nnsight 0.8.1 reads a batch slice of a gradient (a second invoke's rows) with
    `as_strided` at the value's own strides, and so read permuted numbers. The output is a view
    made in a custom Function, which must not be edited in place: every later site takes
    `own_storage` of what it is given first."""

    @staticmethod
    def forward(ctx, x):
        ctx.layout = (x.size(), x.stride()) if x._base is None else None
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.layout is None:
            return grad.contiguous()
        size, stride = ctx.layout
        if grad.stride() == stride:
            return grad
        return grad.new_empty_strided(size, stride).copy_(grad)


def value_layout_grad(x: torch.Tensor) -> torch.Tensor:
    """`x`, whose gradient arrives in `x`'s own layout under autograd (see `_GradInValueLayout`)."""
    if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
        return _GradInValueLayout.apply(x)
    return x
