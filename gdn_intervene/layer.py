"""The decomposed GDN forward: one mixin for every family.

`hookable_class(HFClass)` builds (once) `Hookable<HFClass>(GDNMixin, HFClass)`. Its forward
is HF's, with every meaningful value passed through a named site (see `sites.SITES`). The
kernels are HF's own module-level functions, so the numbers are HF's.
"""

from __future__ import annotations

import types
import warnings
from typing import Sequence

import torch

from . import _compat, selfcheck
from .families import Family, cut_qkv, family_for
from .modules import CausalConv, SiteValueError, Tap, listened
from ._positions import check_positions
from .sites import TAP_SITES

__all__ = ["GDNMixin", "HubKernelWarning", "NativeFallbackWarning", "hookable_class", "is_patched", "check_positions"]


class NativeFallbackWarning(UserWarning):
    """A cached call ran HF's native forward: the sites did not fire for it."""


class HubKernelWarning(UserWarning):
    """A whole-layer hub kernel (kernels' `kernelize`) was set aside for a patched GDN layer."""


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


class _Sigmoid(torch.autograd.Function):
    """`b.sigmoid()` that saves its input, not its output, for backward (same numbers, same
    gradient): autograd's sigmoid saves the output, which is the `beta` site's value, so an
    in-place edit of beta would break `backward()`."""

    @staticmethod
    def forward(ctx, b):
        ctx.save_for_backward(b)
        return b.sigmoid()

    @staticmethod
    def backward(ctx, grad):
        (b,) = ctx.saved_tensors
        return torch.ops.aten.sigmoid_backward(grad, b.sigmoid())


def _sigmoid(b: torch.Tensor) -> torch.Tensor:
    return _Sigmoid.apply(b) if torch.is_grad_enabled() and b.requires_grad else b.sigmoid()


class GDNMixin:
    """Mixed in front of an HF GDN class. Attributes added per instance (removed by unpatch):
    one module per site in `TAP_SITES`, plus `native_cached`, `state_positions`,
    `_gdn_beta_x2` and `_gdn_dims`."""

    _gdn_family: Family
    _gdn_hf_class: type
    _gdn_norm: str
    _gdn_convention: _compat.Convention  # how HF's forward of this class calls kernels and cache
    _gdn_out: str
    _GDN_ATTRS = ("native_cached", "state_positions", "_gdn_beta_x2", "_gdn_dims")

    def __init__(self, *args, **kwargs):  # used when a model is built patched (patch_on_load)
        super().__init__(*args, **kwargs)
        self._gdn_install()

    def _gdn_install(self, native_cached: bool = False) -> None:
        clash = [s.name for s in TAP_SITES if s.name in self.__dict__ or s.name in self._modules]
        if clash:
            raise RuntimeError(f"{type(self).__name__} already has attributes {clash}; cannot add sites")
        for s in TAP_SITES:
            if s.name == "conv":
                module = CausalConv(
                    s.name,
                    self.layer_idx,
                    self._gdn_family.parent,
                    self._gdn_hf_class.__module__,
                    self.activation,
                    self.conv_kernel_size,
                    self._gdn_family.conv_trims_always,
                    self._gdn_convention.trim_with_cache,
                    self._gdn_convention.conv_helper,
                    self._gdn_convention.conv_keywords,
                )
            else:
                module = Tap(s.name, self.layer_idx, self._gdn_family.parent)
            self.add_module(s.name, module)
            # Also in the instance dict: `self.beta` then skips nn.Module.__getattr__ on the hot
            # path. nn.Module.__setattr__ of another module under the name drops this entry.
            self.__dict__[s.name] = module
        self.native_cached = native_cached
        self.state_positions: tuple[int, ...] | None = None
        attr = self._gdn_family.neg_eigval_attr
        self._gdn_beta_x2 = bool(attr and getattr(self, attr))
        self._gdn_dims = self._gdn_family.dims(self)  # (key_dim, value_dim, head_k_dim, head_v_dim)

    @property
    def gdn_heads(self) -> tuple[int, int]:
        """(HK, HV): key and value head counts, in any family."""
        key_dim, value_dim, head_k_dim, head_v_dim = self._gdn_dims
        return key_dim // head_k_dim, value_dim // head_v_dim

    def _gdn_uninstall(self) -> None:
        for s in TAP_SITES:
            del self._modules[s.name]
            self.__dict__.pop(s.name, None)
        for name in self._GDN_ATTRS:
            self.__dict__.pop(name, None)

    def __setattr__(self, name, value):
        # kernels' `kernelize` (transformers 5.25 on: at load, and again on train()/eval() when
        # the mode changes) binds a hub layer's forward to the instance, or, under accelerate's
        # hooks, to `_old_forward`; every site would go silent. Keep the decomposed forward, say so.
        if name in ("forward", "_old_forward") and _replaces_forward(self, value):
            _warn_hub_forward(self, value, "kept the decomposed forward instead")
            return
        super().__setattr__(name, value)

    def __delattr__(self, name):
        if name in self._modules:
            self.__dict__.pop(name, None)  # the instance-dict entry of a site (see _gdn_install)
        super().__delattr__(name)

    def forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None, **kwargs) -> torch.Tensor:
        """[B, T, D] -> [B, T, D], exactly as HF's forward, through the sites."""
        if cache is not None and (reason := self._native_reason(cache)) is not None:
            _warn_native(reason)
            return super().forward(hidden_states, attention_mask=attention_mask, **{self._gdn_convention.cache_kw: cache}, **kwargs)

        x = _compat.hf_function(self._gdn_hf_class, "apply_mask_to_padding_states")(hidden_states, attention_mask)
        B, T, _ = x.shape
        fam, conv = self._gdn_family, self._gdn_convention
        key_dim, value_dim, head_k_dim, head_v_dim = self._gdn_dims
        # read before the conv writes the cache, as HF does
        step = _compat.cache_step(cache, self.layer_idx, T, fam.conv_asks_recording, conv, kwargs.get("cache_position"))
        conv_kw, chunk_kw, recurrent_kw = _compat.route_kwargs(conv, kwargs, fam.packed_kwarg, self._gdn_hf_class.__name__)

        p = fam.project(self, x)
        qkv = self._pre_conv(p, B, T)
        z, b, a = p.z, p.b, p.a
        del p  # HF frees the projections after the conv; `p` would hold them through the kernel
        qkv = self.conv(
            qkv, self.conv1d.weight, self.conv1d.bias, cache=step.cache, conv_state=step.conv_state, decode=step.conv_decode,
            conv1d=self.conv1d, **conv_kw,
        )
        q, k, v = (qkv.narrow(-1, s, n) for s, n in ((0, key_dim), (key_dim, key_dim), (2 * key_dim, value_dim)))
        q = self.q(q.reshape(B, T, -1, head_k_dim))
        k = self.k(k.reshape(B, T, -1, head_k_dim))
        v = self.v(v.reshape(B, T, -1, head_v_dim))

        if fam.late_gates is not None:  # KDA, OLMo-Hybrid: projected after the conv, in HF's order
            b, a = fam.late_gates(self, x)
        beta = _sigmoid(self.beta_logit(b))
        beta = self.beta(beta * 2.0 if self._gdn_beta_x2 else beta)
        g = self.decay(fam.decay(self, self.decay_logit(a), x.dtype))  # GDN [B, T, HV], KDA [B, T, HV, K]
        del a, b  # HF's forward drops the gate inputs here (KDA's a is [B, T, HV, K]: held, it raised the peak)

        o = self.recurrence(self._delta_rule(q, k, v, g, beta, step, chunk_kw, recurrent_kw))
        if fam.late_z is not None:  # KDA, OLMo-Hybrid: projected after the recurrence, in HF's order
            z = fam.late_z(self, x)
        o = self._hf_site("norm", getattr(self, self._gdn_norm)(o, self.gate(z)), o)
        out = getattr(self, self._gdn_out)(o.reshape(B, T, -1))
        return self._hf_site("out_proj", out, hidden_states, dtype=o.dtype)

    def _native_reason(self, cache) -> str | None:
        if self.native_cached:
            return "native_cached=True was requested"
        return _compat.cache_gap(cache)

    def _hf_site(self, name: str, out, like: torch.Tensor, dtype=None):
        """HF-owned sites (norm, out_proj) are HF's modules: a hook may replace their output, so
        check it as ours are checked (shape of `like`, dtype `dtype` or like's, device)."""
        if not (
            isinstance(out, torch.Tensor)
            and out.shape == like.shape
            and out.dtype == (dtype or like.dtype)
            and out.device == like.device
        ):
            got = f"{list(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
            raise SiteValueError(
                f"site {self._gdn_family.parent}.{name} of layer {self.layer_idx}: expected a tensor {list(like.shape)} "
                f"{dtype or like.dtype} on {like.device}, received {got}"
            )
        return out

    def _pre_conv(self, p, B: int, T: int) -> torch.Tensor:
        """The `*_pre_conv` sites, then the conv input [B, T, C]. A fused projection goes to the
        conv itself (no copy) while its slices come back from the sites as they went in (edits in
        place land in it); it is not even cut while nobody listens. Otherwise the conv input is
        the concatenation of the sites' outputs (a listener gets its own copy, so its output is
        in the autograd graph)."""
        sites = (self.q_pre_conv, self.k_pre_conv, self.v_pre_conv)
        if p.qkv is not None:
            if not any(map(listened, sites)):
                return p.qkv
            p = p._replace(**dict(zip("qkv", cut_qkv(self, p.qkv))))
        q, k, v = (site(x) for site, x in zip(sites, (p.q, p.k, p.v)))
        if p.qkv is not None and q is p.q and k is p.k and v is p.v:
            return p.qkv
        return torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], dim=-1)

    def _delta_rule(self, q, k, v, g, beta, step, chunk_kwargs: dict, recurrent_kwargs: dict) -> torch.Tensor:
        """Runs HF's kernels in HF's sequence (recurrent for a cached decode step; else chunked,
        then, where the cache keeps N intermediate states, N single-token recurrent steps) with
        the keyword arguments HF passes them (`_compat.route_kwargs`), fires the `state` site on
        each state the call keeps (see `Fires.PER_SPLIT`) and writes them to the cache.

        q, k [B, T, HK, K]; v [B, T, HV, V]; beta [B, T, HV]; g <= 0, [B, T, HV] (GDN) or
        [B, T, HV, K] (KDA) -> o [B, T, HV, V].
        """
        fam, conv = self._gdn_family, self._gdn_convention
        chunk, recurrent = _compat.delta_rule_kernels(self, fam.kernels, conv)
        if conv.gqa_in_layer:  # releases whose kernel expects q, k repeated to HV heads
            q, k = _compat.repeat_heads(q, k, v.shape[2])
        # HF asks for the final state only with a cache; so do we, unless the `state` site needs
        # it (asking does not change o).
        want = step.cache is not None or bool(self.state_positions) or listened(self.state)
        common = dict(output_final_state=want, use_qk_l2norm_in_kernel=True)
        S0 = step.initial_state
        if step.recurrent_decode:
            o, S = recurrent(q, k, v, g=g, beta=beta, initial_state=S0, **common, **recurrent_kwargs)
            S = written = self.state(S)
        elif conv.keeps_states:
            o, written = self._kept_delta_rule(q, k, v, g, beta, step, common, chunk_kwargs, recurrent_kwargs, chunk, recurrent)
        else:
            o, written = self._chunk(q, k, v, g, beta, S0, dict(common, **chunk_kwargs), chunk, fire_final=True, T_call=q.shape[1])
        if step.cache is not None:
            if fam.state_fp32 and not conv.keeps_states:  # 5.25 on: cast where HF casts (_kept_delta_rule)
                written = written.to(torch.float32)
            step.cache.update_recurrent_state(written, self.layer_idx)
        return o

    def _kept_delta_rule(self, q, k, v, g, beta, step, common, chunk_kwargs, recurrent_kwargs, chunk, recurrent):
        """5.25 on: the chunk kernel on the first T - N positions (even none), then N recurrent
        steps, each of whose states fires `state` and is kept (the cache gets the list, or the
        chunk's final state where N = 0), exactly HF's op sequence (tensor_split, cat): other
        ops would change the last bits of the parameter gradients.
        -> (o [B, T, HV, V], the state or list of states to write)."""
        fam, N = self._gdn_family, step.keep
        split = q.shape[1] - N
        (cq, sq), (ck, sk), (cv, sv), (cb, sb), (cg, sg) = (torch.tensor_split(x, [split], dim=1) for x in (q, k, v, beta, g))
        o, S = self._chunk(
            cq, ck, cv, cg, cb, step.initial_state, dict(common, **chunk_kwargs), chunk, fire_final=N == 0, T_call=q.shape[1]
        )
        if fam.state_fp32 and S is not None:
            S = S.to(torch.float32)
        outs, kept = [o], []
        step_kwargs = dict(recurrent_kwargs)
        if fam.packed_kwarg:
            step_kwargs.pop("cu_seqlens", None)  # HF popped it into the chunk call
        for i in range(N):
            o_i, S = recurrent(
                sq[:, i : i + 1], sk[:, i : i + 1], sv[:, i : i + 1], g=sg[:, i : i + 1], beta=sb[:, i : i + 1],
                initial_state=S, output_final_state=True, use_qk_l2norm_in_kernel=True, **step_kwargs,
            )
            S = self.state(S)
            outs.append(o_i)
            kept.append(S.to(torch.float32) if fam.state_fp32 else S)
        return torch.cat(outs, dim=1), (kept if kept else S)

    def _chunk(self, q, k, v, g, beta, S, kwargs: dict, chunk, fire_final: bool, T_call: int):
        """The chunk kernel over the first T of the call's `T_call` positions (HF runs the rest,
        if any, step by step); with `state_positions`, segment by segment, split after each
        listed position, each segment starting from the previous one's (possibly replaced)
        final state. `state` fires after each listed position below T and, if `fire_final`, on
        the final state. -> (o [B, T, HV, V], final state)."""
        T = q.shape[1]
        if not self.state_positions:
            o, S = chunk(q, k, v, g=g, beta=beta, initial_state=S, **kwargs)
            # S is None where nothing asked for it: a listener added by another thread after
            # `want` was decided does not see this call (its hooks skip other threads anyway)
            return o, (self.state(S) if fire_final and S is not None else S)
        if kwargs.get("cu_seqlens") is not None or kwargs.get("cu_seq_lens_q") is not None:
            raise ValueError(f"layer {self.layer_idx}: state_positions cannot split packed sequences (cu_seqlens)")
        _split_bounds(self.state_positions, T_call, self.layer_idx)  # every position inside the call
        listed = {p for p in self.state_positions if p < T}
        bounds = [0] + [p + 1 for p in sorted(listed) if p + 1 < T] + [T]
        outs = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            o, S = chunk(q[:, s:e], k[:, s:e], v[:, s:e], g=g[:, s:e], beta=beta[:, s:e], initial_state=S, **kwargs)
            if e - 1 in listed or (e == T and fire_final):
                S = self.state(S)
            outs.append(o)
        return torch.cat(outs, dim=1), S

    def __reduce_ex__(self, protocol):
        # The patched class is built at run time, so pickle (copy.deepcopy, torch.save) cannot
        # name it: name the HF class instead and rebuild the patched one from it.
        return (_rebuild, (self._gdn_hf_class,), *super().__reduce_ex__(protocol)[2:])


def _replaces_forward(module, value) -> bool:
    """Whether `value` is a forward bound to `module` other than its class's (a hub kernel's)."""
    return isinstance(value, types.MethodType) and value.__self__ is module and value.__func__ is not type(module).forward


def _warn_hub_forward(module, value, what: str, layers: str | None = None) -> None:
    """One warning line: a whole-layer hub kernel replaced (or tried to replace) the forward of
    a patched GDN layer (`layers`: which ones, default `module`'s). Python's warning filter shows
    a line once per call site and text, so re-kernelizing 18 layers says it once."""
    kernel = getattr(value.__func__, "__qualname__", repr(value))
    repo = module.__dict__.get("_kernel_repo")
    device = next((p.device for p in module.parameters()), "?")
    warnings.warn(
        f"gdn_intervene: a whole-layer hub kernel ({kernel}{f' from {repo}' if repo else ''}) for "
        f"{module._gdn_hf_class.__name__} on {device} would bypass every site of {layers or 'the GDN layers'}; "
        f"{what} (HF's own layer forward, decomposed). Unpatch to run the hub kernel.",
        HubKernelWarning,
        stacklevel=4,
    )


def _rebuild(hf_class: type):
    cls = hookable_class(hf_class)
    return cls.__new__(cls)


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
    found = family_for(cls)
    if found is None:
        raise ValueError(f"{cls.__name__} is not a supported GDN class")
    fam, hf = found
    if (gap := _compat.layout_gap(hf, fam.layout_attrs, fam.layout_since)) is not None:
        raise _compat.UnsupportedVersionError(gap + ".")
    _compat.check_hf_module(hf, fam.kernels)
    # HF's own kernel routing (5.25 on) around ours, so every kernel call reaches the kernel
    # object HF's forward would reach on that instance (a hub kernel after kernelize, fla, torch).
    route = _compat.kernel_router(hf)
    forward = selfcheck.first_call(
        _compat.deprecate_cache_params(GDNMixin.forward, hf),
        ours=GDNMixin.forward,
        hf=_compat.undecorated(cls.forward),
        chunk_kernel=fam.kernels[0],
        route=route,
    )
    forward = route(_compat.force_accelerate_hooks(list(fam.accelerate_children))(forward))
    new = type(
        f"Hookable{cls.__name__}",
        (GDNMixin, cls),
        {
            "forward": forward,
            "_gdn_family": fam,
            "_gdn_hf_class": hf,
            "_gdn_norm": fam.hf_names["norm"],
            "_gdn_out": fam.hf_names["out_proj"],
            "_gdn_convention": _compat.convention(hf, fam.kernels[0]),
            "__module__": __name__,
            "__qualname__": f"Hookable{cls.__name__}",
            "__doc__": f"{cls.__name__} with a decomposed, hookable forward (gdn_intervene).",
        },
    )
    _CLASSES[cls] = new
    return new


def is_patched(module) -> bool:
    return isinstance(module, GDNMixin)
