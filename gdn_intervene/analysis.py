"""Effective attention and state tools over a patched model (conveniences over `ops`).

One forward pass of a patched model, with plain forward hooks on the sites, yields every GDN
layer's kernel inputs; `ops` turns them into exact views of the recurrence:

    caps = capture(model, ids)                    # {layer: LayerCapture}
    M = effective_attention_for(model, ids)       # {layer: LayerAttention}, M [B, HV, T, T]
    with state_at(model, [7, 15]): ...            # split the prefill; the `state` site fires per split
    S = states_at(model, ids, [7, 15])            # {layer: [B, P, HV, K, V]}

Shape letters: B batch, T tokens of the call, HK/HV key/value heads, K/V head dims, P state
positions, R selected rows, H selected heads. Gates: beta [B, T, HV]; g [B, T, HV], the log
decay, g <= 0, decay = exp(g). Positions index the tokens of the call as given (left padding
included). Every function here runs the model under `torch.no_grad()` and removes its hooks
on exit, also on error.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from . import _compat, ops
from .layer import check_positions
from .patch import gdn_layers

__all__ = [
    "LayerCapture",
    "LayerAttention",
    "capture",
    "effective_attention_for",
    "state_at",
    "states_at",
    "written_values_for",
    "state_decomposition_for",
    "token_contributions",
]

Tensor = torch.Tensor
Layers = Union[int, Iterable[int], None]

# site -> LayerCapture field; `state` is kept separately (it may fire several times per call)
_CAPTURED = {"q": "q", "k": "k", "v": "v", "beta": "beta", "decay": "g", "recurrence": "o"}


# --------------------------------------------------------------------------- capture


@dataclass
class LayerCapture:
    """The kernel inputs and outputs of one GDN layer in one forward call (as the sites saw them).

    q, k: [B, T, HK, K] (pre-L2-norm, pre-GQA).  v: [B, T, HV, V].
    beta: [B, T, HV].  g: [B, T, HV], log decay, g <= 0, decay = exp(g).
    o: [B, T, HV, V], the `recurrence` output (kernel output, before the gated norm).
    states: every `state` firing of the call, in order, each [B, HV, K, V] (one without a
        split; with `state_at`, one per split position, then the final state).
    initial_state: S_0 [B, HV, K, V], the cache's recurrent state before the call, or None.
    """

    layer: int
    q: Tensor
    k: Tensor
    v: Tensor
    beta: Tensor
    g: Tensor
    o: Tensor
    states: tuple
    initial_state: Optional[Tensor]

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
                self.q, self.k, beta=self.beta, g=self.g, heads=heads, rows=rows,
                initial_state=self.initial_state, dtype=dtype, max_bytes=max_bytes,
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
        o = self.o if rows is None else self.o[:, _as_list(rows)]
        o = (o if heads is None else o[:, :, _as_list(heads)]).to(ea.matrix.dtype)
        diff = (self.reconstruct(ea, heads=heads) - o).norm()
        return (diff / o.norm().clamp_min(torch.finfo(o.dtype).tiny)).item()

    def written_values(self, *, dtype: torch.dtype = torch.float32) -> Tensor:
        """u [B, T, HV, V]: what each token wrote into the state (`ops.written_values`)."""
        return ops.written_values(self.k, self.v, beta=self.beta, g=self.g, initial_state=self.initial_state, dtype=dtype)

    def state_decomposition(self, *, position: Optional[int] = None, dtype: torch.dtype = torch.float32):
        """The state after `position` (default T - 1) as per-token writes (`ops.state_decomposition`)."""
        return ops.state_decomposition(
            self.k, self.v, beta=self.beta, g=self.g, initial_state=self.initial_state, position=position, dtype=dtype
        )


def _as_list(idx) -> list:
    return idx.tolist() if isinstance(idx, Tensor) else list(idx)


def _select(model: nn.Module, layers: Layers) -> dict:
    """{layer: patched GDN module} for `layers` (None: all; an int; or an iterable of ints)."""
    mods = gdn_layers(model)
    if layers is None:
        return mods
    wanted = [layers] if isinstance(layers, int) else list(layers)
    bad = [l for l in wanted if isinstance(l, bool) or not isinstance(l, int) or l not in mods]
    if bad or not wanted:
        raise ValueError(f"layers must be GDN layer indices from {list(mods)}; got {wanted!r}")
    return {l: mods[l] for l in wanted}


def _cache_kwarg(kwargs: dict):
    return kwargs.get("cache", kwargs.get("cache_params"))


def capture(
    model: nn.Module,
    input_ids: Optional[Tensor] = None,
    *,
    layers: Layers = None,
    attention_mask: Optional[Tensor] = None,
    **model_kwargs,
) -> dict:
    """Run `model` once (no grad) and return {layer: LayerCapture} for the chosen GDN layers.

    `model_kwargs` go to the model's forward (e.g. `inputs_embeds`, `cache=`, `use_cache=True`).
    With a cache, each layer's `initial_state` is the cache's recurrent state read (and cloned)
    just before the layer runs, so a cached continuation is described exactly.
    """
    mods = _select(model, layers)
    store = {l: {"state": []} for l in mods}
    handles = []

    def pre(l, module, args, kwargs):
        cache = _cache_kwarg(kwargs)
        S0 = None
        if cache is not None and _compat.cache_gap(cache) is None:
            S0 = cache.get_recurrent_state(l)
        # the cache is updated in place after the kernel: keep a copy
        store[l]["initial_state"] = None if S0 is None else S0.detach().clone()

    def keep(l, name, module, args, out):
        if name == "state":
            store[l]["state"].append(out.detach())
        elif name in store[l]:
            raise RuntimeError(f"layer {l}: site {name!r} fired twice in one capture (several forward calls?)")
        else:
            store[l][name] = out.detach()

    try:
        for l, m in mods.items():
            handles.append(m.register_forward_pre_hook(lambda mod, a, kw, l=l: pre(l, mod, a, kw), with_kwargs=True))
            for name in (*_CAPTURED, "state"):
                handles.append(getattr(m, name).register_forward_hook(lambda mod, a, o, l=l, n=name: keep(l, n, mod, a, o)))
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    finally:
        for h in handles:
            h.remove()

    out = {}
    for l, got in store.items():
        missing = [s for s in _CAPTURED if s not in got]
        if missing or not got["state"]:
            raise RuntimeError(
                f"layer {l}: sites {missing or ['state']} did not fire; was the native forward used "
                "(native_cached=True, or a cache without the linear-attention API)?"
            )
        fields = {f: got[s] for s, f in _CAPTURED.items()}
        out[l] = LayerCapture(l, states=tuple(got["state"]), initial_state=got.get("initial_state"), **fields)
    return out


# --------------------------------------------------------------------------- effective attention


class LayerAttention(NamedTuple):
    """Effective attention of one GDN layer.

    matrix: M [B, H, R, T] (H = HV or len(heads), R = T or len(rows)); o = M v + state_term.
    state_term: C [B, R, H, V], the initial state's part of o, or None without a cached state.
    error: ||M v + C - o|| / ||o|| against the `recurrence` site, when `check` was asked, else None.
    """

    matrix: Tensor
    state_term: Optional[Tensor]
    error: Optional[float]


def effective_attention_for(
    model: nn.Module,
    input_ids: Optional[Tensor] = None,
    *,
    layers: Layers = None,
    heads=None,
    rows=None,
    attention_mask: Optional[Tensor] = None,
    dtype: torch.dtype = torch.float32,
    max_bytes: Optional[float] = None,
    check: Union[bool, float] = False,
    **model_kwargs,
) -> dict:
    """Exact effective attention M of each chosen GDN layer for one run of `model`.

    Runs the patched model once, capturing the `q`, `k`, `beta`, `decay` sites (and `v`,
    `recurrence`, `state`), then calls `ops.effective_attention` per layer:
    o[b, t, h] = sum_s M[b, h, t, s] v[b, s, h] + C[b, t, h], o the kernel output (`recurrence`).

    Args:
        heads: value-head indices (default all).  rows: query positions (default all; use this
            for long inputs: the full M is O(T^2) memory and O(T^3) time per head).
        dtype: computation dtype of M (float32 default, float64 for ~1e-12 accuracy).
        max_bytes: memory guard passed to ops (default 4 GiB); above it a ValueError names the
            layer and suggests rows=[...].
        check: True computes `error` (relative reconstruction error against the `recurrence`
            site); a float also raises RuntimeError when the error exceeds it.
        model_kwargs: passed to the forward (`cache=` with a prefilled cache gives C).

    Returns:
        {layer: LayerAttention(matrix [B, H, R, T], state_term [B, R, H, V] or None, error)}.
    """
    caps = capture(model, input_ids, layers=layers, attention_mask=attention_mask, **model_kwargs)
    out = {}
    for l, cap in caps.items():
        ea = cap.effective_attention(heads=heads, rows=rows, dtype=dtype, max_bytes=max_bytes)
        err = None
        if check is not False:
            err = cap.reconstruction_error(ea, heads=heads, rows=rows)
            if not isinstance(check, bool) and not err <= check:
                raise RuntimeError(f"layer {l}: M v + C reconstructs the recurrence output with relative error {err:.3g} > {check}")
        out[l] = LayerAttention(ea.matrix, ea.state_term, err)
    return out


# --------------------------------------------------------------------------- states


def _positions(positions) -> tuple:
    """Validate state positions eagerly (an int, a sequence or a 1-D integer tensor): the same
    rule the layer applies at call time (`layer.check_positions`)."""
    if isinstance(positions, Tensor):
        if positions.dim() > 1 or positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise ValueError(f"positions must be ints (or a 1-D integer tensor); got a {positions.dtype} tensor of shape {list(positions.shape)}")
        positions = positions.reshape(-1).tolist()
    if isinstance(positions, int) and not isinstance(positions, bool):
        positions = [positions]
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence):
        raise ValueError(f"positions must be an int or a sequence of ints; got {type(positions).__name__}")
    return tuple(check_positions(positions, "state_at"))


@contextlib.contextmanager
def state_at(model: nn.Module, positions, layers: Layers = None) -> Iterator[dict]:
    """Split each prefill of the chosen GDN layers (default all) after each of `positions`.

    Inside the block, the `state` site of those layers fires once per position (the state
    [B, HV, K, V] after that token) and once more for the final state, unless the last
    position is T - 1; a replaced state carries into later tokens and into the cache. Cached
    single-token decode steps are not split. Splitting moves the kernel's chunk boundaries, so
    unedited outputs match an unsplit call to kernel tolerance (fp32 torch path: ~1e-6
    relative), not bitwise. Positions beyond a call's length raise in that call.
    Restores each layer's previous `state_positions` on exit, also on error. Yields
    {layer: module}.
    """
    ps = _positions(positions)
    mods = _select(model, layers)
    saved = {l: m.state_positions for l, m in mods.items()}
    try:
        for m in mods.values():
            m.state_positions = ps
        yield mods
    finally:
        for l, m in mods.items():
            m.state_positions = saved[l]


def states_at(
    model: nn.Module,
    input_ids: Optional[Tensor],
    positions,
    layers: Layers = None,
    *,
    attention_mask: Optional[Tensor] = None,
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
        caps = capture(model, input_ids, layers=list(mods), attention_mask=attention_mask, **model_kwargs)
    return {l: torch.stack(cap.states[: len(ps)], dim=1) for l, cap in caps.items()}


def written_values_for(
    model: nn.Module, input_ids: Optional[Tensor], layer: int, *, dtype: torch.dtype = torch.float32, **kwargs
) -> Tensor:
    """u [B, T, HV, V] of GDN layer `layer` for one run: u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t),
    the value token t actually wrote (S_t = exp(g_t) S_{t-1} + k_t u_t^T, k_t L2-normalised)."""
    return capture(model, input_ids, layers=[layer], **kwargs)[layer].written_values(dtype=dtype)


def state_decomposition_for(
    model: nn.Module,
    input_ids: Optional[Tensor],
    layer: int,
    *,
    position: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> ops.StateDecomposition:
    """The state of GDN layer `layer` after `position` (default the last token) as per-token
    writes: S_p = exp(G_p) S_0 + sum_j exp(G_p - G_j) k_j u_j^T (`ops.state_decomposition`)."""
    return capture(model, input_ids, layers=[layer], **kwargs)[layer].state_decomposition(position=position, dtype=dtype)


def token_contributions(dec: ops.StateDecomposition) -> Tensor:
    """Size of each token's term in a state decomposition: ||w_j k_j u_j^T||_F = w_j ||k_j|| ||u_j||,
    [B, T', HV] (a rank-one term's Frobenius norm; no [T', K, V] tensor is formed)."""
    return dec.weights.transpose(1, 2) * dec.keys.norm(dim=-1) * dec.values.norm(dim=-1)
