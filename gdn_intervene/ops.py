"""Exact linear-algebra views of the Gated DeltaNet recurrence (pure math, no model code).

Conventions, shared by every function here:

* ``q``, ``k``: [B, T, HK, K], as the model feeds them to the kernel: before the
  in-kernel L2 norm and before GQA expansion.  ``v``: [B, T, HV, V].
* ``g``: the log decay, g <= 0, decay = exp(g); either per head, [B, T, HV] (Gated
  DeltaNet), or per key channel, [B, T, HV, K] (Kimi Delta Attention, KDA).
* ``beta``: [B, T, HV], write strength in [0, 1] (or [0, 2] for families with
  negative eigenvalues; nothing here assumes beta <= 1).
* GQA: HV is a multiple of HK; key head i serves value heads i*r .. (i+1)*r - 1,
  r = HV // HK (``repeat_interleave``, as in HF transformers).
* The kernel (HF ``torch_{chunk,recurrent}_gated_delta_rule`` with
  ``use_qk_l2norm_in_kernel=True``) L2-normalises q and k (eps 1e-6), scales q
  by K**-0.5 and runs, per value head, with S [K, V] and Λ_t = diag(exp(g_t))
  (a scalar times I for per-head g)::

      S_t = Λ_t S_{t-1} + k_t u_t^T,   u_t = beta_t (v_t - (Λ_t S_{t-1})^T k_t),   o_t = S_t^T q_t

* Unrolled, with G = cumsum(g) over T and the decayed products
  <a_i, b_j>_G = sum_d a_{i,d} b_{j,d} exp(G_{i,d} - G_{j,d})  (= exp(G_i - G_j) (a_i . b_j)
  per head), E_t = (exp(G_t) ⊙ k_t)^T S_0 and F_t = (exp(G_t) ⊙ q_t)^T S_0::

      (I + A) u = diag(beta) (v - E),    A[t, j] = beta_t <k_t, k_j>_G  (j < t)
      o = P u + F,                       P[t, j] = <q_t, k_j>_G         (j <= t)
        = M v + C,   M = P (I + A)^{-1} diag(beta),   C = F - M E

  M is the exact "effective attention" of a head; C is the part of o that comes
  from the initial state S_0 (zero without one).  Exponents are always formed as
  differences G_i - G_j (in float64), never as products of exps: G reaches -1e3
  and beyond on long inputs.

* A row t of M needs no solve over the whole sequence (the adjoint scan): with
  p_j = <q_t, k_j>_G,

      x_j = p_j - k_j . w_j,   w_t = 0,   w_{j-1} = exp(g_j) ⊙ (w_j + beta_j x_j k_j),   M[t, j] = beta_j x_j

  i.e. x^T (I + A) = p^T by back substitution, the sum over later positions carried in
  the K-vector w.  With z_j = exp(G_t - G_j) ⊙ q_t - w_j it is the delta rule transposed,
  z_t = q_t, x_j = k_j . z_j, z_{j-1} = exp(g_j) ⊙ (z_j - beta_j x_j k_j), which needs no p.
  :func:`effective_attention` runs it for many rows at once, C positions at a time (a C x C
  triangular system per block plus the carried z): O(R T (C + K)) time and O(R T) memory for
  R rows, the full matrix at O(T^2 (C + K)) per head.  The state term is C_t = z_{-1}^T S_0,
  from the same scan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from einops import rearrange, repeat

from ._positions import as_positions  # pure: imports nothing else of the package

Tensor = torch.Tensor
Index = Sequence[int] | Tensor

DEFAULT_MAX_BYTES = 4 * 2**30  # effective_attention refuses to plan more than this by default
DEFAULT_CHUNK = 64  # positions per block of the row scan and of the state scan
_FEW_ROWS = 16  # up to this many rows, the row scan solves per block instead of inverting each block
_BLOCK_ELEMENTS = 2**22  # per-channel decayed products are built in blocks of at most this many [I, J, K] entries


# --------------------------------------------------------------------------- helpers


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """L2-normalise the last dim exactly as HF/FLA do: ``x * rsqrt(sum(x*x) + eps)``.

    (HF's KDA kernels write ``x / sqrt(sum(x*x) + eps)``: the same up to one rounding.)
    """
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


_l2norm = l2norm  # naive_gated_delta_rule has a flag named `l2norm`


def _shape(x: Tensor) -> list:
    return list(x.shape)


def _check_inputs(
    q: Tensor | None,
    k: Tensor,
    beta: Tensor,
    g: Tensor,
    v: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[int, int, int, int, int]:
    """Validate shapes (g per head [B, T, HV] or per channel [B, T, HV, K]); return (B, T, HK, K, HV)."""
    if k.dim() != 4:
        raise ValueError(f"k must be [B, T, HK, K]; got shape {_shape(k)}")
    if q is not None and q.shape != k.shape:
        raise ValueError(f"q must have k's shape [B, T, HK, K] = {_shape(k)}; got q {_shape(q)}")
    B, T, HK, K = k.shape
    if beta.dim() != 3 or tuple(beta.shape[:2]) != (B, T):
        raise ValueError(f"beta must be [B, T, HV] with B={B}, T={T} (from k); got {_shape(beta)}")
    HV = beta.shape[2]
    if g.shape != beta.shape and tuple(g.shape) != (B, T, HV, K):
        raise ValueError(
            f"g must be [B, T, HV] = {_shape(beta)} (beta's shape; per-head decay) or [B, T, HV, K] = "
            f"{[B, T, HV, K]} (per-channel decay); got {_shape(g)}"
        )
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
    """A non-empty 1-D long tensor of indices in [0, size); ValueError otherwise (the package's
    one validator, `_positions.as_positions`)."""
    return torch.tensor(
        as_positions(idx, None, name=name, size=size, what=what, scalar=False), dtype=torch.long, device=device
    )


def _gate_layout(g: Tensor, heads_idx: Tensor) -> Tensor:
    """g [B, T, HV] or [B, T, HV, K] -> G = cumsum(g) over T, float64, [B, H', T, Kg] (Kg = 1 or K)."""
    gh = _heads_layout(g, heads_idx).to(torch.float64)
    if gh.dim() == 3:
        gh = gh[..., None]
    return gh.cumsum(2)


def _heads_layout(x: Tensor, heads_idx: Tensor, r: int = 1) -> Tensor:
    """[B, T, HK, *] -> [B, H', T, *] (contiguous) for the value heads in heads_idx (GQA: key
    head = h // r).  One transposing copy, then whole [T, *] slabs picked: a gather straight
    from the transposed view is ~5x slower on CPU."""
    xt = rearrange(x, "b t h ... -> b h t ...").contiguous()
    idx = heads_idx // r
    if idx.numel() == xt.shape[1] and torch.equal(idx, torch.arange(xt.shape[1], device=idx.device)):
        return xt
    return xt.index_select(1, idx)


def _normed_layout(x: Tensor, heads_idx: Tensor, r: int, scale: float = 1.0) -> Tensor:
    """l2norm(x) * scale in the [B, H', T, K] layout (contiguous), in one pass over x.

    The same numbers as ``_heads_layout(l2norm(x), ...)`` up to the rounding of the sum of
    squares (an einsum here, ~1 ulp): ``(x * x).sum(-1, keepdim=True)`` on a [B, T, HK, K]
    tensor is ~4x slower on CPU than the whole rest of this function.
    """
    inv = torch.rsqrt(torch.einsum("bthk,bthk->bth", x, x)[..., None] + 1e-6)
    if scale != 1.0:
        inv = inv * scale
    B, T, HK, K = x.shape
    out = torch.empty(B, HK, T, K, dtype=x.dtype, device=x.device)
    torch.mul(rearrange(x, "b t h k -> b h t k"), rearrange(inv, "b t h k -> b h t k"), out=out)
    idx = heads_idx // r
    if idx.numel() == HK and torch.equal(idx, torch.arange(HK, device=idx.device)):
        return out
    return out.index_select(1, idx)


def _decay_dot(a: Tensor, b: Tensor, Ga: Tensor, Gb: Tensor, keep: Tensor | None = None) -> Tensor:
    """Decayed products <a_i, b_j>_G = sum_d a[..., i, d] b[..., j, d] exp(Ga[..., i, d] - Gb[..., j, d]).

    a [..., I, K], b [..., J, K] in the compute dtype; Ga [..., I, Kg], Gb [..., J, Kg] float64
    (Kg = 1: per-head decay, exp(Ga_i - Gb_j) (a_i . b_j)); keep [I, J] bool or None: where False
    the result is exactly 0 (the exponent is masked to -inf before exp, so no overflow).
    Exponents are differences taken in float64, then rounded to a's dtype. Returns [..., I, J].
    """
    dt = a.dtype
    if Ga.shape[-1] == 1:
        diff = Ga[..., :, None, 0] - Gb[..., None, :, 0]
        if keep is not None:
            diff.masked_fill_(~keep, float("-inf"))
        return (a @ b.transpose(-1, -2)).mul_(diff.to(dt).exp_())
    I, J, K = a.shape[-2], b.shape[-2], a.shape[-1]
    lead = max(1, math.prod(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])))
    step = max(1, _BLOCK_ELEMENTS // max(1, lead * J * K))
    out = []
    for i in range(0, I, step):  # [I, J, K] at once would be T^2 K: build in row blocks
        diff = Ga[..., i : i + step, None, :] - Gb[..., None, :, :]
        if keep is not None:
            diff.masked_fill_(~keep[i : i + step, :, None], float("-inf"))
        w = diff.to(dt).exp_().mul_(b[..., None, :, :])
        out.append((w @ a[..., i : i + step, :, None]).squeeze(-1))  # [..., i', J]
    return torch.cat(out, dim=-2)


def _tril(n: int, m: int, device, offset: int = 0) -> Tensor:
    return torch.ones(n, m, dtype=torch.bool, device=device).tril(offset)


def _delta_scan(
    kh: Tensor, v: Tensor, beta: Tensor, G: Tensor, S: Tensor, chunk: int = DEFAULT_CHUNK
) -> tuple[Tensor, Tensor]:
    """Chunked scan of the delta rule: (u [B, H, T, V] written values, final S [B, H, K, V]).

    kh [B, H, T, K] L2-normalised keys, v [B, H, T, V], beta [B, H, T], G [B, H, T, Kg] =
    cumsum(g) in float64 (Kg = 1 per head, K per channel; g <= 0), S [B, H, K, V] initial state.
    Within a chunk (I + A) u = diag(beta) (v - E) is one triangular solve; memory O(T * chunk).
    """
    us = []
    G_prev = torch.zeros_like(G[:, :, :1])  # G at the position before the chunk
    for s in range(0, kh.shape[2], chunk):
        k_c, v_c, b_c = kh[:, :, s : s + chunk], v[:, :, s : s + chunk], beta[:, :, s : s + chunk]
        Gc = G[:, :, s : s + chunk] - G_prev  # decay since the chunk start, <= 0
        c = Gc.shape[2]
        # A is strictly lower; the unit diagonal of I + A is implied by unitriangular=True.
        A = _decay_dot(k_c, k_c, Gc, Gc, _tril(c, c, kh.device, -1)).mul_(b_c[..., None])
        E = (k_c * Gc.exp().to(kh.dtype)) @ S  # what the carried state predicts
        u_c = torch.linalg.solve_triangular(A, b_c[..., None] * (v_c - E), upper=False, unitriangular=True)
        to_end = (Gc[:, :, -1:] - Gc).exp().to(kh.dtype)  # decay from each token to the chunk end
        S = Gc[:, :, -1].exp().to(kh.dtype)[..., None] * S + (k_c * to_end).transpose(-1, -2) @ u_c
        us.append(u_c)
        G_prev = G[:, :, s + c - 1 : s + c]
    return torch.cat(us, dim=2), S


# --------------------------------------------------------------------------- reference


def naive_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    l2norm: bool = True,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Token-by-token float64 reference of the gated delta rule (mirrors HF's recurrent kernels).

    Per-head g is HF's ``torch_recurrent_gated_delta_rule``; per-channel g is HF's
    ``recurrent_kimi_delta_attention`` (KDA): S_t = diag(exp(g_t)) S_{t-1} + k_t u_t^T.

    Args:
        q, k: [B, T, HK, K] (pre-L2-norm, pre-GQA).  v: [B, T, HV, V].
        g: [B, T, HV] (per head) or [B, T, HV, K] (per key channel), log decay, g <= 0,
            decay = exp(g).  beta: [B, T, HV].
        initial_state: [B, HV, K, V] or None (zeros).
        l2norm: L2-normalise q and k (eps 1e-6) first, like ``use_qk_l2norm_in_kernel=True``.
        scale: query scale, default K**-0.5.

    Returns:
        (o [B, T, HV, V], S [B, HV, K, V]), both float64.
    """
    B, T, HK, K, HV = _check_inputs(q, k, beta, g, v, initial_state)
    q, k, v, g, beta = (x.to(torch.float64) for x in (q, k, v, g, beta))
    if HV != HK:
        q, k = (repeat(x, "b t h k -> b t (h r) k", r=HV // HK) for x in (q, k))  # key head h serves r value heads
    if l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = q * (K**-0.5 if scale is None else scale)
    if g.dim() == 3:
        g = g[..., None]  # [B, T, HV, 1]: one decay for every key channel
    if initial_state is None:
        S = torch.zeros(B, HV, K, v.shape[-1], dtype=torch.float64, device=v.device)
    else:
        S = initial_state.to(torch.float64).clone()
    o = torch.empty_like(v)
    for t in range(T):
        S = S * g[:, t].exp()[..., None]  # row d of S (key channel d) decays by exp(g_{t,d})
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        o[:, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, t])
    return o, S


# --------------------------------------------------------------------------- effective attention


class EffectiveAttention(NamedTuple):
    """Result of :func:`effective_attention` (and :func:`effective_attention_solve`).

    matrix: M [B, HV, T, T] (HV -> len(heads), T rows -> len(rows) when given), lower
        triangular: o[b, t, h] = sum_s M[b, h, t, s] v[b, s, h] + state_term[b, t, h].
    state_term: C [B, T, HV, V] (same head/row selection), the initial state's
        contribution to o; None when no initial_state was given.
    """

    matrix: Tensor
    state_term: Tensor | None


class _Plan(NamedTuple):
    B: int
    T: int
    K: int
    H: int
    R: int
    n: int  # positions used: max(rows) + 1 (causality)
    heads: Tensor
    rows: Tensor | None
    qh: Tensor  # [B, H, R, K] normalised, scaled query rows
    kh: Tensor  # [B, H, n, K] normalised keys
    b: Tensor  # [B, H, n] beta
    G: Tensor  # [B, H, T, Kg] cumsum(g), float64
    row_pos: Tensor  # [R] query positions


def _plan(q, k, beta, g, heads, rows, initial_state, dtype, max_bytes, need_fn) -> _Plan:
    """Shared front end of the two effective-attention paths: validate, select, normalise."""
    B, T, HK, K, HV = _check_inputs(q, k, beta, g, None, initial_state)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype; got {dtype}")
    dev = k.device
    heads_idx = (
        torch.arange(HV, device=dev)
        if heads is None
        else _index("heads", heads, HV, f"there are {HV} value heads", dev)
    )
    rows_idx = None if rows is None else _index("rows", rows, T, f"sequence length T={T}", dev)
    H = heads_idx.numel()
    R = T if rows_idx is None else rows_idx.numel()
    n = T if rows_idx is None else int(rows_idx.max()) + 1  # causality: later positions are irrelevant
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = need_fn(itemsize, B, H, R, n, T, K, g.dim() == 4)
    limit = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    if need > limit:
        raise ValueError(
            f"effective_attention would need ~{need / 2**30:.2f} GiB ({need} bytes: a [B={B}, H={H}, {R}, {T}] "
            f"{dtype} matrix plus temporaries), above max_bytes={limit}; pass rows=[...] (query positions) "
            f"and/or heads=[...] to compute a slice, or raise max_bytes"
        )
    r = HV // HK
    row_pos = torch.arange(n, device=dev) if rows_idx is None else rows_idx
    # normalise only what is read: the query rows and the first n keys (before the GQA expansion)
    qh = _normed_layout(q[:, row_pos].to(dtype), heads_idx, r, K**-0.5)  # [B, H, R, K]
    kh = _normed_layout(k[:, :n].to(dtype), heads_idx, r)  # [B, H, n, K]
    b = _heads_layout(beta[:, :n], heads_idx).to(dtype)  # [B, H, n]
    return _Plan(B, T, K, H, R, n, heads_idx, rows_idx, qh, kh, b, _gate_layout(g, heads_idx), row_pos)


def _state_term(p: _Plan, initial_state: Tensor, Z: Tensor, dtype) -> Tensor:
    """C [B, R, H, V] = Z_t^T S_0 with Z [B, H, R, K] = exp(G_t) ⊙ q_t - sum_j M[t, j] exp(G_j) ⊙ k_j:
    S_0's direct read at t minus its prediction removed from every write."""
    return rearrange(Z @ initial_state[:, p.heads].to(dtype), "b h r v -> b r h v")


def effective_attention(
    q: Tensor,
    k: Tensor,
    *,
    beta: Tensor,
    g: Tensor,
    heads: Index | None = None,
    rows: Index | None = None,
    initial_state: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    max_bytes: float | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> EffectiveAttention:
    """Exact per-head mixing matrix M of the gated delta rule: o = M v + C, by the adjoint row scan.

    M = P (I + A)^{-1} diag(beta) (module docstring), with P[t, j] = <q_t, k_j>_G and
    A[t, j] = beta_t <k_t, k_j>_G on L2-normalised keys/queries (q also scaled by K**-0.5).
    Each row solves x^T (I + A) = p^T backwards (the adjoint scan: z_t = q_t, x_j = k_j . z_j,
    z_{j-1} = exp(g_j) ⊙ (z_j - beta_j x_j k_j), M[t, j] = beta_j x_j) in blocks of ``chunk``
    positions: per block one chunk x chunk unit-triangular system shared by all requested rows,
    plus each row's carried K-vector z.  Cost per head: O(R T (chunk + K)) time for R rows (the
    full matrix: T^2 (2K + chunk) / 2 multiply-adds, against ~T^3 / 2 for the solve); memory: the
    R x T output, the normalised keys (T x K) and at most ~2^22 elements of per-block
    temporaries -- rows-only never allocates anything of size T^2.  o is the kernel output
    before the output norm.  Reference: :func:`effective_attention_solve`.

    Args:
        q, k: [B, T, HK, K], pre-L2-norm, pre-GQA expansion (as the ``q``/``k`` sites give them).
        beta: [B, T, HV].  g: [B, T, HV] (per head) or [B, T, HV, K] (per key channel, KDA),
            log decay, g <= 0, decay = exp(g).
        heads: value-head indices in [0, HV) to compute (default all), in the given order.
        rows: query positions in [0, T) (sequence or 1-D integer tensor, any order, repeats
            allowed); returns only those rows of M. Only the first max(rows) + 1 positions are read.
        initial_state: S_0 [B, HV, K, V]; adds ``state_term``.
        dtype: computation and output dtype (float32 default; float64 for ~1e-12 accuracy).
            The cumulative decay G and its differences are always float64.
        max_bytes: memory guard (default 4 GiB); ValueError if the estimate (the output plus
            the per-block temporaries) exceeds it.
        chunk: positions per block of the scan (64 default).

    Returns:
        EffectiveAttention(matrix [B, HV, T, T] -- or [B, HV, R, T] with rows, HV ->
        len(heads) with heads --, state_term [B, T, HV, V] / [B, R, HV, V] or None).
        Entries above the causal diagonal are exactly zero.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int; got {chunk!r}")

    def need(itemsize, B, H, R, n, T, K, per_channel):
        block = R * chunk * 2 + R * K * 3 + chunk * chunk * 2  # p / rhs; z, its update; one block's system
        return itemsize * B * H * (R * T + block)

    p = _plan(q, k, beta, g, heads, rows, initial_state, dtype, max_bytes, need)
    M, Z = _row_scan(p.qh, p.row_pos, p.kh, p.b, p.G, chunk)
    C = None if initial_state is None else _state_term(p, initial_state, Z, dtype)
    if p.n < p.T:
        M = torch.cat([M, M.new_zeros(p.B, p.H, p.R, p.T - p.n)], dim=-1)
    return EffectiveAttention(M, C)


def _row_scan(qh: Tensor, t: Tensor, kh: Tensor, b: Tensor, G: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """The adjoint scan for rows at positions t: (M rows [B, H, R, n], Z [B, H, R, K]).

    qh [B, H, R, K] normalised, scaled query rows; t [R] their positions (< n); kh [B, H, n, K];
    b [B, H, n] beta; G [B, H, >=n, Kg] = cumsum(g), float64.

    Per row, the scan of the module docstring carries z_j = exp(G_t - G_j) ⊙ q_t - w_j instead
    of w_j (the adjoint state: what a unit of key j would be read with at t).  Then
    x_j = k_j . z_j, and the recursion is the delta rule transposed:

        z_t = q_t,   x_j = k_j . z_j,   z_{j-1} = exp(g_j) ⊙ (z_j - beta_j x_j k_j),   M[t, j] = beta_j x_j

    so p never has to be built for a row whose position lies past the current block.
    Z = z_{-1} = exp(G_t) ⊙ q_t - sum_j M[t, j] exp(G_j) ⊙ k_j gives the state term Z^T S_0.

    Blocks [s, e) of ``chunk`` positions run from the last to the first.  Rows are taken in
    position order; per block, the rows with t in [s, e) start there (rhs = p, built for them
    alone), the rows with t >= e continue:

        rhs = z_{e-1} (exp(G_{e-1} - G_j) ⊙ k_j)_j^T                 (rows with t >= e)
        M[t, s:e] = rhs (I + A_blk)^{-1} diag(beta)                   A_blk[i, j] = beta_i <k_i, k_j>_G, i > j
        z_{s-1} = exp(G_{e-1} - G_{s-1}) ⊙ z_{e-1} - M[t, s:e] (exp(G_j - G_{s-1}) ⊙ k_j)_j
                  (rows starting here: exp(G_t - G_{s-1}) ⊙ q_t in place of the first term)

    Per (row, block): 2 C K + C^2 multiply-adds, so the full matrix costs T^2 (2K + C) / 2 per
    head.  What does not depend on the rows ((I + A_blk)^{-1} diag(beta), the decayed keys) is
    built for a group of blocks at once; the inverse is one batched unit-triangular solve (for
    up to 16 rows, one small solve per block instead).
    """
    Bz, H, R, K = qh.shape
    n, dev = kh.shape[2], kh.device
    order = torch.argsort(t, stable=True)
    blk = _key_blocks(kh, b, G[:, :, :n], chunk)
    rows = _Rows(t[order], qh[:, :, order], G[:, :, t[order]], R <= _FEW_ROWS,
                 torch.searchsorted(t[order], torch.arange(blk.nc + 1, device=dev) * blk.C).tolist())  # fmt: skip
    Ms = qh.new_zeros(Bz, H, R, blk.nc * blk.C)
    z = qh.new_zeros(Bz, H, R, K)  # per row: z at the position before the current block's end
    per_block = Bz * H * blk.C * (3 * blk.C + 3 * K) * (2 if blk.Kg == 1 else K)  # elements of the group temporaries
    c1 = blk.nc
    while c1 > 0:
        if rows.first[c1 - 1] == R:  # no row reaches back into this block: x = 0 there, z stays 0
            c1 -= 1
            continue
        c0 = max(0, c1 - max(1, _BLOCK_ELEMENTS // per_block))
        group = _block_group(blk, slice(c0, c1), rows.few)
        for c in reversed(range(c0, c1)):
            _row_block(blk, group, rows, c, c - c0, z, Ms)
        c1 = c0
    if torch.equal(order, torch.arange(R, device=dev)):
        return Ms[:, :, :, :n], z  # rows were given in order (the full matrix): no copy
    inv = torch.empty_like(order)
    inv[order] = torch.arange(R, device=dev)
    return Ms[:, :, inv, :n], z[:, :, inv]


class _KeyBlocks(NamedTuple):
    """The keys in nc blocks of C positions (padded with k = 0, beta = 0, g = 0, so M = 0 there):
    kc [B, H, nc, C, K], bc [B, H, nc, C], Gc [B, H, nc, C, Kg] = cumsum(g) (float64), G_end and
    G_before [B, H, nc, 1, Kg] (G at each block's last position and before its first, G_{-1} = 0)."""

    kc: Tensor
    bc: Tensor
    Gc: Tensor
    G_end: Tensor
    G_before: Tensor
    C: int
    nc: int
    Kg: int


def _key_blocks(kh: Tensor, b: Tensor, G: Tensor, chunk: int) -> _KeyBlocks:
    Bz, H, n, K = kh.shape
    C = min(chunk, n)
    nc = -(-n // C)
    pad = nc * C - n
    if pad:
        kh = torch.cat([kh, kh.new_zeros(Bz, H, pad, K)], 2)
        b = torch.cat([b, b.new_zeros(Bz, H, pad)], 2)
        G = torch.cat([G, G[:, :, -1:].expand(-1, -1, pad, -1)], 2)
    Kg = G.shape[-1]
    kc, bc, Gc = (rearrange(x, "b h (n c) ... -> b h n c ...", c=C) for x in (kh, b, G))  # blocks of C positions
    G_end = Gc[:, :, :, -1:]
    G_before = torch.cat([torch.zeros_like(G_end[:, :, :1]), G_end[:, :, :-1]], 2)
    return _KeyBlocks(kc, bc, Gc, G_end, G_before, C, nc, Kg)


class _Rows(NamedTuple):
    """The query rows in position order: ts [R], qs [B, H, R, K], Gq [B, H, R, Kg]; few: solve per
    block instead of inverting; first[c]: the first row with t >= block c's start."""

    ts: Tensor
    qs: Tensor
    Gq: Tensor
    few: bool
    first: list


class _Group(NamedTuple):
    """What a group of blocks shares whatever the rows: A [B, H, g, C, C] (I + A unit lower),
    (I + A)^{-1} diag(beta) or None (few rows), the decays to the block end / from its start and
    across it, and the decayed keys (per channel) or None (per head)."""

    A: Tensor
    Ainv_b: Tensor | None
    to_end: Tensor
    from_start: Tensor
    carry: Tensor
    k_end: Tensor | None
    k_start: Tensor | None


def _block_group(blk: _KeyBlocks, sl: slice, few_rows: bool) -> _Group:
    kc, bc, Gc, dt = blk.kc, blk.bc, blk.Gc, blk.kc.dtype
    A = _decay_dot(kc[:, :, sl], kc[:, :, sl], Gc[:, :, sl], Gc[:, :, sl], _tril(blk.C, blk.C, kc.device, -1))
    A.mul_(bc[:, :, sl, :, None])
    Ainv_b = None  # few rows: a solve per block is cheaper than the batched inverse
    if not few_rows:
        eye = torch.eye(blk.C, dtype=dt, device=kc.device)
        Ainv_b = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)  # (I + A)^{-1}
        Ainv_b.mul_(bc[:, :, sl, None, :])  # (I + A)^{-1} diag(beta)
    to_end = (blk.G_end[:, :, sl] - Gc[:, :, sl]).exp().to(dt)  # exp(G_{e-1} - G_j), [B, H, g, C, Kg]
    from_start = (Gc[:, :, sl] - blk.G_before[:, :, sl]).exp().to(dt)  # exp(G_j - G_{s-1})
    carry = (blk.G_end[:, :, sl] - blk.G_before[:, :, sl]).exp().to(dt)  # [B, H, g, 1, Kg]
    if blk.Kg == 1:  # per head: scale the small [R, C] products instead of copying the keys twice
        return _Group(A, Ainv_b, to_end[..., 0], from_start[..., 0], carry, None, None)  # [B, H, g, C]
    k_end, k_start = kc[:, :, sl] * to_end, kc[:, :, sl] * from_start  # decayed keys, [B, H, g, C, K]
    return _Group(A, Ainv_b, to_end, from_start, carry, k_end, k_start)


def _row_block(blk: _KeyBlocks, grp: _Group, rows: _Rows, c: int, i: int, z: Tensor, Ms: Tensor) -> None:
    """Block c (the i-th of its group) for every row reaching back into it: M[t, s:e] into Ms and
    z carried to the position before the block, in place (see `_row_scan`)."""
    kc, C, R = blk.kc, blk.C, len(rows.ts)
    a, a_next = rows.first[c], min(rows.first[c + 1], R)
    s, e = c * C, (c + 1) * C
    rhs = rows.qs.new_empty(*z.shape[:2], R - a, C)
    if a_next > a:  # rows starting in this block: p_j for j <= t
        causal = rows.ts[a:a_next, None] >= torch.arange(s, e, device=kc.device)
        qs, Gq = rows.qs[:, :, a:a_next], rows.Gq[:, :, a:a_next]
        rhs[:, :, : a_next - a] = _decay_dot(qs, kc[:, :, c], Gq, blk.Gc[:, :, c], causal)
        z[:, :, a:a_next] = (Gq - blk.G_before[:, :, c]).exp().to(kc.dtype) * qs
    if a_next < R:  # rows past this block
        if blk.Kg == 1:
            rhs[:, :, a_next - a :] = (z[:, :, a_next:] @ kc[:, :, c].transpose(-1, -2)).mul_(
                grp.to_end[:, :, i, None, :]
            )
        else:
            rhs[:, :, a_next - a :] = z[:, :, a_next:] @ grp.k_end[:, :, i].transpose(-1, -2)
        z[:, :, a_next:] *= grp.carry[:, :, i]
    if grp.Ainv_b is None:  # x (I + A) = rhs, M[t, s:e] = beta_j x_j
        Mc = torch.linalg.solve_triangular(grp.A[:, :, i], rhs, upper=False, left=False, unitriangular=True)
        Mc.mul_(blk.bc[:, :, c, None, :])
    else:
        Mc = rhs @ grp.Ainv_b[:, :, i]
    Ms[:, :, a:, s:e] = Mc
    if blk.Kg == 1:
        z[:, :, a:] -= (Mc * grp.from_start[:, :, i, None, :]) @ kc[:, :, c]
    else:
        z[:, :, a:] -= Mc @ grp.k_start[:, :, i]


def effective_attention_solve(
    q: Tensor,
    k: Tensor,
    *,
    beta: Tensor,
    g: Tensor,
    heads: Index | None = None,
    rows: Index | None = None,
    initial_state: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    max_bytes: float | None = None,
) -> EffectiveAttention:
    """Reference path for :func:`effective_attention`: builds P and I + A over all n positions
    and solves X (I + A) = P in one batched triangular solve (``solve_triangular(..., left=False,
    unitriangular=True)``), never forming the inverse.  O(n^3) per head for the full matrix,
    O(R n^2) for R rows, and O(n^2) memory even for one row: use it to check the scan, not
    on long inputs.  Same arguments, shapes and conventions as :func:`effective_attention`
    (g [B, T, HV] per head or [B, T, HV, K] per channel; g <= 0, decay = exp(g)).

    Returns:
        EffectiveAttention(matrix [B, HV, R, T], state_term [B, R, HV, V] or None).
    """

    def need(itemsize, B, H, R, n, T, K, per_channel):
        return itemsize * B * H * (3 * n * max(n, R) + R * T)

    p = _plan(q, k, beta, g, heads, rows, initial_state, dtype, max_bytes, need)
    n, dev = p.n, p.kh.device
    causal = p.row_pos[:, None] >= torch.arange(n, device=dev)  # [R, n]
    P = _decay_dot(p.qh, p.kh, p.G[:, :, p.row_pos], p.G[:, :, :n], causal)  # [B, H, R, n]
    A = _decay_dot(p.kh, p.kh, p.G[:, :, :n], p.G[:, :, :n], _tril(n, n, dev, -1)).mul_(p.b[..., :, None])
    X = torch.linalg.solve_triangular(A, P, upper=False, left=False, unitriangular=True)  # X (I + A) = P
    del A, P
    M = X.mul_(p.b[..., None, :])  # [B, H, R, n]
    M.masked_fill_(~causal, 0.0)  # exact zeros above the diagonal
    C = None
    if initial_state is not None:
        eGq = p.G[:, :, p.row_pos].exp().to(dtype)  # exp(G_t) <= 1: decay of S_0 up to t
        Z = eGq * p.qh - M @ (p.kh * p.G[:, :, :n].exp().to(dtype))  # minus sum_j M[t, j] exp(G_j) ⊙ k_j
        C = _state_term(p, initial_state, Z, dtype)
    if n < p.T:
        M = torch.cat([M, M.new_zeros(p.B, p.H, p.R, p.T - n)], dim=-1)
    return EffectiveAttention(M, C)


def heuristic_effective_attention(q: Tensor, k: Tensor, *, beta: Tensor, g: Tensor) -> Tensor:
    """The approximation TransformerLens ships: M'[t, j] = <q_t, k_j>_G beta_j on raw q/k.

    Uses PRE-norm q/k, no K**-0.5 scale and no delta-rule key removal ((I + A)^{-1}),
    so it does NOT reconstruct the kernel output.  Measured in tests/test_ops.py (randn
    q/k/v, beta = sigmoid(randn), B=2, T=64): relative error ||M' v - o|| / ||o|| ~ 65
    for K=V=16 (66.3 GQA HK=2/HV=4, 64.2 HK=HV=2; ~23 for K=8 -- mostly the missing
    normalisation), and still ~0.3 (0.29-0.30) after the best scalar rescaling of M' v (the missing
    key removal), where the exact :func:`effective_attention` gives ~4e-7.  Provided for
    comparison only.

    Args:
        q, k: [B, T, HK, K] pre-norm.  beta: [B, T, HV].  g: [B, T, HV] or [B, T, HV, K],
        log decay, g <= 0, decay = exp(g).

    Returns:
        M' [B, HV, T, T] (float32, or float64 for float64 inputs), lower triangular.
    """
    B, T, HK, K, HV = _check_inputs(q, k, beta, g)
    dtype = torch.promote_types(q.dtype, torch.float32)
    all_heads = torch.arange(HV, device=k.device)
    qh = _heads_layout(q.to(dtype), all_heads, HV // HK)
    kh = _heads_layout(k.to(dtype), all_heads, HV // HK)
    G = _gate_layout(g, all_heads)
    M = _decay_dot(qh, kh, G, G, _tril(T, T, k.device))
    return M * rearrange(beta, "b t h -> b h 1 t").to(dtype)


# --------------------------------------------------------------------------- state view


def written_values(
    k: Tensor,
    v: Tensor,
    *,
    beta: Tensor,
    g: Tensor,
    initial_state: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """What each token wrote into the state: u_t = beta_t (v_t - (Λ_t S_{t-1})^T k_t), Λ_t = diag(exp(g_t)).

    S_t = Λ_t S_{t-1} + k_t u_t^T with k_t L2-normalised.  Computed by a chunked
    triangular solve (memory O(T * 64) per head).

    Args:
        k: [B, T, HK, K] pre-L2-norm, pre-GQA.  v: [B, T, HV, V].
        beta: [B, T, HV].  g: [B, T, HV] (per head) or [B, T, HV, K] (per key channel),
            log decay, g <= 0, decay = exp(g).
        initial_state: S_0 [B, HV, K, V] or None (zeros).
        dtype: computation and output dtype.

    Returns:
        u [B, T, HV, V].
    """
    u, _, _ = _scan_inputs(k, v, beta, g, initial_state, dtype, None)
    return rearrange(u, "b h t v -> b t h v")


def _scan_inputs(k, v, beta, g, initial_state, dtype, n):
    """Shared front end of written_values / state_decomposition:
    (u [B, HV, n, V], kh [B, HV, n, K], G [B, HV, n, Kg] float64)."""
    B, T, HK, K, HV = _check_inputs(None, k, beta, g, v, initial_state)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype; got {dtype}")
    n = T if n is None else n
    heads = torch.arange(HV, device=k.device)
    kh = _normed_layout(k[:, :n].to(dtype), heads, HV // HK)
    vh, bh = (rearrange(x, "b t h ... -> b h t ...")[:, :, :n].to(dtype) for x in (v, beta))
    G = _gate_layout(g, heads)[:, :, :n]  # cumsum in float64, from g's own precision
    if initial_state is None:
        S0 = torch.zeros(B, HV, K, v.shape[-1], dtype=dtype, device=k.device)
    else:
        S0 = initial_state.to(dtype)
    u, _ = _delta_scan(kh, vh, bh, G, S0)
    return u, kh, G


class StateDecomposition(NamedTuple):
    """The state at ``position`` as a sum of per-token writes (see :func:`state_decomposition`).

    S_p = initial + sum_j (weights[:, :, j] ⊙ keys[:, j]) values[:, j]^T

    weights: decay from token j to position p, exp(G_p - G_j) <= 1: [B, HV, T'] for per-head
        decay, [B, HV, T', K] (one per key channel) for per-channel decay; T' = p + 1.
    keys: [B, T', HV, K] L2-normalised, GQA-expanded keys.
    values: [B, T', HV, V] written values u_j.
    initial: diag(exp(G_p)) S_0 [B, HV, K, V], or None without an initial state.
    """

    weights: Tensor
    keys: Tensor
    values: Tensor
    initial: Tensor | None

    def decayed_keys(self) -> Tensor:
        """exp(G_p - G_j) ⊙ k_j, [B, T', HV, K]: the key each write is read with at p."""
        w = rearrange(self.weights, "b h t ... -> b t h ...")  # [B, T', HV] or [B, T', HV, K]
        return self.keys * (w[..., None] if w.dim() == 3 else w)

    def state(self) -> Tensor:
        """Assemble S_p [B, HV, K, V]."""
        S = torch.einsum("bjhk,bjhv->bhkv", self.decayed_keys(), self.values)
        return S if self.initial is None else S + self.initial

    def per_token(self) -> Tensor:
        """Per-token contributions (w_j ⊙ k_j) u_j^T, [B, T', HV, K, V].

        Memory-heavy: T' * K * V entries per batch and head (the initial term is not included).
        """
        return torch.einsum("bjhk,bjhv->bjhkv", self.decayed_keys(), self.values)


def state_decomposition(
    k: Tensor,
    v: Tensor,
    *,
    beta: Tensor,
    g: Tensor,
    initial_state: Tensor | None = None,
    position: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> StateDecomposition:
    """Decompose the recurrent state after ``position`` into per-token writes.

    S_p = diag(exp(G_p)) S_0 + sum_{j <= p} (exp(G_p - G_j) ⊙ k_j) u_j^T, G = cumsum(g), u_j
    the written value (:func:`written_values`).  S_p equals the kernel's final state for the
    prefix [0, p].

    Args:
        k: [B, T, HK, K] pre-L2-norm, pre-GQA.  v: [B, T, HV, V].
        beta: [B, T, HV].  g: [B, T, HV] (per head) or [B, T, HV, K] (per key channel),
            log decay, g <= 0, decay = exp(g).
        initial_state: S_0 [B, HV, K, V] or None.
        position: p in [0, T); default T - 1 (the final state).
        dtype: computation and output dtype.

    Returns:
        StateDecomposition(weights [B, HV, T'] (per-channel g: [B, HV, T', K]), keys
        [B, T', HV, K], values [B, T', HV, V], initial [B, HV, K, V] or None), T' = p + 1;
        ``.state()`` assembles [B, HV, K, V].
    """
    T = _check_inputs(None, k, beta, g, v, initial_state)[1]
    p = T - 1 if position is None else position
    if isinstance(p, bool) or not hasattr(p, "__index__") or not 0 <= p.__index__() < T:
        raise ValueError(f"position must be an int in [0, {T}) (sequence length T={T}); got {position!r}")
    n = p.__index__() + 1
    u, kh, G = _scan_inputs(k, v, beta, g, initial_state, dtype, n)
    weights = (G[:, :, -1:] - G).exp().to(dtype)  # [B, HV, n, Kg]
    initial = None
    if initial_state is not None:
        initial = G[:, :, -1].exp().to(dtype)[..., None] * initial_state.to(dtype)
    if g.dim() == 3:
        weights = weights[..., 0]
    return StateDecomposition(weights, rearrange(kh, "b h t k -> b t h k"), rearrange(u, "b h t v -> b t h v"), initial)


# --------------------------------------------------------------------------- attribution patching


class DeltaRuleRun(NamedTuple):
    """One run's inputs of a GDN / KDA layer, as its sites give them: q, k [B, T, HK, K]
    (pre-L2-norm, pre-GQA), v [B, T, HV, V], beta [B, T, HV], g [B, T, HV] or [B, T, HV, K]
    (log decay, g <= 0, decay = exp(g))."""

    q: Tensor
    k: Tensor
    v: Tensor
    beta: Tensor
    g: Tensor


def _run_layout(run: DeltaRuleRun, dtype):
    """(qh, kh [B, HV, T, K] normalised (q also scaled by K^-1/2), vh [B, HV, T, V], bh [B, HV, T],
    decay [B, HV, T, Kg]) in `dtype` (Kg = 1 per head, K per channel)."""
    q, k, v, beta, g = run
    _, _, HK, K, HV = _check_inputs(q, k, beta, g, v)
    heads = torch.arange(HV, device=k.device)
    qh = _normed_layout(q.to(dtype), heads, HV // HK, K**-0.5)
    kh = _normed_layout(k.to(dtype), heads, HV // HK)
    gh = _heads_layout(g, heads).to(dtype)
    decay = (gh[..., None] if gh.dim() == 3 else gh).exp()
    return qh, kh, rearrange(v, "b t h v -> b h t v").to(dtype), rearrange(beta, "b t h -> b h t").to(dtype), decay


def _step(S: Tensor, kh, vh, bh, decay, t: int) -> Tensor:
    """S_t = diag(exp(g_t)) S_{t-1} + k_t u_t^T, u_t = beta_t (v_t - (diag(exp(g_t)) S_{t-1})^T k_t)."""
    S = S * decay[:, :, t, :, None]
    u = bh[:, :, t, None] * (vh[:, :, t] - torch.einsum("bhkv,bhk->bhv", S, kh[:, :, t]))
    return S + kh[:, :, t, :, None] * u[:, :, None, :]


def state_patching_scores(
    base: DeltaRuleRun,
    source: DeltaRuleRun,
    delta: Tensor,
    *,
    along: DeltaRuleRun | None = None,
    dtype: torch.dtype = torch.float32,
    chunk: int = DEFAULT_CHUNK,
) -> Tensor:
    """Attribution patching of the recurrent state: the first-order change of a metric when the
    base run's state after token p is replaced by the source run's, for every p at once.

        score[b, h, p] = <mu_p, S^source_p - S^base_p>,   mu_p = d metric / d S_p

    where S_p is the state after token p (no initial state) and mu_p its gradient through the
    later tokens only (patching S_p changes o_{p+1}, o_{p+2}, ...; o_p was read before). With
    S_t = A_t S_{t-1} + beta_t k_t v_t^T, A_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) and
    o_t = S_t^T q_t (q, k L2-normalised, q scaled by K^-1/2, as in the kernel), the adjoint is

        mu_{T-1} = 0,   mu_{p-1} = A_p^T (q_p delta_p^T + mu_p),   A_p^T X = diag(exp(g_p)) (X - beta_p k_p (k_p^T X)),

    a backward scan of the same kind as the forward. Neither all T states nor all T adjoints are
    held: the forward keeps both runs' states every `chunk` positions, and the backward scan
    recomputes one chunk of states at a time (memory O((T / chunk + chunk) K V) per head).

    Args:
        base: the run being patched.
        source: the run the states come from; same shapes as `base`.
        delta: d metric / d o_t, [B, T, HV, V] (the gradient at the `recurrence` site) in the run
            the gradient is taken at: `along`, default `base` (first order).
        along: the run whose adjoint mu is taken (a point on the path from base to source, for
            integrated gradients: average the scores over the path's points); default `base`.
        dtype: computation dtype (float64 for an exact check).

    Returns:
        scores [B, HV, T] in `dtype`; the last column is 0 (the final state reaches no later token).
    """
    qh, kh, vh, bh, dec = _run_layout(base, dtype)
    _, ks, vs, bs, ds = _run_layout(source, dtype)
    qa, ka, _, ba, da = (qh, kh, vh, bh, dec) if along is None else _run_layout(along, dtype)
    for name, (x, y) in {"source": (ks, kh), "along": (ka, kh)}.items():
        if x.shape != y.shape or (name == "source" and (vs.shape != vh.shape or ds.shape != dec.shape)):
            raise ValueError(f"the {name} and base runs differ in shape: k {_shape(x)} vs {_shape(y)}")
    B, HV, T, K = kh.shape
    dh = rearrange(delta, "b t h v -> b h t v").to(dtype)
    if tuple(dh.shape) != tuple(vh.shape):
        raise ValueError(f"delta must be [B, T, HV, V] = {[B, T, HV, vh.shape[-1]]}; got {_shape(delta)}")
    runs = ((kh, vh, bh, dec), (ks, vs, bs, ds))
    starts = list(range(0, T, chunk))
    checkpoints = _state_checkpoints(
        runs, starts, chunk, T, torch.zeros(B, HV, K, vh.shape[-1], dtype=dtype, device=kh.device)
    )
    scores = torch.zeros(B, HV, T, dtype=dtype, device=kh.device)
    mu = torch.zeros_like(checkpoints[0][0])
    for c0, (Sb, Ss) in reversed(list(zip(starts, checkpoints))):
        diffs = []
        for t in range(c0, min(c0 + chunk, T)):
            Sb, Ss = _step(Sb, *runs[0], t), _step(Ss, *runs[1], t)
            diffs.append(Ss - Sb)
        for t in reversed(range(c0, c0 + len(diffs))):
            scores[:, :, t] = (mu * diffs[t - c0]).sum((-2, -1))
            mu = _adjoint_step(mu, qa, ka, ba, da, dh, t)
    return scores


def _state_checkpoints(runs, starts: list[int], chunk: int, T: int, zero: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The (base, source) states before each chunk of `chunk` positions, [B, HV, K, V] each."""
    checkpoints, (Sb, Ss) = [], (zero, zero)
    for c0 in starts:
        checkpoints.append((Sb, Ss))
        for t in range(c0, min(c0 + chunk, T)):
            Sb, Ss = _step(Sb, *runs[0], t), _step(Ss, *runs[1], t)
    return checkpoints


def _adjoint_step(mu: Tensor, qh, kh, bh, dec, dh, t: int) -> Tensor:
    """mu_{t-1} = A_t^T (q_t delta_t^T + mu_t), A_t^T X = diag(exp(g_t)) (X - beta_t k_t (k_t^T X)):
    d metric / d S_{t-1} through tokens t, t+1, ... ([B, HV, K, V])."""
    X = qh[:, :, t, :, None] * dh[:, :, t, None, :] + mu  # d metric / d S_t
    k_t = kh[:, :, t]
    X = X - bh[:, :, t, None, None] * k_t[..., None] * torch.einsum("bhk,bhkv->bhv", k_t, X)[:, :, None]
    return dec[:, :, t, :, None] * X


__all__ = [
    "l2norm",
    "naive_gated_delta_rule",
    "EffectiveAttention",
    "effective_attention",
    "effective_attention_solve",
    "heuristic_effective_attention",
    "written_values",
    "StateDecomposition",
    "state_decomposition",
    "DeltaRuleRun",
    "state_patching_scores",
]
