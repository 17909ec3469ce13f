"""Effective attention and state tools (gdn_intervene.analysis, gdn_intervene.plot).

References are independent of the patched forward: HF's own kernels run inside the UNPATCHED
model (`kernel_edit` records their arguments and results), HF's `DynamicCache` after a prefix
run gives the state at a position, and a two-segment cached run of the unpatched model is the
reference for a state patched mid-prefill.
"""

import pytest
import torch
from conftest import ids_for, left_pad_mask, logits, new_cache, view
from models import ANY_GDN, MODELS, present
from reference import LAYER_SUFFIXES, kernel_edit, unrepeat

import gdn_intervene as gi
from gdn_intervene import analysis as an
from gdn_intervene import ops

NAMES = list(MODELS)  # GDN (decay per head) and KDA (per key channel) families
SIZES = [1, 17, 64, 130]
HV = pytest.mark.parametrize("hv_ratio", [1, 2], ids=["hv=hk", "hv=2hk"])


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def kernel_calls(ref, layer, ids, mask=None, **kw):
    """Run the unpatched model; return [(kernel kwargs, (o, S))] for each kernel call of `layer`."""
    calls = []

    def before(kwargs):
        calls.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})

    def after(res):
        calls[-1]["result"] = (res[0].clone(), res[1].clone())
        return res

    with kernel_edit(ref, layer, before=before, after=after):
        out = logits(ref, ids, mask, **kw)
    return calls, out


def no_hooks(model):
    return all(not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())


def skip_unless_continues(model, T: int = 2) -> None:
    """Skip where HF restarts a cached call of T > 1 tokens from zero states (4.57-5.9): there
    is no continuation to describe (the core tests check that restart, bitwise)."""
    if T > 1 and not next(iter(gi.gdn_layers(model).values()))._gdn_convention.continues:
        pytest.skip("this transformers release restarts a multi-token cached call from zero states")


# ---------------------------------------------------------------- effective attention


@pytest.mark.parametrize("T", SIZES)
@HV
@pytest.mark.parametrize("name", NAMES)
def test_effective_attention_reconstructs_the_kernel_output(pair, name, hv_ratio, T):
    """Padded batch: the captured kernel inputs are HF's (bitwise) and M v reconstructs HF's
    kernel output o to <= 1e-5 relative (M in fp32)."""
    patched, ref = pair(name, hv_ratio)
    ids, mask = ids_for(T), left_pad_mask(3, T)
    caps = an.capture(patched, ids, attention_mask=mask)
    result = an.effective_attention_for(patched, ids, attention_mask=mask, check=1e-5)
    assert no_hooks(patched)
    for layer, cap in caps.items():
        (call,), _ = kernel_calls(ref, layer, ids, mask)
        for field, arg in (("q", "q"), ("k", "k"), ("v", "v"), ("beta", "beta"), ("g", "g")):
            got = getattr(cap, field)
            assert torch.equal(got, unrepeat(call[arg], got.shape[2])), f"layer {layer}: captured {field} differs"
        o, S = call["result"]
        M = result[layer].matrix
        assert M.shape == (3, 2 * hv_ratio, T, T) and M.dtype == torch.float32
        assert result[layer].state_term is None
        assert torch.equal(M.triu(1), torch.zeros_like(M))  # causal
        assert rel(torch.einsum("bhts,bshv->bthv", M, call["v"]), o) <= 1e-5
        assert result[layer].error <= 1e-5


@HV
@pytest.mark.parametrize("name", present("qwen3_5", "olmo_hybrid", "kimi_linear") or [ANY_GDN])
def test_rows_and_heads_slices_equal_the_full_matrix(pair, name, hv_ratio):
    patched, _ = pair(name, hv_ratio)
    ids, mask = ids_for(70), left_pad_mask(3, 70)
    full = an.effective_attention_for(patched, ids, attention_mask=mask)
    rows, heads = [69, 0, 33, 64], [2 * hv_ratio - 1, 0]
    part = an.effective_attention_for(patched, ids, attention_mask=mask, rows=rows, heads=heads, check=1e-5)
    for layer in full:
        want = full[layer].matrix[:, heads][:, :, rows]
        assert part[layer].matrix.shape == (3, 2, 4, 70)
        torch.testing.assert_close(part[layer].matrix, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("T", [1, 17])
@HV
@pytest.mark.parametrize("name", present("qwen3_5", "olmo_hybrid", "qwen3_next", "kimi_linear", "glm5_next"))
def test_continuation_from_a_cache_adds_the_state_term(pair, name, hv_ratio, T):
    """Prefix (padded) into a DynamicCache, then a T-token continuation (T=1: the recurrent
    decode kernel): the captured initial state is the cache's, and M v + C reconstructs HF's o."""
    patched, ref = pair(name, hv_ratio)
    skip_unless_continues(patched, T)
    prefix, mask = ids_for(20), left_pad_mask(3, 20)
    cont = ids_for(T, seed=3)
    cmask = torch.cat([mask, torch.ones_like(cont)], 1)
    cache_p, cache_r = (new_cache(m) for m in (patched, ref))
    logits(patched, prefix, mask, cache=cache_p, use_cache=True)
    logits(ref, prefix, mask, cache=cache_r, use_cache=True)
    layers = list(gi.gdn_layers(patched))
    S0 = {l: view(cache_r).get_recurrent_state(l).clone() for l in layers}
    result = an.effective_attention_for(patched, cont, attention_mask=cmask, cache=cache_p, use_cache=True, check=True)
    calls = {}
    for l in layers:  # each call advances cache_r; replay from a copy for every layer
        c = new_cache(ref)
        logits(ref, prefix, mask, cache=c, use_cache=True)
        (calls[l],), _ = kernel_calls(ref, l, cont, cmask, cache=c, use_cache=True)
    for l in layers:
        call = calls[l]
        assert torch.equal(call["initial_state"], S0[l])
        o, _ = call["result"]
        ea = ops.effective_attention(call["q"], call["k"], beta=call["beta"], g=call["g"], initial_state=S0[l])
        assert rel(result[l].matrix, ea.matrix) == 0 and torch.equal(result[l].state_term, ea.state_term)
        recon = torch.einsum("bhts,bshv->bthv", result[l].matrix, call["v"]) + result[l].state_term
        assert rel(recon, o) <= 1e-5 and result[l].error <= 1e-5
        assert rel(result[l].state_term, o) > 1e-2  # the state term matters here


def test_too_large_matrix_surfaces_the_rows_hint(pair):
    patched, _ = pair(ANY_GDN)
    ids = ids_for(64)
    with pytest.raises(ValueError, match=r"layer 0: effective_attention would need .*rows=\[\.\.\.\]"):
        an.effective_attention_for(patched, ids, max_bytes=200_000)
    assert no_hooks(patched)
    ok = an.effective_attention_for(patched, ids, max_bytes=200_000, rows=[63], heads=[0])
    assert ok[0].matrix.shape == (3, 1, 1, 64)


def test_bad_layers_and_failed_check_are_named(pair):
    patched, _ = pair(ANY_GDN)
    with pytest.raises(ValueError, match=r"GDN layer indices from \[0, 2\]; got \[1\]"):
        an.effective_attention_for(patched, ids_for(5), layers=[1])
    with pytest.raises(RuntimeError, match=r"layer 0: .*relative error .* > 0"):
        an.effective_attention_for(patched, ids_for(40), layers=0, check=0.0)
    assert no_hooks(patched)


@pytest.mark.parametrize("T", [1, 65])
@HV
@pytest.mark.parametrize("name", NAMES)
def test_scan_equals_solve_on_real_site_values(pair, name, hv_ratio, T):
    """The adjoint row scan (ops.effective_attention) against the solve path on every family's
    captured kernel inputs (padded batch; OLMo-Hybrid: beta in [0, 2]): full matrix and rows."""
    patched, _ = pair(name, hv_ratio)
    caps = an.capture(patched, ids_for(T), attention_mask=left_pad_mask(3, T))
    rows = [T - 1, 0, T // 2]
    for cap in caps.values():
        for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
            for kw in ({}, {"rows": rows}):
                args = dict(beta=cap.beta, g=cap.g, dtype=dtype, **kw)
                new = ops.effective_attention(cap.q, cap.k, **args).matrix
                old = ops.effective_attention_solve(cap.q, cap.k, **args).matrix
                assert rel(new, old) <= tol, (cap.layer, dtype, kw)


# ---------------------------------------------------------------- attribution


def hf_layer_outputs(ref, ids, mask=None, **kw):
    """{layer: [B, T, D]} output of each GDN module of the UNPATCHED model, and the final norm's
    input [B, T, D] (plain forward hooks on HF's modules)."""
    outs, final = {}, []
    hooks = [
        m.register_forward_hook(lambda mod, a, o: outs.__setitem__(mod.layer_idx, o.detach()))
        for m in ref.modules()
        if type(m).__name__.endswith(LAYER_SUFFIXES)
    ]
    base = ref.get_decoder() if hasattr(ref, "get_decoder") else ref.model
    base = getattr(base, "language_model", base)
    if hasattr(base, "norm"):
        hooks.append(base.norm.register_forward_hook(lambda mod, a, o: final.append(a[0].detach())))
    try:
        logits(ref, ids, mask, **kw)
    finally:
        for h in hooks:
            h.remove()
    return outs, (final[0] if final else None), getattr(base, "norm", None)


def direct_effect(ref, y, x, norm, a, b):
    """(W_U[a] - W_U[b]) . (gain ⊙ y / rms(x)): the layer output y read through the final norm with
    its scale frozen at the actual residual x. The gain is measured on a random input (x_r / its
    normalised self), independently of the library's probe."""
    xr = torch.randn(4, x.shape[-1], dtype=torch.float64) + 3.0  # no zero entries
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    with torch.no_grad():
        gain = (norm(xr.to(x.dtype)).double() / (xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + eps))).mean(0)
    W = ref.get_output_embeddings().weight.double()
    scale = torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)
    return torch.einsum("d,btd->bt", W[a] - W[b], gain * y.double() * scale)


@pytest.mark.parametrize("hv_ratio", [1, 2], ids=["hv=hk", "hv=2hk"])
@pytest.mark.parametrize("name", NAMES)
def test_attribution_sums_to_the_layer_output(pair, name, hv_ratio):
    """Contributions + state term sum to direction . y_t, y HF's own GDN output (unpatched model),
    to <= 1e-5 relative (fp32), padded batch; and, for a token pair, to the layer's direct effect
    on the logit difference through the final norm (scale frozen)."""
    patched, ref = pair(name, hv_ratio)
    T = 19
    ids, mask = ids_for(T), left_pad_mask(3, T)
    positions = [T - 1, 2, 10]
    outs, x, norm = hf_layer_outputs(ref, ids, mask)
    D = outs[next(iter(outs))].shape[-1]
    d = torch.randn(D, generator=torch.Generator().manual_seed(5))
    att = an.attribution_for(patched, ids, positions=positions, direction=d, attention_mask=mask)
    assert no_hooks(patched)
    L, HV = len(outs), 2 * hv_ratio
    assert att.layers == tuple(outs) and att.positions == tuple(positions) and att.heads == tuple(range(HV))
    assert att.contributions.shape == (3, L, HV, 3, T) and att.state_term.shape == (3, L, HV, 3)
    assert not att.state_term.any() and not att.bias_term.any()
    for i, t in enumerate(positions):  # causal: nothing from later positions
        assert not att.contributions[:, :, :, i, t + 1 :].any()
    want = torch.stack([outs[l][:, positions].double() @ d.double() for l in att.layers], 1)
    assert rel(att.total(), want) <= 1e-5
    assert rel(att.value, want) <= 1e-6
    if name == "qwen4_exp":  # hyper-connections: no single read-out through the final norm
        with pytest.raises(ValueError, match="hyper-connection"):
            an.attribution_for(patched, ids, positions=positions, direction=(5, 7), attention_mask=mask)
        return
    att = an.attribution_for(patched, ids, positions=positions, direction=(5, 7), attention_mask=mask)
    assert no_hooks(patched)
    # path_scale: 1 for a plain residual add; GLM-5-Next's hyper-connections scale each layer's
    # output on its way to the final norm (checked by ablation in test_analysis_guards.py)
    want = torch.stack([direct_effect(ref, outs[l][:, positions], x[:, positions], norm, 5, 7) for l in att.layers], 1)
    want = want * att.path_scale.double()
    assert rel(att.total(), want) <= 1e-5
    assert rel(att.value, want) <= 1e-5
    # per-example answer tokens
    a, b = torch.tensor([5, 9, 11]), torch.tensor([7, 7, 3])
    att = an.attribution_for(
        patched, ids, positions=positions, direction=(a, b), attention_mask=mask, layers=[att.layers[-1]]
    )
    l = att.layers[0]
    rows = [
        direct_effect(ref, outs[l][i : i + 1, positions], x[i : i + 1, positions], norm, a[i], b[i]) for i in range(3)
    ]
    assert rel(att.total()[:, 0], torch.cat(rows) * att.path_scale[:, 0].double()) <= 1e-5


@pytest.mark.parametrize("name", present("qwen3_5", "olmo_hybrid", "kimi_linear") or [ANY_GDN])
def test_attribution_after_a_cached_prefix_has_a_state_term(pair, name):
    patched, ref = pair(name)
    skip_unless_continues(patched)
    prefix, cont = ids_for(20), ids_for(9, seed=3)
    c_p, c_r = (new_cache(m) for m in (patched, ref))
    logits(patched, prefix, cache=c_p, use_cache=True)
    logits(ref, prefix, cache=c_r, use_cache=True)
    outs, _, _ = hf_layer_outputs(ref, cont, cache=c_r, use_cache=True)
    d = torch.randn(outs[0].shape[-1], generator=torch.Generator().manual_seed(6))
    att = an.attribution_for(patched, cont, positions=[8, 0], direction=d, cache=c_p, use_cache=True)
    want = torch.stack([outs[l][:, [8, 0]].double() @ d.double() for l in att.layers], 1)
    assert rel(att.total(), want) <= 1e-5
    assert att.state_term.abs().sum(2).min() > 0  # the cached state matters at every position


def test_attribution_heads_subset_and_fp64(pair):
    patched, _ = pair(ANY_GDN, 2)
    ids = ids_for(30)
    d = torch.randn(32, generator=torch.Generator().manual_seed(7))
    full = an.attribution_for(patched, ids, positions=29, direction=d, dtype=torch.float64)
    assert full.contributions.dtype == torch.float64 and full.positions == (29,)
    assert not full.total().requires_grad
    assert rel(full.total(), full.value) <= 1e-6  # `value` is the fp32 model's own output: fp32 noise
    sub = an.attribution_for(patched, ids, positions=[29], direction=d, heads=[3, 1], layers=[2], dtype=torch.float64)
    assert sub.heads == (3, 1) and sub.layers == (2,)
    torch.testing.assert_close(sub.contributions[:, 0], full.contributions[:, 1, [3, 1]], rtol=1e-12, atol=1e-14)
    default = an.attribution_for(patched, ids, direction=d)
    assert default.positions == (29,)


def _bad_attribution():
    return [
        pytest.param(
            dict(positions=[12]),
            r"attribution_for: positions out of range: \[12\]; valid are 0\.\.11 \(the call has T=12 tokens\)",
            id="position-past-end",
        ),
        pytest.param(dict(positions=[-1]), r"positions out of range: \[-1\]", id="position-negative"),
        pytest.param(dict(positions=[1.5]), r"positions must be ints", id="position-float"),
        pytest.param(
            dict(direction=torch.randn(31)),
            r"direction must be a \[D\] vector with D=32 .* shape \[31\]",
            id="direction-width",
        ),
        pytest.param(
            dict(direction=torch.randn(2, 32)), r"direction must be a \[D\] vector with D=32", id="direction-2d"
        ),
        pytest.param(
            dict(direction=(5, 96)),
            r"answer tokens must lie in \[0, 96\) \(the vocabulary\); got 96",
            id="token-past-vocab",
        ),
        pytest.param(dict(direction=(-1, 3)), r"answer tokens must lie in \[0, 96\)", id="token-negative"),
        pytest.param(
            dict(direction=(torch.tensor([1, 2]), 3)),
            r"answer tokens must be ints or \[B=3\] integer tensors",
            id="token-batch",
        ),
        pytest.param(dict(direction=(1.0, 3)), r"answer tokens must be ints", id="token-float"),
        pytest.param(
            dict(direction="yes"), r"direction must be a \[D\] float tensor \(D=32\) or a pair", id="direction-type"
        ),
        pytest.param(dict(layers=[1]), r"GDN layer indices from \[0, 2\]; got \[1\]", id="layers"),
        pytest.param(dict(heads=[4]), r"layer 0: heads out of range: \[4\]", id="heads"),
    ]


@pytest.mark.parametrize("kw,match", _bad_attribution())
def test_attribution_bad_input_is_named(pair, kw, match):
    patched, _ = pair(ANY_GDN)
    args = {"positions": [11], "direction": torch.randn(32), **kw}
    with pytest.raises(ValueError, match=match):
        an.attribution_for(patched, ids_for(12), **args)
    assert no_hooks(patched)


# ---------------------------------------------------------------- state decomposition, written values


@HV
@pytest.mark.parametrize("name", present("qwen3_5", "olmo_hybrid") or [ANY_GDN])  # KDA: test_kda.py
def test_state_decomposition_sums_to_the_kernel_state(pair, name, hv_ratio):
    patched, ref = pair(name, hv_ratio)
    ids, mask = ids_for(130), left_pad_mask(3, 130)
    for layer in gi.gdn_layers(patched):
        (call,), _ = kernel_calls(ref, layer, ids, mask)
        _, S = call["result"]
        dec = an.state_decomposition_for(patched, ids, layer, attention_mask=mask)
        assert rel(dec.state(), S) <= 1e-5
        parts = dec.per_token()  # [B, T, HV, K, V]
        assert rel(parts.sum(1), S) <= 1e-5
        sizes = an.token_contributions(dec)
        torch.testing.assert_close(sizes, parts.flatten(-2).norm(dim=-1), rtol=1e-5, atol=1e-7)
        u = an.written_values_for(patched, ids, layer, attention_mask=mask)
        assert torch.equal(u, ops.written_values(call["k"], call["v"], beta=call["beta"], g=call["g"]))
        # hand check of the definition at one token: u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t)
        t = 90
        prev = an.state_decomposition_for(patched, ids, layer, attention_mask=mask, position=t - 1).state()
        k = unrepeat(call["k"], call["v"].shape[2] // hv_ratio)  # [B, T, HK, K]
        kt = ops.l2norm(k[:, t]).repeat_interleave(hv_ratio, dim=1)  # [B, HV, K]
        want = call["beta"][:, t, :, None] * (
            call["v"][:, t] - call["g"][:, t].exp()[..., None] * torch.einsum("bhkv,bhk->bhv", prev, kt)
        )
        assert rel(u[:, t], want) <= 1e-5


def test_state_decomposition_after_a_cached_prefix(pair):
    patched, ref = pair(ANY_GDN)
    skip_unless_continues(patched)
    prefix, cont = ids_for(30), ids_for(40, seed=4)
    c_p, c_r = new_cache(patched), new_cache(ref)
    logits(patched, prefix, cache=c_p, use_cache=True)
    logits(ref, prefix, cache=c_r, use_cache=True)
    dec = an.state_decomposition_for(patched, cont, 0, cache=c_p, use_cache=True)
    logits(ref, cont, cache=c_r, use_cache=True)
    assert dec.initial is not None
    assert rel(dec.state(), view(c_r).get_recurrent_state(0)) <= 1e-5


# ---------------------------------------------------------------- split prefill


@pytest.mark.parametrize(
    "positions,match",
    [
        ([5, 3], "strictly increasing"),
        ([3, 3], "strictly increasing"),
        ([-1], "non-negative"),
        ([1.0], "must be ints"),
        ([True], "must be ints"),
        ([], "must not be empty"),
        ("3", "a sequence of ints"),
        (torch.tensor([1.5]), "integer tensor"),
    ],
)
def test_state_at_validates_eagerly(pair, positions, match):
    patched, _ = pair(ANY_GDN)
    with pytest.raises(ValueError, match=match):
        with an.state_at(patched, positions):
            pass
    assert all(m.state_positions is None for m in gi.gdn_layers(patched).values())


def test_state_positions_out_of_range_and_restore_on_error(pair):
    patched, _ = pair(ANY_GDN)
    ids = ids_for(10)
    with pytest.raises(ValueError, match=r"out of range for a call of T=10 tokens \(valid: 0\.\.9\)"):
        an.states_at(patched, ids, [2, 10])
    with pytest.raises(ValueError, match=r"layer 0: state positions must lie in \[0, 9\]"):
        with an.state_at(patched, [12]):
            logits(patched, ids)  # the core checks the range in the forward
    layers = gi.gdn_layers(patched)
    layers[2].state_positions = (1,)  # a previous value is restored, not reset to None
    try:
        with pytest.raises(KeyError):
            with an.state_at(patched, 4, layers=[2]) as mods:
                assert list(mods) == [2] and layers[2].state_positions == (4,) and layers[0].state_positions is None
                raise KeyError("boom")
        assert layers[2].state_positions == (1,)
    finally:
        layers[2].state_positions = None


@pytest.mark.parametrize("name", NAMES)
def test_split_prefill_without_edit_matches_the_single_call(pair, name):
    """Splitting moves chunk boundaries: logits equal to 1e-5 relative (fp32 torch path), not
    bitwise; greedy generation after a split prefill gives the same tokens."""
    patched, ref = pair(name)
    ids, mask = ids_for(130), left_pad_mask(3, 130)
    want = logits(ref, ids, mask)
    with an.state_at(patched, [0, 5, 63, 64, 100, 129]):
        got = logits(patched, ids, mask)
    assert rel(got, want) <= 1e-5
    short, smask = ids[:, :12], left_pad_mask(3, 12)
    gen_ref = ref.generate(short, attention_mask=smask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with an.state_at(patched, [3, 7]):
        gen = patched.generate(short, attention_mask=smask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(gen, gen_ref)


@HV
@pytest.mark.parametrize("name", present("qwen3_5", "olmo_hybrid", "kimi_linear") or [ANY_GDN])
def test_states_at_match_the_cache_after_each_prefix(pair, name, hv_ratio):
    patched, ref = pair(name, hv_ratio)
    ids, mask = ids_for(100), left_pad_mask(3, 100)
    positions = [4, 63, 64, 99]
    states = an.states_at(patched, ids, positions, attention_mask=mask)
    assert list(states) == list(gi.gdn_layers(patched))
    for i, p in enumerate(positions):
        cache = new_cache(ref)
        logits(ref, ids[:, : p + 1], mask[:, : p + 1], cache=cache, use_cache=True)
        for layer, S in states.items():
            assert S.shape[:2] == (3, len(positions))
            assert rel(S[:, i], view(cache).get_recurrent_state(layer)) <= 1e-5, (layer, p)
    # layer 0 alone, same first segments: the same kernel calls, so bitwise the same states
    only = an.states_at(patched, ids, [4, 63], layers=[0], attention_mask=mask)
    assert list(only) == [0] and torch.equal(only[0], states[0][:, :2])


@pytest.mark.parametrize("name", NAMES)
def test_patching_the_state_with_another_prompts_state(pair, name):
    """Replace layer L's state after token t with prompt B's: logits equal (bitwise) the
    unedited split run up to t and change from t+1; they match the unpatched model run in two
    cached segments with L's recurrent state overwritten between them (the conv cache and the
    other GDN layer's state stay prompt A's)."""
    patched, ref = pair(name)
    skip_unless_continues(patched)
    layers = list(gi.gdn_layers(patched))
    L, other, t, T = layers[0], layers[1], 20, 50
    a, b = ids_for(T, seed=1), ids_for(T, seed=2)

    cache_b = new_cache(ref)
    logits(ref, b[:, : t + 1], cache=cache_b, use_cache=True)
    S_b = view(cache_b).get_recurrent_state(L).clone()

    fired, seen = [], {}

    def put_b(S):
        fired.append(S.shape)
        return S_b if len(fired) == 1 else None  # only the state after t (the first firing)

    def record(key):
        return lambda S: seen.setdefault(key, []).append(S.clone())

    cache_p = new_cache(patched)
    with an.state_at(patched, [t]):  # split every GDN layer; edit only L
        with gi.intervene(patched, {(other, "state"): record("plain")}):
            plain = logits(patched, a)
        with gi.intervene(patched, {(L, "state"): put_b, (other, "state"): record("edited")}):
            edited = logits(patched, a, cache=cache_p, use_cache=True)
    assert len(fired) == 2  # after t, and the final state
    assert torch.equal(edited[:, : t + 1], plain[:, : t + 1])
    assert (edited[:, t + 1 :] - plain[:, t + 1 :]).abs().amax(-1).min() > 0  # every later position changes
    assert torch.equal(seen["edited"][0], seen["plain"][0])  # the other layer's state at t is untouched
    assert not torch.equal(seen["edited"][1], seen["plain"][1])  # its final state sees L's edit downstream

    cache_r = new_cache(ref)
    first = logits(ref, a[:, : t + 1], cache=cache_r, use_cache=True)
    assert rel(seen["plain"][0], view(cache_r).get_recurrent_state(other)) <= 1e-5
    view(cache_r).update_recurrent_state(S_b, L)  # overwrite only L's recurrent state; conv cache stays A's
    second = logits(ref, a[:, t + 1 :], cache=cache_r, use_cache=True)
    assert rel(edited, torch.cat([first, second], 1)) <= 1e-5
    for l in layers:  # the caches both runs leave behind agree
        assert rel(view(cache_p).get_recurrent_state(l), view(cache_r).get_recurrent_state(l)) <= 1e-5
        assert rel(view(cache_p).get_conv_state(l), view(cache_r).get_conv_state(l)) <= 1e-5


# ---------------------------------------------------------------- plots


def test_heatmap_shows_the_head_mean_and_saves(pair, tmp_path):
    from matplotlib.figure import Figure

    from gdn_intervene import plot

    patched, _ = pair(ANY_GDN)
    ids = ids_for(12)
    res = an.effective_attention_for(patched, ids, layers=[0])[0]
    tokens = [f"tok{i}" for i in range(12)]
    fig = plot.effective_attention_heatmap(res, tokens=tokens, batch=1, path=tmp_path / "m.png")
    assert isinstance(fig, Figure) and (tmp_path / "m.png").stat().st_size > 1000
    ax = fig.axes[0]
    assert (ax.images[0].get_array() == res.matrix[1].mean(0).numpy()).all()
    assert [t.get_text() for t in ax.get_xticklabels()] == tokens
    fig = plot.effective_attention_heatmap(res.matrix, head=3, tokens=tokens)
    assert (fig.axes[0].images[0].get_array() == res.matrix[0, 3].numpy()).all()
    rows = an.effective_attention_for(patched, ids, layers=[0], rows=[11, 4])[0]
    fig = plot.effective_attention_heatmap(rows, head=0, tokens=tokens, rows=[11, 4])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["tok11", "tok4"]
    with pytest.raises(ValueError, match=r"head must be in \[0, 4\)"):
        plot.effective_attention_heatmap(res, head=7)
    with pytest.raises(ValueError, match=r"tokens must have T=12 labels"):
        plot.effective_attention_heatmap(res, tokens=tokens[:3])
