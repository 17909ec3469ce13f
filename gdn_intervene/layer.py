"""The decomposed GDN forward (one mixin for every family) and the public handle of a patched layer.

`hookable_class(HFClass)` builds (once) `Hookable<HFClass>(GDNMixin, HFClass)`. Its forward is
HF's, with every meaningful value passed through a named site (see `sites.SITES`); the kernels
are HF's own module-level functions, so the numbers are HF's. `GDNLayer(module)` (or
`gdn_intervene.gdn_layer(model, i)`) answers what every tool asks of a patched layer: its family,
HF class, convention, kernels and their routes, and where its `state` site fires in this call.
"""

from __future__ import annotations

import contextlib
import threading
import types
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from . import _compat, recurrence, replay, selfcheck
from .families import Family, cut_qkv, family_for
from .hooking import scope
from .modules import CausalConv, SiteValueError, Tap, listened
from .sites import TAP_SITES, Owner, StateFiring, site, state_firings

__all__ = ["GDNLayer", "GDNMixin", "HubKernelWarning", "NativeFallbackWarning", "hookable_class", "is_patched"]


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


_FIRING = threading.local()  # .now: {layer module: the StateFiring its `state` site is firing}


class GDNMixin:
    """Mixed in front of an HF GDN class. Attributes added per instance (removed by unpatch):
    one module per site in `TAP_SITES`, plus `native_cached`, `state_positions`,
    `_gdn_beta_x2` and `_gdn_dims`. What other modules need of it they ask `GDNLayer`."""

    _gdn_family: Family
    _gdn_hf_class: type
    _gdn_norm: str
    _gdn_convention: _compat.Convention  # how HF's forward of this class calls kernels and cache
    _gdn_out: str
    _gdn_check: selfcheck.Check  # how the class proves itself against HF's forward
    _GDN_ATTRS = ("native_cached", "state_positions", "_gdn_beta_x2", "_gdn_dims")

    def __init__(self, *args, **kwargs):  # used when a model is built patched (patch_on_load)
        super().__init__(*args, **kwargs)
        self._gdn_install()

    def _gdn_install(self, native_cached: bool = False) -> None:
        clash = [s.name for s in TAP_SITES if s.name in self.__dict__ or s.name in self._modules]
        if clash:
            raise RuntimeError(f"{type(self).__name__} already has attributes {clash}; cannot add sites")
        fam, conv = self._gdn_family, self._gdn_convention
        for s in TAP_SITES:
            if s.name == "conv":
                module = CausalConv(
                    s.name, self.layer_idx, fam.parent, self._gdn_hf_class.__module__, self.activation,
                    self.conv_kernel_size, fam.conv_trims_always, conv.trim_with_cache, conv.conv_helper,
                    conv.conv_keywords,
                )  # fmt: skip
            else:
                module = Tap(s.name, self.layer_idx, fam.parent)
            self.add_module(s.name, module)
            # Also in the instance dict: `self.beta` then skips nn.Module.__getattr__ on the hot
            # path. nn.Module.__setattr__ of another module under the name drops this entry.
            self.__dict__[s.name] = module
        self.native_cached = native_cached
        self.state_positions: Sequence[int] | None = None
        attr = fam.neg_eigval_attr
        self._gdn_beta_x2 = bool(attr and getattr(self, attr))
        self._gdn_dims = fam.dims(self)  # (key_dim, value_dim, head_k_dim, head_v_dim)

    def _gdn_uninstall(self) -> None:
        for s in TAP_SITES:
            del self._modules[s.name]
            self.__dict__.pop(s.name, None)
        for name in self._GDN_ATTRS:
            self.__dict__.pop(name, None)

    @property
    def gdn_heads(self) -> tuple[int, int]:
        """(HK, HV): key and value head counts, in any family."""
        key_dim, value_dim, head_k_dim, head_v_dim = self._gdn_dims
        return key_dim // head_k_dim, value_dim // head_v_dim

    def __setattr__(self, name, value):
        # kernels' `kernelize` (transformers 5.25 on: at load, and again on train()/eval() when
        # the mode changes) binds a hub layer's forward to the instance, or, under accelerate's
        # hooks, to `_old_forward`; every site would go silent. Keep the decomposed forward, say so.
        if name in ("forward", "_old_forward") and replaces_forward(self, value):
            warn_hub_forward(self, value, "kept the decomposed forward instead")
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
            return super().forward(
                hidden_states, attention_mask=attention_mask, **{self._gdn_convention.cache_kw: cache}, **kwargs
            )

        x = _compat.hf_function(self._gdn_hf_class, "apply_mask_to_padding_states")(hidden_states, attention_mask)
        B, T, _ = x.shape
        fam, conv = self._gdn_family, self._gdn_convention
        key_dim, value_dim, head_k_dim, head_v_dim = self._gdn_dims
        # read before the conv writes the cache, as HF does
        step = _compat.cache_step(cache, self.layer_idx, T, fam.conv_asks_recording, conv, kwargs.get("cache_position"))
        conv_kw, chunk_kw, recurrent_kw = _compat.route_kwargs(
            conv, kwargs, fam.packed_kwarg, self._gdn_hf_class.__name__
        )

        p = fam.project(self, x)
        qkv = self._pre_conv(p, B, T)
        z, b, a = p.z, p.b, p.a
        del p  # HF frees the projections after the conv; `p` would hold them through the kernel
        qkv = self.conv(
            qkv, self.conv1d.weight, self.conv1d.bias, cache=step.cache, conv_state=step.conv_state, decode=step.conv_decode,
            conv1d=self.conv1d, **conv_kw,
        )  # fmt: skip
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

        if conv.gqa_in_layer:  # releases whose kernel expects q, k repeated to HV heads
            q, k = _compat.repeat_heads(q, k, v.shape[2])
        o = self.recurrence(recurrence.delta_rule(q, k, v, g, beta, self._gdn_call(step, chunk_kw, recurrent_kw)))
        if fam.late_z is not None:  # KDA, OLMo-Hybrid: projected after the recurrence, in HF's order
            z = fam.late_z(self, x)
        gate = self.gate(z)
        o = self._hf_site("norm", lambda m: m(o, gate), like=o)
        return self._hf_site("out_proj", lambda m: m(o.reshape(B, T, -1)), like=hidden_states, dtype=o.dtype)

    def _native_reason(self, cache) -> str | None:
        if self.native_cached:
            return "native_cached=True was requested"
        return _compat.cache_gap(cache)

    def _gdn_call(self, step, chunk_kwargs: dict, recurrent_kwargs: dict) -> recurrence.Call:
        """How this call runs its kernels: HF's kernel objects, the split positions of this
        thread's `state_at`, whether the final state is asked for (HF asks only with a cache; so
        do we, unless a split or the `state` site needs it: asking does not change o). Under
        activation checkpointing a recomputation runs as its forward ran (`replay`)."""
        fam, conv = self._gdn_family, self._gdn_convention
        chunk, recurrent = _compat.delta_rule_kernels(self, fam.kernels, conv, self._gdn_hf_class)
        positions = tuple(self.state_positions or ())
        heard = listened(self.state)
        want = step.cache is not None or bool(positions) or heard
        if positions or heard or replay.active():
            positions, want = replay.decision((self, "plan"), (positions, want), ((), step.cache is not None))
        return recurrence.Call(
            chunk, recurrent, step, positions, want, chunk_kwargs, recurrent_kwargs, self._fire_state, fam.state_fp32,
            conv.keeps_states, fam.packed_kwarg, self.layer_idx,
        )  # fmt: skip

    def _fire_state(self, S: torch.Tensor, firing: StateFiring) -> torch.Tensor:
        """The `state` site on S [B, HV, K, V]; while its hooks run, `GDNLayer.firing` says which
        state it is (`firing`)."""
        if not listened(self.state):
            return self.state(S)
        now = _FIRING.__dict__.setdefault("now", {})
        before = now.get(self)
        now[self] = firing
        try:
            return self.state(S)
        finally:
            if before is None:
                del now[self]
            else:
                now[self] = before

    def _hf_site(self, name: str, call, like: torch.Tensor, dtype=None):
        """An HF-owned site (norm, out_proj): `call(module)` is HF's module applied to its input. A
        hook may replace its output: checked as ours are (shape of `like`, dtype `dtype` or
        like's, device). Under checkpointing a recomputation replays the forward's output."""
        module = getattr(self, self._gdn_norm if name == "norm" else self._gdn_out)
        heard = listened(module)
        if heard or replay.active():
            out = replay.site_call(module, heard, lambda: call(module), lambda: call(module.forward))
        else:
            out = call(module)
        if not (isinstance(out, torch.Tensor) and out.shape == like.shape and out.dtype == (dtype or like.dtype)
                and out.device == like.device):  # fmt: skip
            got = (
                f"{list(out.shape)} {out.dtype} on {out.device}"
                if isinstance(out, torch.Tensor)
                else f"a {type(out).__name__}"
            )
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
            if not any(map(listened, sites)) and not replay.active():
                return p.qkv
            p = p._replace(**dict(zip("qkv", cut_qkv(self, p.qkv))))
        q, k, v = (site(x) for site, x in zip(sites, (p.q, p.k, p.v)))
        if p.qkv is not None and q is p.q and k is p.k and v is p.v:
            return p.qkv
        return torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], dim=-1)

    def __reduce_ex__(self, protocol):
        # The patched class is built at run time, so pickle (copy.deepcopy, torch.save) cannot
        # name it: name the HF class instead and rebuild the patched one from it.
        return (_rebuild, (self._gdn_hf_class,), *super().__reduce_ex__(protocol)[2:])


# ------------------------------------------------------------------ the public handle


class _ThreadPositions(Sequence):
    """A layer's `state_positions` while `state_at` blocks are open on it: the positions of the
    innermost block of the thread whose forward runs (`scope.acting_thread`), else those the
    layer had before (`before`)."""

    def __init__(self, before):
        self.before = before
        self.by_thread: dict[int, list[tuple[int, ...]]] = {}

    def _now(self) -> tuple[int, ...]:
        stack = self.by_thread.get(scope.acting_thread())
        return stack[-1] if stack else tuple(self.before or ())

    def __getitem__(self, i):
        return self._now()[i]

    def __len__(self) -> int:
        return len(self._now())

    def __iter__(self):
        return iter(self._now())

    def __eq__(self, other) -> bool:  # compares as the tuple it reads as (not hashable then)
        return self._now() == other

    def __repr__(self) -> str:
        return f"_ThreadPositions({self._now()!r} in this thread)"


class GDNLayer:
    """The handle of one patched GDN layer: what every tool asks of it, instead of reading the
    module's private attributes.

        h = gi.gdn_layer(model, 0)
        h.family.name, h.hf_class.__name__, h.heads   # "qwen3_5", "Qwen3_5GatedDeltaNet", (HK, HV)
        h.site("beta")                                # the site's module
        h.state_firings(12)                           # when `state` fires in a call of 12 tokens, now
        h.firing                                      # inside a `state` hook: which state this is

    `state_firings` and `firing` follow the one rule in `sites.state_firings`."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module):
        if not is_patched(module):
            raise ValueError(
                f"{type(module).__name__} is not a patched GDN layer (gdn_intervene.patch the model first)"
            )
        self.module = module

    def __repr__(self) -> str:
        return f"GDNLayer({self.index}: {self.family.name}, {self.hf_class.__name__})"

    @property
    def index(self) -> int:
        """The layer index HF gives the module (`layer_idx`)."""
        return self.module.layer_idx

    @property
    def family(self) -> Family:
        return self.module._gdn_family

    @property
    def hf_class(self) -> type:
        """The HF class the patched class derives from."""
        return self.module._gdn_hf_class

    @property
    def convention(self) -> _compat.Convention:
        """How HF's forward of this class calls its kernels and cache (`_compat.Convention`)."""
        return self.module._gdn_convention

    @property
    def parent(self) -> str:
        """The decoder layer's attribute holding the module: `linear_attn`, or `self_attn` (KDA)."""
        return self.module._gdn_family.parent

    @property
    def heads(self) -> tuple[int, int]:
        """(HK, HV): key and value head counts."""
        return self.module.gdn_heads

    def site(self, name: str) -> nn.Module:
        """The module of site `name` (HF-owned sites resolved per family: norm -> o_norm, ...)."""
        s = site(name)
        return getattr(self.module, self.family.hf_names[name] if s.owner is Owner.HF else name)

    # --- the state: where it fires

    @property
    def state_positions(self) -> tuple[int, ...]:
        """The positions this thread's forwards split the prefill at (`state_at`), () for none."""
        return tuple(self.module.state_positions or ())

    def state_firings(self, T: int, *, keep: int = 0, decode: bool = False) -> tuple[StateFiring, ...]:
        """When `state` fires in a call of T tokens of this thread, now (`sites.state_firings`
        with this layer's split positions; `keep`: intermediate states the cache keeps)."""
        return state_firings(T, positions=self.state_positions, keep=keep, decode=decode)

    @property
    def firing(self) -> StateFiring | None:
        """Inside a hook of the `state` site: which state fires (its position in the call, and
        whether it is the call's final one); None elsewhere."""
        return _FIRING.__dict__.get("now", {}).get(self.module)

    @contextlib.contextmanager
    def split_after(self, positions: tuple[int, ...]) -> Iterator[None]:
        """Split this thread's prefills after `positions` (checked ints) for the block (what
        `state_at` does per layer); restores the layer's setting on exit, also on error."""
        m, me = self.module, threading.get_ident()
        with scope.LOCK:
            if not isinstance(m.state_positions, _ThreadPositions):
                m.state_positions = _ThreadPositions(m.state_positions)
            per = m.state_positions
            per.by_thread.setdefault(me, []).append(positions)
        try:
            yield
        finally:
            with scope.LOCK:
                per.by_thread[me].pop()
                if not per.by_thread[me]:
                    del per.by_thread[me]
                if not per.by_thread and m.__dict__.get("state_positions") is per:
                    m.state_positions = per.before

    def initial_state(self, cache, T: int, cache_position=None) -> torch.Tensor | None:
        """S_0 [B, HV, K, V]: the recurrent state a call of T tokens with `cache` starts from (a
        cached continuation), as the layer decides it; None without one."""
        if cache is None or _compat.cache_gap(cache) is not None:
            return None
        fam = self.family
        return _compat.cache_step(
            cache, self.index, T, fam.conv_asks_recording, self.convention, cache_position
        ).initial_state

    def self_check(self, hidden_states: torch.Tensor) -> None:
        """Compare this layer's decomposed forward with HF's, bit for bit, on the first row and
        `selfcheck.TOKENS` tokens of its input `hidden_states` [B, T, D], now; raises
        `selfcheck.SelfCheckError` on a difference. Records nothing (`selfcheck.verify`)."""
        selfcheck.verify(self.module, self.module._gdn_check, hidden_states)

    # --- kernels

    def kernels(self) -> dict:
        """{name: the kernel object HF's forward of this layer calls under that name}: the
        family's delta-rule kernels and the conv kernels."""
        return _compat.kernel_objects(self.module, self.family.kernels, self.convention, self.hf_class)

    def kernel_routes(self, device_type: str | None = None) -> dict[str, str]:
        """{kernel name: what it runs for inputs on `device_type` (default the layer's
        parameters' device)}: "torch", "fla", "causal-conv1d", "hub (repo)" or "unknown (...)"."""
        if device_type is None:
            p = next(self.module.parameters(), None)
            device_type = p.device.type if p is not None else "cpu"
        return {name: _compat.kernel_route(obj, device_type) for name, obj in self.kernels().items()}


def is_patched(module) -> bool:
    return isinstance(module, GDNMixin)


def replaces_forward(module, value) -> bool:
    """Whether `value` is a forward bound to `module` other than its class's (a hub kernel's)."""
    return (
        isinstance(value, types.MethodType) and value.__self__ is module and value.__func__ is not type(module).forward
    )


def warn_hub_forward(module, value, what: str, layers: str | None = None) -> None:
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


def _private_twin(twin) -> None:
    """The self-check's twin runs without the caller's per-call settings (`state_at` splits)."""
    if "state_positions" in twin.__dict__:
        twin.__dict__["state_positions"] = None


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
    check = selfcheck.Check(
        GDNMixin.forward,
        _compat.undecorated(cls.forward),
        fam.kernels[0],
        route,
        hf,
        fam.accelerate_children,
        _private_twin,
    )
    forward = selfcheck.first_call(_compat.deprecate_cache_params(GDNMixin.forward, hf), check)
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
            "_gdn_check": check,
            "__module__": __name__,
            "__qualname__": f"Hookable{cls.__name__}",
            "__doc__": f"{cls.__name__} with a decomposed, hookable forward (gdn_intervene).",
        },
    )
    _CLASSES[cls] = new
    return new
