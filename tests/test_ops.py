"""Tests for gdn_intervene.ops against HF transformers' own torch gated-delta-rule kernels.

References, none of them the code under test: HF's chunk/recurrent kernels (GDN: per-head
decay; Kimi Linear's KDA: per-channel decay), the float64 token-by-token recurrence
`naive_gated_delta_rule` (itself checked against HF's recurrent kernels first), and the solve
path `effective_attention_solve` (one triangular solve over the whole sequence), which the
adjoint row scan of `effective_attention` shares no algorithm with.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import allocator_peak_bytes
from transformers.models.kimi_linear.modeling_kimi_linear import (
    chunk_kimi_delta_attention,
    recurrent_kimi_delta_attention,
)
from transformers.models.qwen3_5.modeling_qwen3_5 import (
    l2norm as hf_l2norm,
)
from transformers.models.qwen3_5.modeling_qwen3_5 import (
    torch_chunk_gated_delta_rule,
    torch_recurrent_gated_delta_rule,
)

from gdn_intervene.ops import (
    effective_attention,
    effective_attention_solve,
    heuristic_effective_attention,
    l2norm,
    naive_gated_delta_rule,
    state_decomposition,
    written_values,
)

B = 2
CONFIGS = [
    pytest.param((2, 4, 16), id="gqa-HK2-HV4-K16"),
    pytest.param((2, 2, 8), id="mha-HK2-HV2-K8"),
]
SIZES = [pytest.param(T, id=f"T{T}") for T in (1, 17, 64, 130)]
INIT = [pytest.param(False, id="no-init"), pytest.param(True, id="init")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The matrices here are tiny; on a small shared machine MKL's thread start-up makes each
    # batched triangular solve ~100x slower than running single-threaded.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(T, cfg, *, seed=0, beta_max=1.0, decay_scale=0.25, per_channel=False):
    """Random kernel inputs; K = V.  g = -decay_scale * exp(randn) * softplus(randn) <= 0,
    [B, T, HV] or, per_channel, [B, T, HV, K]."""
    HK, HV, K = cfg
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    gshape = (B, T, HV, K) if per_channel else (B, T, HV)
    return SimpleNamespace(
        q=randn(B, T, HK, K),
        k=randn(B, T, HK, K),
        v=randn(B, T, HV, K),
        beta=beta_max * torch.sigmoid(randn(B, T, HV)),
        g=-decay_scale * randn(*gshape).exp() * F.softplus(randn(*gshape)),
        S0=randn(B, HV, K, K),
    )


def kernel(fn, x, init=False, T=None):
    """(o, S) from an HF kernel, optionally on the prefix [:T]."""
    sl = slice(None, T)
    return fn(
        x.q[:, sl],
        x.k[:, sl],
        x.v[:, sl],
        g=x.g[:, sl],
        beta=x.beta[:, sl],
        initial_state=x.S0 if init else None,
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )


def apply(M, v):
    """o[b, t, h] = sum_s M[b, h, t, s] v[b, s, h]."""
    return torch.einsum("bhts,bshv->bthv", M, v.to(M.dtype))


def rel(a, b):
    return ((a - b.to(a.dtype)).norm() / b.to(a.dtype).norm()).item()


def exact_output(x, init, dtype=torch.float32, **kw):
    ea = effective_attention(x.q, x.k, beta=x.beta, g=x.g, initial_state=x.S0 if init else None, dtype=dtype, **kw)
    assert (ea.state_term is None) == (not init)
    return apply(ea.matrix, x.v) + (ea.state_term if init else 0)


# --------------------------------------------------------------------------- reference


def test_l2norm_matches_hf():
    x = torch.randn(3, 5, 7)
    assert torch.equal(l2norm(x), hf_l2norm(x, dim=-1, eps=1e-6))


@pytest.mark.parametrize("init", INIT)
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("T", SIZES)
def test_naive_matches_hf_recurrent(T, cfg, init):
    x = make(T, cfg)
    o, S = kernel(torch_recurrent_gated_delta_rule, x, init)
    on, Sn = naive_gated_delta_rule(x.q, x.k, x.v, g=x.g, beta=x.beta, initial_state=x.S0 if init else None)
    assert on.dtype == Sn.dtype == torch.float64
    assert on.shape == o.shape and Sn.shape == S.shape
    assert rel(on, o) <= 1e-5 and rel(Sn, S) <= 1e-5


# --------------------------------------------------------------------------- exact reconstruction


@pytest.mark.parametrize("init", INIT)
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("T", SIZES)
def test_fp32_matrix_reconstructs_chunk_kernel(T, cfg, init):
    x = make(T, cfg, seed=1)
    o, _ = kernel(torch_chunk_gated_delta_rule, x, init)
    assert rel(exact_output(x, init), o) <= 1e-5


@pytest.mark.parametrize("init", INIT)
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("T", SIZES)
def test_fp64_matrix_reconstructs_naive(T, cfg, init):
    x = make(T, cfg, seed=2)
    on, _ = naive_gated_delta_rule(x.q, x.k, x.v, g=x.g, beta=x.beta, initial_state=x.S0 if init else None)
    out = exact_output(x, init, dtype=torch.float64)
    assert out.dtype == torch.float64
    assert rel(out, on) <= 1e-10


@pytest.mark.parametrize("init", INIT)
@pytest.mark.parametrize("T", [pytest.param(17, id="T17"), pytest.param(130, id="T130")])
def test_negative_eigenvalues_beta_up_to_2(T, init):
    x = make(T, CONFIGS[0].values[0], seed=3, beta_max=2.0)
    assert x.beta.max() > 1.5
    o, _ = kernel(torch_chunk_gated_delta_rule, x, init)
    on, _ = naive_gated_delta_rule(x.q, x.k, x.v, g=x.g, beta=x.beta, initial_state=x.S0 if init else None)
    assert rel(exact_output(x, init), o) <= 1e-5
    assert rel(exact_output(x, init, dtype=torch.float64), on) <= 1e-10


@pytest.mark.parametrize("cfg", CONFIGS)
def test_fast_decay_long_sequence(cfg):
    # g = -exp(randn) * softplus(randn): |G| reaches ~100s by T=130; exp(G_i - G_j) must stay accurate.
    x = make(130, cfg, seed=4, decay_scale=1.0)
    o, _ = kernel(torch_chunk_gated_delta_rule, x, True)
    assert rel(exact_output(x, True), o) <= 1e-5


@pytest.mark.parametrize("cfg", CONFIGS)
def test_matrix_is_lower_triangular(cfg):
    x = make(64, cfg, seed=5)
    M = effective_attention(x.q, x.k, beta=x.beta, g=x.g).matrix
    assert M.shape == (B, cfg[1], 64, 64)
    assert torch.equal(M.triu(1), torch.zeros_like(M))
    rows = [0, 9, 63]
    Mr = effective_attention(x.q, x.k, beta=x.beta, g=x.g, rows=rows).matrix
    for i, t in enumerate(rows):
        assert torch.equal(Mr[:, :, i, t + 1 :], torch.zeros_like(Mr[:, :, i, t + 1 :]))


# --------------------------------------------------------------------------- slices


@pytest.mark.parametrize(
    "dtype,atol", [pytest.param(torch.float32, 1e-6, id="fp32"), pytest.param(torch.float64, 1e-12, id="fp64")]
)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_rows_equal_full_rows(cfg, dtype, atol):
    x = make(64, cfg, seed=6)
    full = effective_attention(x.q, x.k, beta=x.beta, g=x.g, initial_state=x.S0, dtype=dtype)
    for rows in ([63, 0, 5, 5, 40], torch.tensor([3]), [0]):
        part = effective_attention(x.q, x.k, beta=x.beta, g=x.g, initial_state=x.S0, dtype=dtype, rows=rows)
        idx = torch.as_tensor(rows)
        assert part.matrix.shape == (B, cfg[1], len(idx), 64)
        assert part.state_term.shape == (B, len(idx), cfg[1], cfg[2])
        torch.testing.assert_close(part.matrix, full.matrix[:, :, idx], atol=atol, rtol=0)
        torch.testing.assert_close(part.state_term, full.state_term[:, idx], atol=atol, rtol=0)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_heads_subset_equals_slices(cfg):
    x = make(33, cfg, seed=7)
    heads = [cfg[1] - 1, 0]
    full = effective_attention(x.q, x.k, beta=x.beta, g=x.g, initial_state=x.S0, dtype=torch.float64)
    sub = effective_attention(x.q, x.k, beta=x.beta, g=x.g, initial_state=x.S0, dtype=torch.float64, heads=heads)
    torch.testing.assert_close(sub.matrix, full.matrix[:, heads], atol=1e-12, rtol=0)
    torch.testing.assert_close(sub.state_term, full.state_term[:, :, heads], atol=1e-12, rtol=0)
    both = effective_attention(
        x.q, x.k, beta=x.beta, g=x.g, initial_state=x.S0, dtype=torch.float64, heads=torch.tensor(heads), rows=[20, 7]
    )
    torch.testing.assert_close(both.matrix, full.matrix[:, heads][:, :, [20, 7]], atol=1e-12, rtol=0)
    torch.testing.assert_close(both.state_term, full.state_term[:, [20, 7]][:, :, heads], atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- scan vs solve


SCAN_SIZES = [pytest.param(T, id=f"T{T}") for T in (1, 17, 63, 64, 65, 130)]  # 63/64/65: one block +-1; 130: 3 blocks
BETA = [pytest.param(1.0, id="beta01"), pytest.param(2.0, id="beta02")]


def both_paths(x, init, dtype, **kw):
    args = dict(beta=x.beta, g=x.g, initial_state=x.S0 if init else None, dtype=dtype, **kw)
    chunk = {"chunk": args.pop("chunk")} if "chunk" in args else {}
    return effective_attention(x.q, x.k, **args, **chunk), effective_attention_solve(x.q, x.k, **args)


def assert_paths_agree(new, old, init, dtype):
    """M: fp32 1e-6 relative (each path is ~1e-7 from the exact matrix), fp64 1e-12.  The state
    term C = F - M E cancels (F and M E are both ~exp(G_t) |S_0|, C is smaller): fp32 1e-5."""
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert new.matrix.shape == old.matrix.shape and new.matrix.dtype == dtype
    assert rel(new.matrix, old.matrix) <= tol
    if init:
        assert rel(new.state_term, old.state_term) <= (1e-5 if dtype == torch.float32 else tol)
    else:
        assert new.state_term is None and old.state_term is None


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")])
@pytest.mark.parametrize("beta_max", BETA)
@pytest.mark.parametrize("init", INIT)
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("T", SCAN_SIZES)
def test_scan_equals_solve(T, cfg, init, beta_max, dtype):
    """Full matrix and a rows slice (unsorted, repeated, the last and the first row)."""
    x = make(T, cfg, seed=20 + T, beta_max=beta_max)
    new, old = both_paths(x, init, dtype)
    assert_paths_agree(new, old, init, dtype)
    assert torch.equal(new.matrix.triu(1), torch.zeros_like(new.matrix))
    rows = [T - 1, 0, T // 2, T // 2]
    new, old = both_paths(x, init, dtype, rows=rows)
    assert new.matrix.shape == (B, cfg[1], 4, T)
    assert_paths_agree(new, old, init, dtype)


@pytest.mark.parametrize("chunk", [pytest.param(1, id="C1"), pytest.param(7, id="C7"), pytest.param(200, id="C200")])
def test_scan_block_size_does_not_change_the_matrix(chunk):
    x = make(65, CONFIGS[0].values[0], seed=30, beta_max=2.0)
    new, old = both_paths(x, True, torch.float64, chunk=chunk, rows=[64, 3, 40])
    assert_paths_agree(new, old, True, torch.float64)


@pytest.mark.parametrize("init", INIT)
def test_scan_T1000_rows_fp32_and_full_fp64(init):
    """Long input: 16 blocks with a partial last one; fast decay (|G| ~ 1e3 at the end)."""
    x = make(1000, CONFIGS[0].values[0], seed=31, decay_scale=1.0)
    assert x.g.sum(1).min() < -500
    new, old = both_paths(x, init, torch.float32, rows=[999, 500, 0, 937])
    assert_paths_agree(new, old, init, torch.float32)
    if not init:
        return  # the full fp64 matrix (a 1000^3 solve) and the 1000-step recurrence once
    new, old = both_paths(x, init, torch.float64)
    assert_paths_agree(new, old, init, torch.float64)
    on, _ = naive_gated_delta_rule(x.q, x.k, x.v, g=x.g, beta=x.beta, initial_state=x.S0 if init else None)
    assert rel(apply(new.matrix, x.v) + (new.state_term if init else 0), on) <= 1e-10


def test_rows_only_memory_grows_linearly_in_T():
    """One row: the scan's peak is O(T (C + K)) (inputs, per-block temporaries, the row), so
    doubling T at most doubles it; the solve path's [T, T] system quadruples."""
    peaks = {}
    for T in (512, 1024):
        x = make(T, (1, 1, 8), seed=32)
        for name, f in (("scan", effective_attention), ("solve", effective_attention_solve)):
            peaks[name, T] = allocator_peak_bytes(lambda: f(x.q, x.k, beta=x.beta, g=x.g, rows=[T - 1]))
    print(f"\npeak bytes, one row: {peaks}")
    assert peaks["solve", 1024] >= 1024 * 1024 * 4  # the measurement sees the solve path's [T, T] system
    assert peaks["solve", 1024] >= 3.5 * peaks["solve", 512]
    assert peaks["scan", 1024] <= 2.2 * peaks["scan", 512]
    assert peaks["scan", 1024] <= peaks["solve", 1024] / 8


# --------------------------------------------------------------------------- per-channel decay (KDA)


KDA_SIZES = [pytest.param(T, id=f"T{T}") for T in (1, 17, 65, 130)]


def kda_kernel(fn, x, init=False):
    """HF Kimi Linear's own torch KDA kernels (no GQA there: HK = HV)."""
    return fn(
        x.q,
        x.k,
        x.v,
        g=x.g,
        beta=x.beta,
        initial_state=x.S0.clone() if init else None,
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )


@pytest.mark.parametrize("init", INIT)
@pytest.mark.parametrize("T", KDA_SIZES)
def test_naive_per_channel_matches_hf_kda(T, init):
    x = make(T, (2, 2, 8), seed=40, per_channel=True)
    on, Sn = naive_gated_delta_rule(x.q, x.k, x.v, g=x.g, beta=x.beta, initial_state=x.S0 if init else None)
    for fn in (recurrent_kimi_delta_attention, chunk_kimi_delta_attention):
        o, S = kda_kernel(fn, x, init)
        assert rel(on, o) <= 1e-5 and rel(Sn, S) <= 1e-5, fn.__name__


def test_per_channel_with_equal_channels_is_per_head():
    x = make(70, CONFIGS[0].values[0], seed=41)
    pc = SimpleNamespace(**{**vars(x), "g": x.g[..., None].expand(-1, -1, -1, x.k.shape[-1])})
    for f in (effective_attention, effective_attention_solve):
        a, b = (f(y.q, y.k, beta=y.beta, g=y.g, initial_state=y.S0, dtype=torch.float64) for y in (x, pc))
        assert rel(b.matrix, a.matrix) <= 1e-13 and rel(b.state_term, a.state_term) <= 1e-13
    on, Sn = naive_gated_delta_rule(x.q, x.k, x.v, g=x.g, beta=x.beta)
    onc, Snc = naive_gated_delta_rule(pc.q, pc.k, pc.v, g=pc.g, beta=pc.beta)
    assert torch.equal(on, onc) and torch.equal(Sn, Snc)


@pytest.mark.parametrize("init", INIT)
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("T", KDA_SIZES)
def test_per_channel_matrix_reconstructs_naive(T, cfg, init):
    """M v + C against the float64 per-channel recurrence: 1e-10 (fp64), 1e-5 (fp32); scan == solve."""
    x = make(T, cfg, seed=42 + T, per_channel=True, beta_max=2.0 if init else 1.0)
    S0 = x.S0 if init else None
    on, _ = naive_gated_delta_rule(x.q, x.k, x.v, g=x.g, beta=x.beta, initial_state=S0)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        new, old = both_paths(x, init, dtype)
        assert rel(apply(new.matrix, x.v) + (new.state_term if init else 0), on) <= tol
        assert_paths_agree(new, old, init, dtype)
        new, old = both_paths(x, init, dtype, rows=[T - 1, T // 3])
        assert_paths_agree(new, old, init, dtype)


def test_per_channel_fast_decay_forms_differences():
    """|G| reaches ~1e3 per channel: exp(G_i) alone underflows, exp(G_i - G_j) must not."""
    x = make(300, (2, 2, 8), seed=43, per_channel=True, decay_scale=3.0)
    assert x.g.sum(1).min() < -1000
    on, _ = naive_gated_delta_rule(x.q, x.k, x.v, g=x.g, beta=x.beta, initial_state=x.S0)
    ea = effective_attention(x.q, x.k, beta=x.beta, g=x.g, initial_state=x.S0, dtype=torch.float64)
    assert torch.isfinite(ea.matrix).all()
    assert rel(apply(ea.matrix, x.v) + ea.state_term, on) <= 1e-10
    o, _ = kda_kernel(chunk_kimi_delta_attention, x, True)
    ea32 = effective_attention(x.q, x.k, beta=x.beta, g=x.g, initial_state=x.S0)
    assert rel(apply(ea32.matrix, x.v) + ea32.state_term, o) <= 1e-5


@pytest.mark.parametrize("init", INIT)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_per_channel_written_values_and_state(cfg, init):
    x = make(130, cfg, seed=44, per_channel=True)
    S0 = x.S0 if init else None
    ref = loop_written_values(x, init)
    u = written_values(x.k, x.v, beta=x.beta, g=x.g, initial_state=S0, dtype=torch.float64)
    assert rel(u, ref) <= 1e-12
    _, Sn = naive_gated_delta_rule(x.q, x.k, x.v, g=x.g, beta=x.beta, initial_state=S0)
    dec = state_decomposition(x.k, x.v, beta=x.beta, g=x.g, initial_state=S0, dtype=torch.float64)
    assert dec.weights.shape == (B, cfg[1], 130, cfg[2])
    assert rel(dec.state(), Sn) <= 1e-12
    assert rel(dec.per_token().sum(1) + (dec.initial if init else 0), Sn) <= 1e-12
    _, Sp = naive_gated_delta_rule(
        x.q[:, :71], x.k[:, :71], x.v[:, :71], g=x.g[:, :71], beta=x.beta[:, :71], initial_state=S0
    )
    mid = state_decomposition(x.k, x.v, beta=x.beta, g=x.g, initial_state=S0, position=70, dtype=torch.float64)
    assert rel(mid.state(), Sp) <= 1e-12


def test_per_channel_heuristic_shape():
    x = make(20, CONFIGS[0].values[0], seed=45, per_channel=True)
    Mh = heuristic_effective_attention(x.q, x.k, beta=x.beta, g=x.g)
    want = torch.einsum(
        "bthd,bshd,bhtsd->bhts",
        x.q.repeat_interleave(2, 2),
        x.k.repeat_interleave(2, 2),
        (x.g.cumsum(1).transpose(1, 2)[:, :, :, None] - x.g.cumsum(1).transpose(1, 2)[:, :, None]).exp(),
    )
    want = want.tril() * x.beta.transpose(1, 2)[:, :, None, :]
    torch.testing.assert_close(Mh, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- heuristic


@pytest.mark.parametrize(
    "cfg", [pytest.param((2, 4, 16), id="gqa-HK2-HV4-K16"), pytest.param((2, 2, 16), id="mha-HK2-HV2-K16")]
)
def test_heuristic_is_far_off_exact_is_not(cfg):
    x = make(64, cfg, seed=8)
    o, _ = kernel(torch_chunk_gated_delta_rule, x)
    Mh = heuristic_effective_attention(x.q, x.k, beta=x.beta, g=x.g)
    assert Mh.shape == (B, cfg[1], 64, 64)
    y = apply(Mh, x.v)
    best = (y * o).sum() / (y * y).sum()  # best scalar rescaling: the error is not just scale
    err_h, err_s, err_x = rel(y, o), rel(best * y, o), rel(exact_output(x, False), o)
    print(f"\n[{cfg}] T=64 relative error: heuristic {err_h:.3g} (best-scaled {err_s:.3g}), exact {err_x:.3g}")
    assert err_h > 0.1 and err_s > 0.1
    assert err_x <= 1e-5


# --------------------------------------------------------------------------- state view


def loop_written_values(x, init):
    """Independent reference: explicit per-token loop in float64."""
    HK, HV = x.k.shape[2], x.v.shape[2]
    k = x.k.double().repeat_interleave(HV // HK, dim=2)
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    S = x.S0.double().clone() if init else torch.zeros(B, HV, k.shape[-1], x.v.shape[-1], dtype=torch.float64)
    us = []
    for t in range(x.k.shape[1]):
        dec = x.g[:, t].double().exp()
        S = S * (dec[:, :, None, None] if dec.dim() == 2 else dec[..., None])  # per head / per key channel
        pred = torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        u = x.beta[:, t].double()[:, :, None] * (x.v[:, t].double() - pred)
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], u)
        us.append(u)
    return torch.stack(us, dim=1)


@pytest.mark.parametrize("init", INIT)
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("T", [pytest.param(17, id="T17"), pytest.param(130, id="T130")])
def test_written_values_match_loop(T, cfg, init):
    x = make(T, cfg, seed=9)
    ref = loop_written_values(x, init)
    u64 = written_values(x.k, x.v, beta=x.beta, g=x.g, initial_state=x.S0 if init else None, dtype=torch.float64)
    u32 = written_values(x.k, x.v, beta=x.beta, g=x.g, initial_state=x.S0 if init else None)
    assert u64.shape == x.v.shape and u32.dtype == torch.float32
    assert rel(u64, ref) <= 1e-12
    assert rel(u32, ref) <= 1e-5


@pytest.mark.parametrize("init", INIT)
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("T", SIZES)
def test_state_decomposition_assembles_final_state(T, cfg, init):
    x = make(T, cfg, seed=10)
    _, S = kernel(torch_chunk_gated_delta_rule, x, init)
    dec = state_decomposition(x.k, x.v, beta=x.beta, g=x.g, initial_state=x.S0 if init else None)
    HK, HV, K = cfg
    assert dec.weights.shape == (B, HV, T) and dec.keys.shape == (B, T, HV, K) and dec.values.shape == (B, T, HV, K)
    assert (dec.initial is None) == (not init)
    assert rel(dec.state(), S) <= 1e-5
    summed = dec.per_token().sum(1) + (dec.initial if init else 0)
    torch.testing.assert_close(summed, dec.state(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", INIT)
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("p", [pytest.param(0, id="p0"), pytest.param(70, id="p70")])
def test_state_decomposition_intermediate_position(p, cfg, init):
    x = make(130, cfg, seed=11)
    _, S = kernel(torch_chunk_gated_delta_rule, x, init, T=p + 1)
    dec = state_decomposition(x.k, x.v, beta=x.beta, g=x.g, initial_state=x.S0 if init else None, position=p)
    assert dec.weights.shape[-1] == p + 1 and dec.values.shape[1] == p + 1
    assert rel(dec.state(), S) <= 1e-5


# --------------------------------------------------------------------------- errors


def _bad_calls():
    x = make(8, (2, 4, 8))
    ea = lambda **kw: effective_attention(**{"q": x.q, "k": x.k, "beta": x.beta, "g": x.g, **kw})  # noqa: E731
    return [
        pytest.param(lambda: ea(q=x.q[:, :5]), r"q must have k's shape", id="q-k-mismatch"),
        pytest.param(lambda: ea(beta=x.beta[:, :5]), r"beta must be \[B, T, HV\]", id="beta-shape"),
        pytest.param(lambda: ea(g=x.g[..., :3]), r"g must be \[B, T, HV\]", id="g-shape"),
        pytest.param(lambda: ea(beta=x.beta[..., :3], g=x.g[..., :3]), r"HV=3 .* multiple of HK=2", id="gqa-ratio"),
        pytest.param(lambda: ea(heads=[4]), r"heads out of range: \[4\].*there are 4 value heads", id="head-range"),
        pytest.param(lambda: ea(rows=[8]), r"rows out of range: \[8\].*T=8", id="row-range"),
        pytest.param(lambda: ea(rows=[-1]), r"rows out of range", id="row-negative"),
        pytest.param(lambda: ea(rows=[1.5]), r"rows must be ints", id="row-float"),
        pytest.param(lambda: ea(rows=3), r"rows must be a sequence", id="row-scalar"),
        pytest.param(lambda: ea(rows=[]), r"rows must not be empty", id="row-empty"),
        pytest.param(lambda: ea(initial_state=x.S0[:, :2]), r"initial_state must be \[B, HV, K, V\]", id="init-shape"),
        pytest.param(
            lambda: ea(g=x.g[..., None].expand(-1, -1, -1, 5)), r"or \[B, T, HV, K\] = \[2, 8, 4, 8\]", id="g-channels"
        ),
        pytest.param(lambda: ea(chunk=0), r"chunk must be a positive int", id="chunk"),
        pytest.param(
            lambda: ea(max_bytes=1000), r"GiB.*max_bytes=1000.*rows=\[\.\.\.\].*heads=\[\.\.\.\]", id="max-bytes"
        ),
        pytest.param(
            lambda: written_values(x.k, x.v[:, :, :2], beta=x.beta, g=x.g), r"v must be \[B, T, HV, V\]", id="v-shape"
        ),
        pytest.param(
            lambda: state_decomposition(x.k, x.v, beta=x.beta, g=x.g, position=8), r"position must be", id="position"
        ),
        pytest.param(
            lambda: naive_gated_delta_rule(x.q, x.k[..., :4], x.v, g=x.g, beta=x.beta),
            r"q must have k's shape",
            id="naive-qk",
        ),
    ]


@pytest.mark.parametrize("call,match", _bad_calls())
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_max_bytes_allows_rows_slice():
    x = make(64, (2, 4, 8))
    limit = 3 * B * 4 * 64 * 64 * 4 - 1  # just below the full fp32 plan
    with pytest.raises(ValueError, match="max_bytes"):
        effective_attention(x.q, x.k, beta=x.beta, g=x.g, max_bytes=limit)
    assert effective_attention(x.q, x.k, beta=x.beta, g=x.g, max_bytes=limit, rows=[10]).matrix.shape == (B, 4, 1, 64)
