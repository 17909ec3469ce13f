"""One layer call's delta-rule kernels, in HF's sequence, with the `state` site fired where
`sites.state_firings` says.

HF runs the recurrent kernel for a cached decode step; else the chunk kernel, and from
transformers 5.25, where the cache keeps N intermediate states, the chunk kernel on the first
T - N positions and N single-token recurrent calls. `gdn_intervene.state_at` splits the chunk
kernel's call after listed positions, each segment starting from the previous one's (possibly
replaced) final state. Shapes: q, k [B, T, HK, K] (or repeated to HV where the release repeats
them in the layer); v [B, T, HV, V]; beta [B, T, HV]; g <= 0, decay = exp(g): [B, T, HV] (GDN)
or [B, T, HV, K] (KDA); states S [B, HV, K, V].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ._positions import check_positions
from .sites import StateFiring

__all__ = ["Call", "delta_rule", "split_bounds"]


class Call(NamedTuple):
    """What one layer call runs its kernels with.

    chunk, recurrent: the kernel objects HF's forward calls. step: the cache's `_compat.Step`.
    positions: the split positions (`state_at`), () for none. want_state: ask the chunk kernel for
    its final state (HF does with a cache; so do we where the state site or a split needs it).
    chunk_kwargs, recurrent_kwargs: the kernels' extra keywords, as HF passes them.
    fire(S, StateFiring) -> S: the `state` site. state_fp32: states reach the cache in fp32 (KDA).
    keeps_states: the release keeps intermediate states (5.25 on). packed: the family's kernels
    take `cu_seqlens` (which the kept steps do not get). layer_idx: for messages and the cache.
    """

    chunk: Callable
    recurrent: Callable
    step: Any
    positions: tuple
    want_state: bool
    chunk_kwargs: dict
    recurrent_kwargs: dict
    fire: Callable
    state_fp32: bool
    keeps_states: bool
    packed: bool
    layer_idx: int


def delta_rule(q, k, v, g, beta, call: Call) -> torch.Tensor:
    """o [B, T, HV, V] of one layer call; the states it keeps go to the cache, if any."""
    step = call.step
    common = dict(output_final_state=call.want_state, use_qk_l2norm_in_kernel=True)
    if step.recurrent_decode:
        o, S = call.recurrent(
            q, k, v, g=g, beta=beta, initial_state=step.initial_state, **common, **call.recurrent_kwargs
        )
        written = call.fire(S, StateFiring(0, True))
    elif call.keeps_states:
        o, written = _kept(q, k, v, g, beta, call, common)
    else:
        o, written = _chunked(q, k, v, g, beta, step.initial_state, call, dict(common, **call.chunk_kwargs), final=True)
    if step.cache is not None:
        if call.state_fp32 and not call.keeps_states:  # 5.25 on: cast where HF casts (`_kept`)
            written = written.to(torch.float32)
        step.cache.update_recurrent_state(written, call.layer_idx)
    return o


def _kept(q, k, v, g, beta, call: Call, common: dict):
    """5.25 on: the chunk kernel on the first T - N positions (even none), then N recurrent steps
    whose states are kept (the cache gets the list, or the chunk's final state where N = 0),
    exactly HF's op sequence (tensor_split, cat): other ops would change the last bits of the
    parameter gradients. -> (o [B, T, HV, V], the state or list of states to write)."""
    T, N = q.shape[1], call.step.keep
    split = T - N
    (cq, sq), (ck, sk), (cv, sv), (cb, sb), (cg, sg) = (
        torch.tensor_split(x, [split], dim=1) for x in (q, k, v, beta, g)
    )
    chunk_kwargs = dict(common, **call.chunk_kwargs)
    o, S = _chunked(cq, ck, cv, cg, cb, call.step.initial_state, call, chunk_kwargs, final=N == 0, T_call=T)
    if call.state_fp32 and S is not None:
        S = S.to(torch.float32)
    outs, kept = [o], []
    step_kwargs = dict(call.recurrent_kwargs)
    if call.packed:
        step_kwargs.pop("cu_seqlens", None)  # HF popped it into the chunk call
    listed = set(call.positions)
    for i in range(N):
        o_i, S = call.recurrent(
            sq[:, i : i + 1], sk[:, i : i + 1], sv[:, i : i + 1], g=sg[:, i : i + 1], beta=sb[:, i : i + 1],
            initial_state=S, output_final_state=True, use_qk_l2norm_in_kernel=True, **step_kwargs,
        )  # fmt: skip
        p = split + i
        if not call.positions or p in listed or p == T - 1:
            S = call.fire(S, StateFiring(p, p == T - 1))
        outs.append(o_i)
        kept.append(S.to(torch.float32) if call.state_fp32 else S)
    return torch.cat(outs, dim=1), (kept if kept else S)


def _chunked(q, k, v, g, beta, S, call: Call, kwargs: dict, final: bool, T_call: int | None = None):
    """The chunk kernel over the first T of the call's `T_call` positions (HF runs the rest, if
    any, step by step); with split positions, segment by segment, split after each listed
    position below T. `state` fires after each listed position below T and, if `final`, on the
    final state. -> (o [B, T, HV, V], final state or None where nothing asked for it)."""
    T = q.shape[1]
    T_call = T if T_call is None else T_call
    if not call.positions:
        o, S = call.chunk(q, k, v, g=g, beta=beta, initial_state=S, **kwargs)
        # S is None where nothing asked for it: a listener added by another thread after
        # `want_state` was decided does not see this call (its hooks skip other threads anyway)
        return o, (call.fire(S, StateFiring(T - 1, T == T_call)) if final and S is not None else S)
    if kwargs.get("cu_seqlens") is not None or kwargs.get("cu_seq_lens_q") is not None:
        raise ValueError(f"layer {call.layer_idx}: state_positions cannot split packed sequences (cu_seqlens)")
    split_bounds(call.positions, T_call, call.layer_idx)  # every position inside the call
    listed = {p for p in call.positions if p < T}
    bounds = [0] + [p + 1 for p in sorted(listed) if p + 1 < T] + [T]
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        o, S = call.chunk(q[:, s:e], k[:, s:e], v[:, s:e], g=g[:, s:e], beta=beta[:, s:e], initial_state=S, **kwargs)
        if e - 1 in listed or (e == T and final):
            S = call.fire(S, StateFiring(e - 1, e == T_call))
        outs.append(o)
    return torch.cat(outs, dim=1), S


def split_bounds(positions, T: int, layer_idx: int) -> list[int]:
    """[0, p1+1, p2+1, ..., T]: segment bounds so that a state is taken after each position;
    raises unless every position lies in [0, T - 1]."""
    ps = check_positions(positions, f"layer {layer_idx}: state")
    if ps[-1] >= T:
        raise ValueError(f"layer {layer_idx}: state positions must lie in [0, {T - 1}] for a call of T={T}, got {ps}")
    return [0] + [p + 1 for p in ps if p + 1 < T] + [T]
