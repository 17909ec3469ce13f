"""Effective attention, attribution and state tools over a patched model (conveniences over `ops`).

One forward pass of a patched model, with plain forward hooks on the sites, yields every GDN
layer's kernel inputs; `ops` turns them into exact views of the recurrence:

    caps = layer_captures(model, ids)             # {layer: LayerCapture} (also `capture`, its older name)
    M = effective_attention_for(model, ids)       # {layer: LayerAttention}, M [B, HV, T, T]
    att = attribution_for(model, ids, positions=[-1], direction=(yes_id, no_id))
    att.contributions                             # [B, L, HV, R, T]: which source tokens each head read
    with state_at(model, [7, 15]): ...            # split the prefill; the `state` site fires per split
    S = states_at(model, ids, [7, 15])            # {layer: [B, P, HV, K, V]}

Shape letters: B batch, T tokens of the call, HK/HV key/value heads, K/V head dims, D model
width, L selected layers, P state positions, R selected rows / positions, H selected heads.
Gates: beta [B, T, HV]; g the log decay, g <= 0, decay = exp(g): [B, T, HV] per head (GDN) or
[B, T, HV, K] per key channel (KDA). Positions index the tokens of the call as given (left
padding included). Every function here runs the model under `torch.no_grad()` and removes its
hooks on exit, also on error. A `cache=` passed to any of them is never advanced: each call runs on
a deep copy, so repeating a call repeats its numbers. An nnsight model (`gdn_intervene.nnsight.load`)
is analysed through the module it wraps.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from . import _compat, ops
from ._positions import as_positions, check_positions
from .hooking import scope
from .hooking.capture import capture as capture_sites
from .hooking.edit import state_at
from .hooking.locate import as_module, select_layers, site_module
from .layer import GDNLayer

__all__ = [
    "LayerCapture",
    "LayerAttention",
    "layer_captures",
    "capture",
    "effective_attention_for",
    "state_at",
    "states_at",
    "written_values_for",
    "state_decomposition_for",
    "token_contributions",
    "Attribution",
    "attribution_for",
]

Tensor = torch.Tensor
Layers = int | Iterable[int] | None

# the sites a LayerCapture holds, one value each; `state` is kept separately (it may fire
# several times per call)
_CAPTURED = ("q", "k", "v", "beta", "decay", "recurrence", "gate", "norm", "out_proj")


# --------------------------------------------------------------------------- capture


@dataclass
class LayerCapture:
    """The kernel inputs and outputs of one GDN layer in one forward call, as its sites saw them
    (fields named by site).

    q, k: [B, T, HK, K] (pre-L2-norm, pre-GQA).  v: [B, T, HV, V].
    beta: [B, T, HV].  decay: g [B, T, HV] (per head) or [B, T, HV, K] (per channel), the log
        decay, g <= 0, decay = exp(g).
    recurrence: o [B, T, HV, V], the kernel output (before the gated norm).
    gate: z [B, T, HV, V] (the output gate before its activation).  norm: [B, T, HV, V], the gated
        norm's output.  out_proj: y [B, T, D], the layer output.
    states: every `state` firing of the call, in order, each [B, HV, K, V] (one without a
        split; with `state_at`, one per split position, then the final state).
    firings: which state each of `states` is (`sites.StateFiring`: position, final).
    initial_state: S_0 [B, HV, K, V], the cache's recurrent state before the call, or None.
    The older names `g`, `o`, `z`, `normed`, `y` read the same fields.
    """

    layer: int
    q: Tensor
    k: Tensor
    v: Tensor
    beta: Tensor
    decay: Tensor
    recurrence: Tensor
    gate: Tensor
    norm: Tensor
    out_proj: Tensor
    states: tuple
    initial_state: Tensor | None
    firings: tuple = ()

    g = property(lambda self: self.decay, doc="The log decay g (`decay`).")
    o = property(lambda self: self.recurrence, doc="The kernel output o (`recurrence`).")
    z = property(lambda self: self.gate, doc="The output gate z (`gate`).")
    normed = property(lambda self: self.norm, doc="The gated norm's output (`norm`).")
    y = property(lambda self: self.out_proj, doc="The layer output y (`out_proj`).")

    def state_after(self, position: int) -> Tensor:
        """The state [B, HV, K, V] after token `position` of the call, where one was recorded
        (a `state_at` split there, or the final state)."""
        for S, f in zip(self.states, self.firings):
            if f.position == position:
                return S
        have = [f.position for f in self.firings]
        raise KeyError(
            f"layer {self.layer}: no state after position {position} was recorded (recorded: {have}); "
            "split there with gdn_intervene.state_at"
        )

    @property
    def final_state(self) -> Tensor:
        """The state after the call, [B, HV, K, V] (what is written to the cache)."""
        return self.states[-1]

    def effective_attention(
        self, *, heads=None, rows=None, dtype: torch.dtype = torch.float32, max_bytes=None
    ) -> ops.EffectiveAttention:
        """`ops.effective_attention` of this layer: M [B, H, R, T] and the initial-state term."""
        try:
            return ops.effective_attention(
                self.q,
                self.k,
                beta=self.beta,
                g=self.decay,
                heads=heads,
                rows=rows,
                initial_state=self.initial_state,
                dtype=dtype,
                max_bytes=max_bytes,
            )
        except ValueError as e:
            raise ValueError(f"layer {self.layer}: {e}") from None

    def reconstruct(self, ea: ops.EffectiveAttention, *, heads=None) -> Tensor:
        """M v + C for the heads/rows `ea` was computed with: [B, R, H, V] in M's dtype."""
        v = self.v if heads is None else self.v[:, :, _as_list(heads)]
        out = torch.einsum("bhts,bshv->bthv", ea.matrix, v.to(ea.matrix.dtype))
        return out if ea.state_term is None else out + ea.state_term

    def reconstruction_error(self, ea: ops.EffectiveAttention, *, heads=None, rows=None) -> float:
        """||M v + C - o|| / ||o|| over the selected heads and rows (o: the `recurrence` site)."""
        o = self.recurrence if rows is None else self.recurrence[:, _as_list(rows)]
        o = (o if heads is None else o[:, :, _as_list(heads)]).to(ea.matrix.dtype)
        diff = (self.reconstruct(ea, heads=heads) - o).norm()
        return (diff / o.norm().clamp_min(torch.finfo(o.dtype).tiny)).item()

    def written_values(self, *, dtype: torch.dtype = torch.float32) -> Tensor:
        """u [B, T, HV, V]: what each token wrote into the state (`ops.written_values`)."""
        return ops.written_values(
            self.k, self.v, beta=self.beta, g=self.decay, initial_state=self.initial_state, dtype=dtype
        )

    def state_decomposition(self, *, position: int | None = None, dtype: torch.dtype = torch.float32):
        """The state after `position` (default T - 1) as per-token writes (`ops.state_decomposition`)."""
        return ops.state_decomposition(
            self.k,
            self.v,
            beta=self.beta,
            g=self.decay,
            initial_state=self.initial_state,
            position=position,
            dtype=dtype,
        )


def _as_list(idx) -> list:
    return idx.tolist() if isinstance(idx, Tensor) else list(idx)


_CACHE_KWARGS = ("cache", "past_key_values", "cache_params")  # a forward's names for its cache


def _private_caches(kwargs: dict) -> dict:
    """`kwargs` with each cache (`cache=`, `past_key_values=`, `cache_params=`) replaced by a deep
    copy: the forward appends to its cache (a 6-token cache holds 11 after a 5-token call), and
    analysing must not move the caller's. Tensors with autograd history (a prefill run with grad
    enabled), which `copy.deepcopy` refuses, are copied detached; views keep sharing storage."""
    if not any(kwargs.get(k) is not None for k in _CACHE_KWARGS):
        return kwargs
    return {k: _deepcopy_detached(v) if k in _CACHE_KWARGS and v is not None else v for k, v in kwargs.items()}


def _deepcopy_detached(obj):
    memo, seen, todo = {}, set(), [obj]
    while todo:  # pre-seed deepcopy's memo with detached copies of the non-leaf tensors
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, Tensor):
            if x.grad_fn is not None:
                memo[id(x)] = copy.deepcopy(x.detach(), memo)
        elif isinstance(x, dict):
            todo.extend(x.values())
        elif isinstance(x, (list, tuple, set)):
            todo.extend(x)
        elif hasattr(x, "__dict__") and not isinstance(x, type):
            todo.extend(vars(x).values())
    return copy.deepcopy(obj, memo)


def layer_captures(
    model: nn.Module,
    input_ids: Tensor | None = None,
    *,
    layers: Layers = None,
    attention_mask: Tensor | None = None,
    **model_kwargs,
) -> dict:
    """Run `model` once (no grad) and return {layer: LayerCapture} for the chosen GDN layers.

    Built on the core `gdn_intervene.capture` (the sites of `LayerCapture`), plus a pre-hook per
    layer that reads the cache's recurrent state (cloned) just before the layer runs, so a cached
    continuation is described exactly. `model_kwargs` go to the model's forward (e.g.
    `inputs_embeds`, `cache=`, `use_cache=True`); a cache is deep-copied first (`_private_caches`),
    so the caller's is left as it was.
    """
    model = as_module(scope.dispatched(model))  # a lazy nnsight model: its real weights first
    model_kwargs = _private_caches(model_kwargs)
    mods = select_layers(model, layers)
    initial = {}

    def pre(l, module, args, kwargs):
        T = (args[0] if args else kwargs["hidden_states"]).shape[1]
        S0 = GDNLayer(module).initial_state(_compat.cache_kwarg(kwargs), T, kwargs.get("cache_position"))
        initial[l] = None if S0 is None else S0.detach().clone()  # the cache is updated in place after the kernel

    handles = []
    try:
        for l, m in mods.items():
            handles.append(m.register_forward_pre_hook(lambda mod, a, kw, l=l: pre(l, mod, a, kw), with_kwargs=True))
        with capture_sites(model, sites=(*_CAPTURED, "state"), layers=list(mods)) as cache:
            with torch.no_grad():
                model(input_ids=input_ids, attention_mask=attention_mask, **_compat.model_kwargs(model, model_kwargs))
    finally:
        for h in handles:
            h.remove()
    return {l: _layer_capture(cache, l, initial.get(l)) for l in mods}


def _layer_capture(cache, l: int, initial_state) -> LayerCapture:
    missing = [s for s in (*_CAPTURED, "state") if not cache[l, s]]
    if missing:
        raise RuntimeError(
            f"layer {l}: sites {missing} did not fire; was the native forward used "
            "(native_cached=True, or a cache without the linear-attention API)?"
        )
    twice = [s for s in _CAPTURED if len(cache[l, s]) > 1]
    if twice:
        raise RuntimeError(f"layer {l}: sites {twice} fired more than once in one capture (several forward calls?)")
    fields = {s: cache[l, s][0] for s in _CAPTURED}
    return LayerCapture(l, states=tuple(cache[l, "state"]), initial_state=initial_state,
                        firings=tuple(cache.firings(l)), **fields)  # fmt: skip


capture = layer_captures  # its older name (`gdn_intervene.capture` is the core's context manager)


# --------------------------------------------------------------------------- effective attention


class LayerAttention(NamedTuple):
    """Effective attention of one GDN layer.

    matrix: M [B, H, R, T] (H = HV or len(heads), R = T or len(rows)); o = M v + state_term.
    state_term: C [B, R, H, V], the initial state's part of o, or None without a cached state.
    error: ||M v + C - o|| / ||o|| against the `recurrence` site, when `check` was asked, else None.
    """

    matrix: Tensor
    state_term: Tensor | None
    error: float | None


def effective_attention_for(
    model: nn.Module,
    input_ids: Tensor | None = None,
    *,
    layers: Layers = None,
    heads=None,
    rows=None,
    attention_mask: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    max_bytes: float | None = None,
    check: bool | float = False,
    **model_kwargs,
) -> dict:
    """Exact effective attention M of each chosen GDN layer for one run of `model`.

    Runs the patched model once, capturing the `q`, `k`, `beta`, `decay` sites (and `v`,
    `recurrence`, `state`, ...: see `capture`), then calls `ops.effective_attention` per layer:
    o[b, t, h] = sum_s M[b, h, t, s] v[b, s, h] + C[b, t, h], o the kernel output (`recurrence`).

    Args:
        heads: value-head indices (default all).  rows: query positions (default all; use this
            for long inputs: R rows cost O(R T (64 + K)) time and O(R T) memory per head by the
            adjoint row scan, the full M O(T^2 (64 + K)) time and O(T^2) memory).
        dtype: computation dtype of M (float32 default, float64 for ~1e-12 accuracy).
        max_bytes: memory guard passed to ops (default 4 GiB); above it a ValueError names the
            layer and suggests rows=[...].
        check: True computes `error` (relative reconstruction error against the `recurrence`
            site); a float also raises RuntimeError when the error exceeds it.
        model_kwargs: passed to the forward (`cache=` with a prefilled cache gives C).

    Returns:
        {layer: LayerAttention(matrix [B, H, R, T], state_term [B, R, H, V] or None, error)}.
    """
    caps = layer_captures(model, input_ids, layers=layers, attention_mask=attention_mask, **model_kwargs)
    out = {}
    for l, cap in caps.items():
        ea = cap.effective_attention(heads=heads, rows=rows, dtype=dtype, max_bytes=max_bytes)
        err = None
        if check is not False:
            err = cap.reconstruction_error(ea, heads=heads, rows=rows)
            if not isinstance(check, bool) and not err <= check:
                raise RuntimeError(
                    f"layer {l}: M v + C reconstructs the recurrence output with relative error {err:.3g} > {check}"
                )
        out[l] = LayerAttention(ea.matrix, ea.state_term, err)
    return out


# --------------------------------------------------------------------------- states


def _positions(positions) -> tuple:
    """Validate state positions eagerly (an int, a sequence or a 1-D integer tensor): the rule
    the core applies at call time."""
    return tuple(check_positions(positions, "state_at"))


# `state_at` (split each prefill after given positions) is the core's `gdn_intervene.state_at`,
# re-exported here.


def states_at(
    model: nn.Module,
    input_ids: Tensor | None,
    positions,
    layers: Layers = None,
    *,
    attention_mask: Tensor | None = None,
    **model_kwargs,
) -> dict:
    """The recurrent state after each of `positions`: {layer: [B, P, HV, K, V]}.

    Runs the model once (no grad) inside `state_at` and reads the `state` site. Positions count
    the tokens of this call (left padding included); they must lie in [0, T - 1].
    """
    ps = _positions(positions)
    src = input_ids if input_ids is not None else model_kwargs.get("inputs_embeds")
    if src is None:
        raise ValueError("states_at needs input_ids or inputs_embeds")
    T = src.shape[1]
    if ps[-1] >= T:
        raise ValueError(f"positions {list(ps)} out of range for a call of T={T} tokens (valid: 0..{T - 1})")
    with state_at(model, ps, layers) as mods:
        caps = layer_captures(model, input_ids, layers=list(mods), attention_mask=attention_mask, **model_kwargs)
    return {l: torch.stack([cap.state_after(p) for p in ps], dim=1) for l, cap in caps.items()}


def written_values_for(
    model: nn.Module, input_ids: Tensor | None, layer: int, *, dtype: torch.dtype = torch.float32, **kwargs
) -> Tensor:
    """u [B, T, HV, V] of GDN layer `layer` for one run: u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t),
    the value token t actually wrote (S_t = exp(g_t) S_{t-1} + k_t u_t^T, k_t L2-normalised)."""
    return layer_captures(model, input_ids, layers=[layer], **kwargs)[layer].written_values(dtype=dtype)


def state_decomposition_for(
    model: nn.Module,
    input_ids: Tensor | None,
    layer: int,
    *,
    position: int | None = None,
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> ops.StateDecomposition:
    """The state of GDN layer `layer` after `position` (default the last token) as per-token
    writes: S_p = exp(G_p) S_0 + sum_j exp(G_p - G_j) k_j u_j^T (`ops.state_decomposition`)."""
    return layer_captures(model, input_ids, layers=[layer], **kwargs)[layer].state_decomposition(
        position=position, dtype=dtype
    )


def token_contributions(dec: ops.StateDecomposition) -> Tensor:
    """Size of each token's term in a state decomposition, [B, T', HV]: the rank-one term
    (w_j ⊙ k_j) u_j^T has Frobenius norm ||w_j ⊙ k_j|| ||u_j|| (w_j a scalar per head for GDN, a
    [K] vector per head for KDA's per-channel decay; no [T', K, V] tensor is formed)."""
    return dec.decayed_keys().norm(dim=-1) * dec.values.norm(dim=-1)


# --------------------------------------------------------------------------- attribution


class Attribution(NamedTuple):
    """Exact split of GDN layers' outputs, projected on a direction, over (head, source position).

    For every selected layer l, head h, requested position t (row r) and source position s:

        value[b, l, r] = sum_{h, s} contributions[b, l, h, r, s] + sum_h state_term[b, l, h, r] + bias_term[b, l, r]

    (summing over all heads; with `heads=` the selected heads' part). The gated RMSNorm's scale
    rms(o_t) is frozen at its actual value, as in direct logit attribution through a norm.

    contributions: [B, L, H, R, T]; zero for s > t (causality).
    state_term: [B, L, H, R], the initial (cached) state's part; zeros without a cache.
    bias_term: [B, L, R], the output projection's bias projected on the direction (zeros without one).
    value: [B, L, R], path_scale * (direction_t . y_t), y_t the layer output read from the
        `out_proj` site (for a token pair: the layer's direct effect on the logit difference).
    direction: [B, R, D], the direction each position was projected on (a token pair: the
        unembedding difference through the final norm, its scale frozen at position t).
    layers, heads, positions: what the axes L, H, R index.
    path_scale: [B, L, R], the factor by which the residual carries layer l's output at position
        t to the final norm's input: ones for a [D] direction and where the layer output is added
        straight into the residual stream; with hyper-connections (GLM-5-Next) the frozen stream
        weights' product (see `_ReadOut`). Every part above includes it. None: not recorded.
    """

    contributions: Tensor
    state_term: Tensor
    bias_term: Tensor
    value: Tensor
    direction: Tensor
    layers: tuple
    heads: tuple
    positions: tuple
    path_scale: Tensor | None = None

    def total(self) -> Tensor:
        """sum of the parts, [B, L, R] (equals `value` when all heads are selected)."""
        return self.contributions.sum((2, 4)) + self.state_term.sum(2) + self.bias_term


def _norm_eps(module: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        eps = getattr(module, name, None)
        if isinstance(eps, float):
            return eps
    raise ValueError(f"{type(module).__name__} has no `variance_epsilon` / `eps`: not an RMSNorm this code knows")


def _unit_gain(norm: nn.Module, *args_after, width: int, like: Tensor) -> Tensor:
    """An RMSNorm's elementwise gain with its scale frozen: norm(ones, ...) * sqrt(1 + eps).

    RMSNorm(x) = x * rsqrt(mean(x^2) + eps) * gain, so on x = ones it returns gain / sqrt(1 + eps),
    whatever the gain's parametrisation (w, 1 + w, w * act(gate)). Calls the module's own forward
    directly, so hooks on it (user edits) do not fire for this probe.
    """
    ones = torch.ones(*like.shape[:-1], width, dtype=like.dtype, device=like.device)
    out = type(norm).forward(norm, ones, *args_after)
    return out.to(torch.float64) * math.sqrt(1.0 + _norm_eps(norm))


def _refuse_read_out(decoder: nn.Module, why: str):
    raise ValueError(
        f"direction=(token, token) needs each GDN layer's output to reach the final norm by a known linear path; "
        f"{type(decoder).__name__} {why}, so a layer's direct effect on the logits is not one linear read-out. "
        "Pass a [D] direction instead."
    )


class _ReadOut:
    """How each GDN layer's output y reaches the final norm, recorded during the one forward run
    (token-pair directions only). Use as a context manager around the run, then `scales()`.

    From HF's modeling code: Qwen3-Next, Qwen3.5 (and MoE, VL), OLMo-Hybrid, LaraMini, Kimi Linear
    and Bailing add the mixer's output (after its out_proj / o_proj, no norm) straight into one
    [B, T, D] residual stream that the final norm reads: y reaches the norm's input as is (scale 1).
    Where the hidden states entering the GDN layer's decoder layer are not [B, T, D] (checked at
    run time), the residual is several hyper-connection streams:

    - [B, T, N, D] with mHC modules (manifold-constrained hyper-connections, found by their
      `hc_mult`, each returning (post [B, T, N], comb [B, T, N, N], block input); GLM-5-Next):
      y enters stream n times post_n of the mHC call just before the layer, each later mHC call
      maps the streams s -> comb^T s, and the parameter-free head (`hc_head`, a mean) collapses
      them with weights h [N]. With those weights frozen at their actual values, as the norm's
      scale is, y reaches the norm's input times one scalar per token:
      scale = h . (comb_K^T ... comb_1^T post), [B, T].
    - anything else (Qwen4-Exp: [B, T, N * D] streams read out by a learned, normalising mixer
      and no final norm) is refused with a one-line ValueError naming the model class.
    """

    def __init__(self, model: nn.Module, mods: dict, B: int, T: int, D: int):
        self.B, self.T, self.D, self.layers = B, T, D, list(mods)
        gdn = next(iter(mods.values()))
        found = [
            (m, layer)
            for m in model.modules()
            if isinstance(getattr(m, "layers", None), nn.ModuleList)
            for layer in m.layers
            if any(sub is gdn for sub in layer.modules())
        ]
        if not found:
            raise ValueError(
                f"cannot find the decoder of {type(model).__name__} (a module with `layers` holding the GDN layers); "
                "pass a [D] direction instead of a token pair"
            )
        self.decoder, self.decoder_layer = found[-1]  # the innermost such module (multimodal wrappers nest it)
        self.norm = getattr(self.decoder, "norm", None)
        self.mhc = [m for m in self.decoder.layers.modules() if hasattr(m, "hc_mult")]
        self.residual, self.final_in, self.events = [], [], []  # events: GDN layer ids and mHC outputs, in call order
        self._mods = mods

    def __enter__(self):
        rec = self.events.append
        self.handles = [
            self.decoder_layer.register_forward_pre_hook(
                lambda m, a, kw: self.residual.append((a[0] if a else kw["hidden_states"]).shape), with_kwargs=True
            )
        ]
        if isinstance(self.norm, nn.Module):
            self.handles.append(self.norm.register_forward_hook(lambda m, a, o: self.final_in.append(a[0].detach())))
        if self.mhc:
            self.handles += [m.register_forward_hook(lambda m, a, o: rec(o)) for m in self.mhc]
            self.handles += [g.register_forward_hook(lambda m, a, o, l=l: rec(l)) for l, g in self._mods.items()]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def scales(self):
        """(final norm, its input [B, T, D], scale [B, L, T] float64 or None for a plain residual)."""
        B, T, D = self.B, self.T, self.D
        if len(self.residual) != 1:
            layer = type(self.decoder_layer).__name__
            raise RuntimeError(f"{layer} ran {len(self.residual)} times in one forward; expected once")
        shape = tuple(self.residual[0])
        why = (
            f"keeps its residual as {list(shape)} hidden states, not [B, T, D] = {[B, T, D]} (hyper-connection streams)"
        )
        mhc = bool(self.mhc) and len(shape) == 4 and shape[:2] == (B, T) and shape[3] == D
        if shape != (B, T, D) and not mhc:
            _refuse_read_out(self.decoder, why)
        if not isinstance(self.norm, nn.Module):
            raise ValueError(
                f"cannot find the final norm of {type(self.decoder).__name__} (a module with `layers` and `norm`); "
                "pass a [D] direction instead of a token pair"
            )
        if len(self.final_in) != 1:
            raise RuntimeError(f"the final norm ran {len(self.final_in)} times in one forward; expected once")
        return self.norm, self.final_in[0], (self._mhc_scale(shape[2], why) if mhc else None)

    def _mhc_scale(self, N: int, why: str) -> Tensor:
        head = getattr(self.decoder, "hc_head", None)
        if not isinstance(head, nn.Module) or next(head.parameters(), None) is not None:
            _refuse_read_out(self.decoder, why + " collapsed by a learned head")
        eye = torch.eye(N, dtype=torch.float64, device=self.final_in[0].device)
        h = type(head).forward(head, eye.view(1, 1, N, N))[0, 0]  # [N]: the head's weight of each stream
        paths, post = {}, None  # paths[l]: [B, T, N], how much of y_l each stream carries
        for ev in self.events:
            if isinstance(ev, int):
                if post is None:
                    _refuse_read_out(self.decoder, why + f" (no hyper-connection call before GDN layer {ev})")
                paths[ev] = post
                continue
            ok = isinstance(ev, tuple) and len(ev) == 3 and ev[0].shape == (self.B, self.T, N)
            if not (ok and ev[1].shape == (self.B, self.T, N, N)):
                _refuse_read_out(self.decoder, why + " mixed by hyper-connections of an unknown form")
            post, comb = ev[0].to(torch.float64), ev[1].to(torch.float64)
            paths = {l: torch.einsum("btnm,btn->btm", comb, p) for l, p in paths.items()}
        return torch.stack([paths[l] @ h for l in self.layers], 1)  # [B, L, T]


def _direction_for(model, direction, positions, final_in, final_norm, D: int, B: int) -> Tensor:
    """[B, R, D] float64: a [D] vector for every position, or the frozen-norm logit difference
    (final_in [B, T, D]: the final norm's actual input; final_norm: that module)."""
    if isinstance(direction, Tensor) and direction.is_floating_point():
        if direction.dim() != 1 or direction.shape[0] != D:
            raise ValueError(
                f"direction must be a [D] vector with D={D} (the model width) or a pair of answer tokens "
                f"(token_a, token_b); got a tensor of shape {list(direction.shape)}"
            )
        return direction.to(torch.float64).expand(B, len(positions), D)
    if not (isinstance(direction, (tuple, list)) and len(direction) == 2):
        raise ValueError(
            f"direction must be a [D] float tensor (D={D}) or a pair of answer tokens (token_a, token_b), "
            f"each an int or a [B] integer tensor; got {type(direction).__name__}"
        )
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(getattr(lm_head, "weight", None), Tensor):
        raise ValueError(
            f"direction=(token, token) needs an LM head to read the answer tokens from, and {type(model).__name__} "
            f"has none (a bare decoder, e.g. from AutoModel); pass a [D] direction vector (D={D}) instead"
        )
    W_U = lm_head.weight  # [vocab, D]
    vocab = W_U.shape[0]
    toks = []
    for tok in direction:
        t = torch.as_tensor(tok)
        if t.is_floating_point() or t.dtype == torch.bool or t.dim() > 1 or (t.dim() == 1 and t.shape[0] != B):
            raise ValueError(f"answer tokens must be ints or [B={B}] integer tensors; got {tok!r}")
        if ((t < 0) | (t >= vocab)).any():
            raise ValueError(f"answer tokens must lie in [0, {vocab}) (the vocabulary); got {t.tolist()}")
        toks.append(t.to(W_U.device).expand(B))
    diff = (W_U[toks[0]] - W_U[toks[1]]).to(torch.float64)  # [B, D]
    if final_in is None:
        return None  # validated only; the model has not run yet
    x = final_in[:, list(positions)].to(torch.float64)  # [B, R, D], the final norm's input
    gain = _unit_gain(final_norm, width=D, like=final_in[:, :1])  # [B, 1, D]
    scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _norm_eps(final_norm))  # frozen at its actual value
    return diff[:, None, :] * gain * scale


@torch.no_grad()
def attribution_for(
    model: nn.Module,
    input_ids: Tensor | None = None,
    *,
    positions=None,
    direction,
    layers: Layers = None,
    heads=None,
    attention_mask: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    **model_kwargs,
) -> Attribution:
    """Which source tokens each GDN layer and head read to produce its output at `positions`,
    projected on `direction` -- exactly, with the gated norm's scale frozen.

    The kernel output is o_t = sum_s M[t, s] v_s + C_t (`ops.effective_attention`, one row per
    position by the adjoint scan). The gated RMSNorm y = gain(z) ⊙ o / rms(o) is linear in o once
    rms(o_t) is frozen at its actual value, and out_proj is linear, so direction_t . y_t splits
    into one number per (head, source position) plus the initial-state and bias terms:

        contributions[b, l, h, r, s] = M_h[t, s] * (a_{t,h} . v_{s,h}),
        a_{t,h} = (W_out^T direction_t)_h ⊙ gain(z_{t,h}) / rms(o_{t,h})   (times path_scale).

    Attribution lands on value positions; v_s mixes tokens s-3..s through the causal conv.

    Args:
        positions: query positions (an int, ints or a 1-D integer tensor) in [0, T); default the
            last token. Left padding counts (positions index the tokens of the call as given).
        direction: a [D] float vector (projects each layer's output y_t), or a pair of answer
            tokens (a, b), each an int or a [B] integer tensor (needs an LM head): direct
            logit-difference attribution, direction_t = (W_U[a] - W_U[b]) ⊙ final-norm gain /
            rms(x_t) with x_t the final norm's actual input (its scale frozen too); then `value`
            is the layer's direct effect on logit(a) - logit(b). With GLM-5-Next's
            hyper-connections the stream weights are frozen too (`path_scale`); a residual this
            code cannot read out linearly (Qwen4-Exp) is refused with a ValueError.
        layers: GDN layer indices (default all).  heads: value heads (default all).
        dtype: computation dtype of M and the contributions (float32 default, float64 exact).
        model_kwargs: passed to the forward (`cache=` with a prefilled cache gives a state term;
            the cache is copied, not advanced).

    Returns:
        Attribution(contributions [B, L, H, R, T], state_term [B, L, H, R], bias_term [B, L, R],
        value [B, L, R], direction [B, R, D], layers, heads, positions, path_scale [B, L, R]).
    """
    model = as_module(scope.dispatched(model))  # a lazy nnsight model: its real weights first
    src = input_ids if input_ids is not None else model_kwargs.get("inputs_embeds")
    if src is None:
        raise ValueError("attribution_for needs input_ids or inputs_embeds")
    B, T = src.shape[:2]
    ps = tuple(as_positions([T - 1] if positions is None else positions, "attribution_for", size=T,
                            what=f"the call has T={T} tokens"))  # fmt: skip
    mods = select_layers(model, layers)
    D = site_module(model, next(iter(mods)), "out_proj").weight.shape[0]
    _direction_for(model, direction, ps, None, None, D, B)  # validate before running the model
    run = lambda: layer_captures(model, input_ids, layers=list(mods), attention_mask=attention_mask, **model_kwargs)
    final_in = final_norm = path = None
    if not (isinstance(direction, Tensor) and direction.is_floating_point()):  # a token pair: read the final norm
        with _ReadOut(model, mods, B, T, D) as read_out:
            caps = run()
        final_norm, final_in, path = read_out.scales()
    else:
        caps = run()
    d = _direction_for(model, direction, ps, final_in, final_norm, D, B)  # [B, R, D] float64
    # [B, L, R]: how the residual carries each layer's output to the final norm (1: added as is)
    path = d.new_ones(B, len(mods), len(ps)) if path is None else path[:, :, list(ps)]
    parts = [
        _layer_attribution(model, cap, d * path[:, i, :, None], list(ps), heads, dtype)
        for i, cap in enumerate(caps.values())
    ]
    return Attribution(
        *(torch.stack([part[j] for part in parts], 1) for j in range(4)), d.to(dtype), tuple(caps), parts[0][4], ps,
        path.to(dtype),
    )  # fmt: skip


def _layer_attribution(model, cap: LayerCapture, d_l: Tensor, rows: list, heads, dtype):
    """One layer's parts of `attribution_for` along d_l [B, R, D] (float64, path scale included):
    (contributions [B, H, R, T], state term [B, H, R], bias term [B, R], value [B, R], heads)."""
    B, HV, V = cap.v.shape[0], cap.v.shape[2], cap.v.shape[3]
    ea = cap.effective_attention(heads=heads, rows=rows, dtype=dtype)  # validates heads
    head_list = list(range(HV)) if heads is None else _as_list(heads)
    norm, out_l = site_module(model, cap.layer, "norm"), site_module(model, cap.layer, "out_proj")
    o = cap.recurrence[:, rows].to(torch.float64)  # [B, R, HV, V]
    z = cap.gate[:, rows]
    gain = _unit_gain(norm, z, width=V, like=z)  # gain(z) [B, R, HV, V]
    inv_rms = torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + _norm_eps(norm))  # frozen
    read = (d_l @ out_l.weight.to(torch.float64)).view(B, len(rows), HV, V)  # W_out^T direction_t, per head
    a = (read * gain * inv_rms)[:, :, head_list].to(dtype)  # [B, R, H, V]
    v = cap.v[:, :, head_list].to(dtype)  # [B, T, H, V]
    contributions = ea.matrix * torch.einsum("brhv,bshv->bhrs", a, v)  # [B, H, R, T]
    if ea.state_term is None:
        state = a.new_zeros(B, len(head_list), len(rows))
    else:
        state = torch.einsum("brhv,brhv->bhr", a, ea.state_term)
    bias = getattr(out_l, "bias", None)
    bias = (d_l @ bias.to(torch.float64)).to(dtype) if bias is not None else a.new_zeros(B, len(rows))
    value = torch.einsum("brd,brd->br", d_l, cap.out_proj[:, rows].to(torch.float64)).to(dtype)
    return contributions, state, bias, value, tuple(head_list)
