"""Exact linear-algebra views of the Gated DeltaNet recurrence (pure math, no model code).

Conventions, shared by every function here:

* ``q``, ``k``: [B, T, HK, K], as the model feeds them to the kernel: before the
  in-kernel L2 norm and before GQA expansion.  ``v``: [B, T, HV, V].
* ``g``: [B, T, HV], log decay, g <= 0, decay = exp(g).
* ``beta``: [B, T, HV], write strength in [0, 1] (or [0, 2] for families with
  negative eigenvalues; nothing here assumes beta <= 1).
* GQA: HV is a multiple of HK; key head i serves value heads i*r .. (i+1)*r - 1,
  r = HV // HK (``repeat_interleave``, as in HF transformers).
* The kernel (HF ``torch_{chunk,recurrent}_gated_delta_rule`` with
  ``use_qk_l2norm_in_kernel=True``) L2-normalises q and k (eps 1e-6), scales q
  by K**-0.5 and runs, per value head, with S [K, V]::

      S_t = exp(g_t) S_{t-1} + k_t u_t^T,   u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t),   o_t = S_t^T q_t

* Unrolled, with G = cumsum(g) over T and D[t, j] = exp(G_t - G_j) for j <= t
  (0 above the diagonal), E_t = exp(G_t) S_0^T k_t and F_t = exp(G_t) S_0^T q_t::

      (I + A) u = diag(beta) (v - E),    A[t, j] = beta_t (k_t . k_j) D[t, j]  (j < t)
      o = (Q K^T ⊙ D) u + F
        = M v + C,   M = (Q K^T ⊙ D) (I + A)^{-1} diag(beta),   C = F - M E

  M is the exact "effective attention" of a head; C is the part of o that comes
  from the initial state S_0 (zero without one).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

Tensor = torch.Tensor
Index = Union[Sequence[int], Tensor]

DEFAULT_MAX_BYTES = 4 * 2**30  # effective_attention refuses to plan more than this by default


# --------------------------------------------------------------------------- helpers


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """L2-normalise the last dim exactly as HF/FLA do: ``x * rsqrt(sum(x*x) + eps)``."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


_l2norm = l2norm  # naive_gated_delta_rule has a flag named `l2norm`


def _shape(x: Tensor) -> list:
    return list(x.shape)


def _check_inputs(
    q: Optional[Tensor],
    k: Tensor,
    beta: Tensor,
    g: Tensor,
    v: Optional[Tensor] = None,
    initial_state: Optional[Tensor] = None,
) -> Tuple[int, int, int, int, int]:
    """Validate shapes; return (B, T, HK, K, HV)."""
    if k.dim() != 4:
        raise ValueError(f"k must be [B, T, HK, K]; got shape {_shape(k)}")
    if q is not None and q.shape != k.shape:
        raise ValueError(f"q must have k's shape [B, T, HK, K] = {_shape(k)}; got q {_shape(q)}")
    B, T, HK, K = k.shape
    if beta.dim() != 3 or tuple(beta.shape[:2]) != (B, T):
        raise ValueError(f"beta must be [B, T, HV] with B={B}, T={T} (from k); got {_shape(beta)}")
    HV = beta.shape[2]
    if g.shape != beta.shape:
        raise ValueError(f"g must be [B, T, HV] = {_shape(beta)} (beta's shape); got {_shape(g)}")
    if HV % HK != 0:
        raise ValueError(f"HV={HV} (from beta/g) must be a multiple of HK={HK} (from k)")
    if v is not None and (v.dim() != 4 or tuple(v.shape[:3]) != (B, T, HV)):
        raise ValueError(f"v must be [B, T, HV, V] with B={B}, T={T}, HV={HV}; got {_shape(v)}")
    if initial_state is not None:
        want = (B, HV, K) + ((v.shape[3],) if v is not None else ())
        if initial_state.dim() != 4 or tuple(initial_state.shape[: len(want)]) != want:
            shown = f"[{B}, {HV}, {K}, {v.shape[3] if v is not None else 'V'}]"
            raise ValueError(f"initial_state must be [B, HV, K, V] = {shown}; got {_shape(initial_state)}")
    return B, T, HK, K, HV


def _index(name: str, idx: Index, size: int, what: str, device: torch.device) -> Tensor:
    """A non-empty 1-D long tensor of positions in [0, size); ValueError otherwise."""
    if isinstance(idx, Tensor):
        if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise ValueError(
                f"{name} must be a 1-D integer tensor or a sequence of ints; "
                f"got {idx.dtype} tensor of shape {_shape(idx)}"
            )
        vals = idx.tolist()
    elif isinstance(idx, (str, bytes)) or not isinstance(idx, Sequence):
        raise ValueError(
            f"{name} must be a sequence of ints or a 1-D integer tensor (e.g. {name}=[0]); "
            f"got {type(idx).__name__}"
        )
    else:
        vals = list(idx)
    if any(isinstance(x, (bool, float)) or not hasattr(x, "__index__") for x in vals):
        raise ValueError(f"{name} must contain ints; got {vals}")
    vals = [x.__index__() for x in vals]
    if not vals:
        raise ValueError(f"{name} must not be empty")
    bad = [x for x in vals if not 0 <= x < size]
    if bad:
        raise ValueError(f"{name} out of range: {bad}; valid are 0..{size - 1} ({what})")
    return torch.tensor(vals, dtype=torch.long, device=device)


def _causal_decay(G: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """D[..., i, j] = exp(G_i - G_j) for j <= i < n, else 0.  G: [..., >=n] float64.

    Differences are taken in float64: G grows linearly with T, and in float32
    G_i - G_j would lose ~|G| * 6e-8 of absolute accuracy in the exponent.
    """
    Gn = G[..., :n]
    diff = Gn[..., :, None] - Gn[..., None, :]
    upper = torch.ones(n, n, dtype=torch.bool, device=G.device).triu(1)
    return diff.masked_fill_(upper, float("-inf")).exp_().to(dtype)  # mask before exp: no overflow


def _heads_layout(x: Tensor, heads_idx: Tensor, r: int) -> Tensor:
    """[B, T, HK, *] -> [B, H', T, *] for the value heads in heads_idx (GQA: key head = h // r)."""
    return x.transpose(1, 2)[:, heads_idx // r]


def _delta_scan(kh: Tensor, v: Tensor, beta: Tensor, g: Tensor, S: Tensor, chunk: int = 64) -> Tuple[Tensor, Tensor]:
    """Chunked scan returning (u [B, H, T, V], final S [B, H, K, V]).

    kh [B, H, T, K] normalised keys, v [B, H, T, V], beta/g [B, H, T], S [B, H, K, V].
    Within a chunk (I + A) u = diag(beta) (v - E) is one triangular solve; memory is
    O(T * chunk) rather than O(T^2).
    """
    us = []
    for s in range(0, kh.shape[2], chunk):
        k_c, v_c, b_c = kh[:, :, s : s + chunk], v[:, :, s : s + chunk], beta[:, :, s : s + chunk]
        G = g[:, :, s : s + chunk].to(torch.float64).cumsum(-1)  # decay since the chunk start
        c = G.shape[-1]
        # A is strictly lower; the unit diagonal of I + A is implied by unitriangular=True.
        A = (k_c @ k_c.transpose(-1, -2)) * _causal_decay(G, c, kh.dtype) * b_c[..., None]
        E = G.exp().to(kh.dtype)[..., None] * (k_c @ S)  # what the carried state predicts
        u_c = torch.linalg.solve_triangular(A, b_c[..., None] * (v_c - E), upper=False, unitriangular=True)
        w = (G[..., -1:] - G).exp().to(kh.dtype)  # decay from each token to the chunk end
        S = G[..., -1].exp().to(kh.dtype)[..., None, None] * S + (k_c * w[..., None]).transpose(-1, -2) @ u_c
        us.append(u_c)
    return torch.cat(us, dim=2), S


# --------------------------------------------------------------------------- reference


def naive_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    g: Tensor,
    beta: Tensor,
    initial_state: Optional[Tensor] = None,
    l2norm: bool = True,
    scale: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """Token-by-token float64 reference of the gated delta rule (mirrors HF's recurrent kernel).

    Args:
        q, k: [B, T, HK, K] (pre-L2-norm, pre-GQA).  v: [B, T, HV, V].
        g: [B, T, HV], log decay, g <= 0, decay = exp(g).  beta: [B, T, HV].
        initial_state: [B, HV, K, V] or None (zeros).
        l2norm: L2-normalise q and k (eps 1e-6) first, like ``use_qk_l2norm_in_kernel=True``.
        scale: query scale, default K**-0.5.

    Returns:
        (o [B, T, HV, V], S [B, HV, K, V]), both float64.
    """
    B, T, HK, K, HV = _check_inputs(q, k, beta, g, v, initial_state)
    q, k, v, g, beta = (x.to(torch.float64) for x in (q, k, v, g, beta))
    if HV != HK:
        q, k = q.repeat_interleave(HV // HK, dim=2), k.repeat_interleave(HV // HK, dim=2)
    if l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = q * (K**-0.5 if scale is None else scale)
    if initial_state is None:
        S = torch.zeros(B, HV, K, v.shape[-1], dtype=torch.float64, device=v.device)
    else:
        S = initial_state.to(torch.float64).clone()
    o = torch.empty_like(v)
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        o[:, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, t])
    return o, S


# --------------------------------------------------------------------------- effective attention


class EffectiveAttention(NamedTuple):
    """Result of :func:`effective_attention`.

    matrix: M [B, HV, T, T] (HV -> len(heads), T rows -> len(rows) when given), lower
        triangular: o[b, t, h] = sum_s M[b, h, t, s] v[b, s, h] + state_term[b, t, h].
    state_term: C [B, T, HV, V] (same head/row selection), the initial state's
        contribution to o; None when no initial_state was given.
    """

    matrix: Tensor
    state_term: Optional[Tensor]


def effective_attention(
    q: Tensor,
    k: Tensor,
    *,
    beta: Tensor,
    g: Tensor,
    heads: Optional[Index] = None,
    rows: Optional[Index] = None,
    initial_state: Optional[Tensor] = None,
    dtype: torch.dtype = torch.float32,
    max_bytes: Optional[float] = None,
) -> EffectiveAttention:
    """Exact per-head mixing matrix M of the gated delta rule: o = M v + C.

    M = (Q K^T ⊙ D) (I + A)^{-1} diag(beta) with Q, K the L2-normalised keys/queries
    (Q also scaled by K**-0.5), D[t, j] = exp(G_t - G_j) (j <= t), G = cumsum(g),
    A[t, j] = beta_t (k_t . k_j) D[t, j] (j < t).  o is the kernel output before the
    output norm.  Computed by one batched triangular solve X (I + A) = Q K^T ⊙ D
    (``solve_triangular(..., left=False, unitriangular=True)``, i.e. the transposed
    system (I + A)^T X^T = (Q K^T ⊙ D)^T), never forming the inverse: O(T^3) per head
    for the full matrix, O(R T^2) for R rows.

    Args:
        q, k: [B, T, HK, K], pre-L2-norm, pre-GQA expansion (as the ``q``/``k`` sites give them).
        beta: [B, T, HV].  g: [B, T, HV], log decay, g <= 0, decay = exp(g).
        heads: value-head indices in [0, HV) to compute (default all), in the given order.
        rows: query positions in [0, T) (sequence or 1-D integer tensor); returns only
            those rows of M. By causality only the first max(rows) + 1 positions are used.
        initial_state: S_0 [B, HV, K, V]; adds ``state_term``.
        dtype: computation and output dtype (float32 default; float64 for ~1e-12 accuracy).
        max_bytes: memory guard (default 4 GiB); ValueError if the estimate (~3x the
            matrix, for temporaries) exceeds it.

    Returns:
        EffectiveAttention(matrix [B, HV, T, T] -- or [B, HV, R, T] with rows, HV ->
        len(heads) with heads --, state_term [B, T, HV, V] / [B, R, HV, V] or None).
        Entries above the causal diagonal are exactly zero.
    """
    B, T, HK, K, HV = _check_inputs(q, k, beta, g, None, initial_state)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype; got {dtype}")
    dev = k.device
    if heads is None:
        heads_idx = torch.arange(HV, device=dev)
    else:
        heads_idx = _index("heads", heads, HV, f"there are {HV} value heads", dev)
    rows_idx = None if rows is None else _index("rows", rows, T, f"sequence length T={T}", dev)
    H = heads_idx.numel()
    R = T if rows_idx is None else rows_idx.numel()
    n = T if rows_idx is None else int(rows_idx.max()) + 1  # causality: later positions are irrelevant

    itemsize = torch.empty((), dtype=dtype).element_size()
    need = itemsize * B * H * (3 * n * max(n, R) + (R * T if rows_idx is not None else 0))
    limit = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    if need > limit:
        raise ValueError(
            f"effective_attention would need ~{need / 2**30:.2f} GiB ({need} bytes: a [B={B}, H={H}, {R}, {n}] "
            f"{dtype} matrix plus temporaries), above max_bytes={limit}; pass rows=[...] (query positions) "
            f"and/or heads=[...] to compute a slice, or raise max_bytes"
        )

    r = HV // HK
    qh = _heads_layout(l2norm(q.to(dtype)), heads_idx, r) * K**-0.5  # [B, H, T, K]
    kh = _heads_layout(l2norm(k.to(dtype)), heads_idx, r)[:, :, :n]  # [B, H, n, K]
    b = beta.transpose(1, 2)[:, heads_idx].to(dtype)[..., :n]  # [B, H, n]
    G = g.transpose(1, 2)[:, heads_idx].to(torch.float64).cumsum(-1)  # [B, H, T]
    q_rows = qh[:, :, :n] if rows_idx is None else qh[:, :, rows_idx]

    D = _causal_decay(G, n, dtype)  # [B, H, n, n]
    P = (q_rows @ kh.transpose(-1, -2)).mul_(D if rows_idx is None else D[:, :, rows_idx])  # Q K^T ⊙ D, [B, H, R, n]
    A = (kh @ kh.transpose(-1, -2)).mul_(D).mul_(b[..., :, None])  # strictly-lower part used; diag implied
    del D
    X = torch.linalg.solve_triangular(A, P, upper=False, left=False, unitriangular=True)  # X (I + A) = P
    del A, P
    M = X.mul_(b[..., None, :])  # [B, H, R, n]
    row_pos = torch.arange(n, device=dev) if rows_idx is None else rows_idx
    M.masked_fill_(row_pos[:, None] < torch.arange(n, device=dev)[None, :], 0.0)  # exact zeros above diagonal

    C = None
    if initial_state is not None:
        S0 = initial_state[:, heads_idx].to(dtype)  # [B, H, K, V]
        eG = G.exp().to(dtype)  # exp(G_t): decay of S_0 up to t
        F = eG[:, :, row_pos, None] * (q_rows @ S0)  # direct read of S_0
        E = eG[:, :, :n, None] * (kh @ S0)  # S_0's prediction, removed from each write
        C = (F - M @ E).transpose(1, 2)  # [B, R, H, V]

    if rows_idx is not None and n < T:
        M = torch.cat([M, M.new_zeros(B, H, R, T - n)], dim=-1)
    return EffectiveAttention(M, C)


def heuristic_effective_attention(q: Tensor, k: Tensor, *, beta: Tensor, g: Tensor) -> Tensor:
    """The approximation TransformerLens ships: M' = (q k^T) ⊙ D ⊙ beta_j.

    Uses PRE-norm q/k, no K**-0.5 scale and no delta-rule key removal ((I + A)^{-1}),
    so it does NOT reconstruct the kernel output.  Measured in tests/test_ops.py (randn
    q/k/v, beta = sigmoid(randn), B=2, T=64): relative error ||M' v - o|| / ||o|| ~ 65
    for K=V=16 (66.3 GQA HK=2/HV=4, 64.2 HK=HV=2; ~23 for K=8 -- mostly the missing
    normalisation), and still ~0.3 (0.29-0.30) after the best scalar rescaling of M' v (the missing
    key removal), where the exact :func:`effective_attention` gives ~4e-7.  Provided for
    comparison only.

    Args:
        q, k: [B, T, HK, K] pre-norm.  beta: [B, T, HV].  g: [B, T, HV], log decay,
        g <= 0, decay = exp(g).

    Returns:
        M' [B, HV, T, T] (float32, or float64 for float64 inputs), lower triangular.
    """
    B, T, HK, K, HV = _check_inputs(q, k, beta, g)
    dtype = torch.promote_types(q.dtype, torch.float32)
    all_heads = torch.arange(HV, device=k.device)
    qh = _heads_layout(q.to(dtype), all_heads, HV // HK)
    kh = _heads_layout(k.to(dtype), all_heads, HV // HK)
    D = _causal_decay(g.transpose(1, 2).to(torch.float64).cumsum(-1), T, dtype)
    return (qh @ kh.transpose(-1, -2)) * D * beta.transpose(1, 2).to(dtype)[..., None, :]


# --------------------------------------------------------------------------- state view


def written_values(
    k: Tensor,
    v: Tensor,
    *,
    beta: Tensor,
    g: Tensor,
    initial_state: Optional[Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """What each token wrote into the state: u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t).

    S_t = exp(g_t) S_{t-1} + k_t u_t^T with k_t L2-normalised.  Computed by a chunked
    triangular solve (memory O(T * 64) per head).

    Args:
        k: [B, T, HK, K] pre-L2-norm, pre-GQA.  v: [B, T, HV, V].
        beta: [B, T, HV].  g: [B, T, HV], log decay, g <= 0, decay = exp(g).
        initial_state: S_0 [B, HV, K, V] or None (zeros).
        dtype: computation and output dtype.

    Returns:
        u [B, T, HV, V].
    """
    u, _ = _scan_inputs(k, v, beta, g, initial_state, dtype, None)
    return u.transpose(1, 2)


def _scan_inputs(k, v, beta, g, initial_state, dtype, n):
    """Shared front end of written_values / state_decomposition: (u [B, HV, n, V], kh [B, HV, n, K])."""
    B, T, HK, K, HV = _check_inputs(None, k, beta, g, v, initial_state)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype; got {dtype}")
    n = T if n is None else n
    kh = _heads_layout(l2norm(k.to(dtype)), torch.arange(HV, device=k.device), HV // HK)[:, :, :n]
    vh, bh = (x.transpose(1, 2)[:, :, :n].to(dtype) for x in (v, beta))
    gh = g.transpose(1, 2)[:, :, :n]  # keep g's precision; the scan cumsums it in float64
    if initial_state is None:
        S0 = torch.zeros(B, HV, K, v.shape[-1], dtype=dtype, device=k.device)
    else:
        S0 = initial_state.to(dtype)
    u, _ = _delta_scan(kh, vh, bh, gh, S0)
    return u, kh


class StateDecomposition(NamedTuple):
    """The state at ``position`` as a sum of per-token writes (see :func:`state_decomposition`).

    S_p = initial + sum_j weights[:, :, j] * keys[:, j] values[:, j]^T

    weights: [B, HV, T'] decay from token j to position p, exp(G_p - G_j), T' = p + 1.
    keys: [B, T', HV, K] L2-normalised, GQA-expanded keys.
    values: [B, T', HV, V] written values u_j.
    initial: exp(G_p) S_0 [B, HV, K, V], or None without an initial state.
    """

    weights: Tensor
    keys: Tensor
    values: Tensor
    initial: Optional[Tensor]

    def state(self) -> Tensor:
        """Assemble S_p [B, HV, K, V]."""
        S = torch.einsum("bhj,bjhk,bjhv->bhkv", self.weights, self.keys, self.values)
        return S if self.initial is None else S + self.initial

    def per_token(self) -> Tensor:
        """Per-token contributions w_j k_j u_j^T, [B, T', HV, K, V].

        Memory-heavy: T' * K * V entries per batch and head (the initial term is not included).
        """
        return torch.einsum("bhj,bjhk,bjhv->bjhkv", self.weights, self.keys, self.values)


def state_decomposition(
    k: Tensor,
    v: Tensor,
    *,
    beta: Tensor,
    g: Tensor,
    initial_state: Optional[Tensor] = None,
    position: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
) -> StateDecomposition:
    """Decompose the recurrent state after ``position`` into per-token writes.

    S_p = exp(G_p) S_0 + sum_{j <= p} exp(G_p - G_j) k_j u_j^T, G = cumsum(g), u_j the
    written value (:func:`written_values`).  S_p equals the kernel's final state for the
    prefix [0, p].

    Args:
        k: [B, T, HK, K] pre-L2-norm, pre-GQA.  v: [B, T, HV, V].
        beta: [B, T, HV].  g: [B, T, HV], log decay, g <= 0, decay = exp(g).
        initial_state: S_0 [B, HV, K, V] or None.
        position: p in [0, T); default T - 1 (the final state).
        dtype: computation and output dtype.

    Returns:
        StateDecomposition(weights [B, HV, T'], keys [B, T', HV, K], values [B, T', HV, V],
        initial [B, HV, K, V] or None), T' = p + 1; ``.state()`` assembles [B, HV, K, V].
    """
    T = _check_inputs(None, k, beta, g, v, initial_state)[1]
    p = T - 1 if position is None else position
    if isinstance(p, bool) or not hasattr(p, "__index__") or not 0 <= p.__index__() < T:
        raise ValueError(f"position must be an int in [0, {T}) (sequence length T={T}); got {position!r}")
    n = p.__index__() + 1
    u, kh = _scan_inputs(k, v, beta, g, initial_state, dtype, n)
    G = g.transpose(1, 2)[:, :, :n].to(torch.float64).cumsum(-1)  # [B, HV, n]
    weights = (G[..., -1:] - G).exp().to(dtype)
    initial = None
    if initial_state is not None:
        initial = G[..., -1].exp().to(dtype)[..., None, None] * initial_state.to(dtype)
    return StateDecomposition(weights, kh.transpose(1, 2), u.transpose(1, 2), initial)


__all__ = [
    "l2norm",
    "naive_gated_delta_rule",
    "EffectiveAttention",
    "effective_attention",
    "heuristic_effective_attention",
    "written_values",
    "StateDecomposition",
    "state_decomposition",
]
