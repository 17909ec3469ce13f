"""The decomposed GDN forward: one mixin for every family.

`hookable_class(HFClass)` builds (once) `Hookable<HFClass>(GDNMixin, HFClass)`. Its forward
is HF's, with every meaningful value passed through a named site (see `sites.SITES`). The
kernels are HF's own module-level functions, so the numbers are HF's.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F

from . import _compat
from .families import Family, family_of
from .modules import CausalConv, Tap
from .sites import TAP_SITES

__all__ = ["GDNMixin", "NativeFallbackWarning", "check_positions", "hookable_class", "is_patched"]


class NativeFallbackWarning(UserWarning):
    """A cached call ran HF's native forward: the sites did not fire for it."""


_WARNED: set[str] = set()


def _warn_native(reason: str) -> None:
    if reason not in _WARNED:  # once per reason and process
        _WARNED.add(reason)
        warnings.warn(
            f"gdn_intervene: a cached call runs HF's native GDN forward ({reason}); "
            "the linear_attn sites do not fire on this path.",
            NativeFallbackWarning,
            stacklevel=3,
        )


class GDNMixin:
    """Mixed in front of an HF GDN class. Attributes added per instance (removed by unpatch):
    one module per site in `TAP_SITES`, plus `native_cached`, `state_positions` and
    `_gdn_beta_x2`."""

    _gdn_family: Family
    _gdn_ns: dict
    _gdn_norm: str
    _gdn_out: str
    _GDN_ATTRS = ("native_cached", "state_positions", "_gdn_beta_x2")

    def __init__(self, *args, **kwargs):  # used when a model is built patched (patch_on_load)
        super().__init__(*args, **kwargs)
        self._gdn_install()

    def _gdn_install(self, native_cached: bool = False) -> None:
        clash = [s.name for s in TAP_SITES if s.name in self.__dict__ or s.name in self._modules]
        if clash:
            raise RuntimeError(f"{type(self).__name__} already has attributes {clash}; cannot add sites")
        for s in TAP_SITES:
            if s.name == "conv":
                module = CausalConv(s.name, self.layer_idx, self._gdn_ns, self.activation, self.conv_kernel_size)
            else:
                module = Tap(s.name, self.layer_idx)
            self.add_module(s.name, module)
        self.native_cached = native_cached
        self.state_positions: tuple[int, ...] | None = None
        attr = self._gdn_family.neg_eigval_attr
        self._gdn_beta_x2 = bool(attr and getattr(self, attr))

    def _gdn_uninstall(self) -> None:
        for s in TAP_SITES:
            del self._modules[s.name]
        for name in self._GDN_ATTRS:
            self.__dict__.pop(name, None)

    def _native_reason(self, cache) -> str | None:
        if self.native_cached:
            return "native_cached=True was requested"
        return _compat.cache_gap(cache)

    def forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None, **kwargs) -> torch.Tensor:
        """[B, T, D] -> [B, T, D], exactly as HF's forward, through the sites."""
        if cache is not None and (reason := self._native_reason(cache)) is not None:
            _warn_native(reason)
            return super().forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)

        x = self._gdn_ns["apply_mask_to_padding_states"](hidden_states, attention_mask)
        B, T, _ = x.shape
        conv_state = S0 = None
        if cache is not None:  # read before the conv writes the cache, as HF does
            conv_state = cache.get_conv_state(self.layer_idx, state_idx=0)
            S0 = cache.get_recurrent_state(self.layer_idx, state_idx=0)

        p = self._gdn_family.project(self, x)
        qkv = self._pre_conv(p, B, T)
        z, b, a = p.z, p.b, p.a
        del p  # HF frees the projections after the conv; `p` would hold them through the kernel
        qkv = self.conv(qkv, self.conv1d.weight, self.conv1d.bias, cache=cache, conv_state=conv_state, **kwargs)
        q, k, v = torch.split(qkv, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = self.q(q.reshape(B, T, -1, self.head_k_dim))
        k = self.k(k.reshape(B, T, -1, self.head_k_dim))
        v = self.v(v.reshape(B, T, -1, self.head_v_dim))

        beta = self.beta_logit(b).sigmoid()
        beta = self.beta(beta * 2.0 if self._gdn_beta_x2 else beta)
        g = self.decay(-self.A_log.float().exp() * F.softplus(self.decay_logit(a).float() + self.dt_bias))

        o = self.recurrence(self._delta_rule(q, k, v, g, beta, S0, cache, kwargs))
        o = getattr(self, self._gdn_norm)(o, self.gate(z))
        return getattr(self, self._gdn_out)(o.reshape(B, T, -1))

    def _pre_conv(self, p, B: int, T: int) -> torch.Tensor:
        """The `*_pre_conv` sites, then the conv input [B, T, C]: the projection itself while the
        sites return its views untouched (no copy), else the concatenation of their outputs."""
        q, k, v = self.q_pre_conv(p.q), self.k_pre_conv(p.k), self.v_pre_conv(p.v)
        if p.qkv is not None and q is p.q and k is p.k and v is p.v:
            return p.qkv
        return torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], dim=-1)

    def _delta_rule(self, q, k, v, g, beta, S0, cache, kwargs) -> torch.Tensor:
        """Runs HF's kernel (recurrent for a cached decode step, chunked otherwise), fires the
        `state` site on each final state and writes the last one to the cache.

        q, k [B, T, HK, K]; v [B, T, HV, V]; g, beta [B, T, HV] -> o [B, T, HV, V].
        """
        T = q.shape[1]
        cu_seqlens = kwargs.pop("cu_seq_lens_q", None)
        # The final state is always requested so the `state` site fires without a cache too;
        # it does not change o.
        common = dict(output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens, **kwargs)
        if S0 is not None and T == 1:
            o, S = self._gdn_ns["torch_recurrent_gated_delta_rule"](q, k, v, g=g, beta=beta, initial_state=S0, **common)
            S = self.state(S)
        elif self.state_positions:
            o, S = self._split_delta_rule(q, k, v, g, beta, S0, common)
        else:
            o, S = self._gdn_ns["torch_chunk_gated_delta_rule"](q, k, v, g=g, beta=beta, initial_state=S0, **common)
            S = self.state(S)
        if cache is not None:
            cache.update_recurrent_state(S, self.layer_idx)
        return o

    def _split_delta_rule(self, q, k, v, g, beta, S, common):
        """Chunk kernel run segment by segment, split after each of `state_positions`; each
        segment starts from the previous segment's (possibly replaced) final state."""
        T = q.shape[1]
        if common["cu_seqlens"] is not None:
            raise ValueError(f"layer {self.layer_idx}: state_positions cannot split packed sequences (cu_seqlens)")
        bounds = _split_bounds(self.state_positions, T, self.layer_idx)
        chunk = self._gdn_ns["torch_chunk_gated_delta_rule"]
        outs = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            o, S = chunk(q[:, s:e], k[:, s:e], v[:, s:e], g=g[:, s:e], beta=beta[:, s:e], initial_state=S, **common)
            S = self.state(S)
            outs.append(o)
        return torch.cat(outs, dim=1), S


def check_positions(positions: Sequence[int], where: str) -> list[int]:
    """Strictly increasing, non-negative ints, or a ValueError that starts with `where`."""
    ps = list(positions)
    if not ps:
        raise ValueError(f"{where}: positions must not be empty")
    if any(isinstance(p, bool) or not hasattr(p, "__index__") for p in ps):
        raise ValueError(f"{where}: positions must be ints; got {ps}")
    ps = [p.__index__() for p in ps]
    if ps[0] < 0:
        raise ValueError(f"{where}: positions must be non-negative token indices; got {ps}")
    if any(b <= a for a, b in zip(ps, ps[1:])):
        raise ValueError(f"{where}: positions must be strictly increasing (sorted, no repeats); got {ps}")
    return ps


def _split_bounds(positions: Sequence[int], T: int, layer_idx: int) -> list[int]:
    """[0, p1+1, p2+1, ..., T]: segment bounds so that a state is taken after each position."""
    ps = check_positions(positions, f"layer {layer_idx}: state")
    if ps[-1] >= T:
        raise ValueError(f"layer {layer_idx}: state positions must lie in [0, {T - 1}] for a call of T={T}, got {ps}")
    return [0] + [p + 1 for p in ps if p + 1 < T] + [T]


_CLASSES: dict[type, type] = {}


def hookable_class(cls: type) -> type:
    """The patched subclass of HF GDN class `cls` (built once, then reused)."""
    if cls in _CLASSES:
        return _CLASSES[cls]
    fam = next((f for c in cls.__mro__ if (f := family_of(c))), None)
    if fam is None:
        raise ValueError(f"{cls.__name__} is not a supported GDN class")
    ns = _compat.hf_namespace(next(c for c in cls.__mro__ if family_of(c)))
    forward = _compat.force_accelerate_hooks("conv1d")(_compat.deprecate_cache_params(GDNMixin.forward))
    new = type(
        f"Hookable{cls.__name__}",
        (GDNMixin, cls),
        {
            "forward": forward,
            "_gdn_family": fam,
            "_gdn_ns": ns,
            "_gdn_norm": fam.hf_names["norm"],
            "_gdn_out": fam.hf_names["out_proj"],
            "__module__": __name__,
            "__doc__": f"{cls.__name__} with a decomposed, hookable forward (gdn_intervene).",
        },
    )
    _CLASSES[cls] = new
    return new


def is_patched(module) -> bool:
    return isinstance(module, GDNMixin)
