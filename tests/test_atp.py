"""Attribution patching (`tracing.attribution_patching`): each cell's score is the directional
derivative of the metric along `source - base` at that one cell, computed independently (a
float64 scalar eps mixed into the site value, autograd through the whole model; for the state
a `state_at` split), for every family in the registry; batches of pairs, both directions,
`verify=K` against `causal_trace`.

HF's torch kernels compute in float32 whatever the model's dtype, so the model-level check of
the state (the adjoint scan in float64 against the kernel from the split) holds to the
kernel's precision; the scan itself is checked to 1e-9 against a float64 recurrence of the
layer's own inputs.
"""

import contextlib

import pytest
import torch
from conftest import ids_for
from models import MODELS, build

import gdn_intervene as gi
from gdn_intervene import ops, tracing
from gdn_intervene.sites import TRACE_SITES, site

NAMES = list(MODELS)
T = 12
FIRST = 4  # the first corrupted position


def _f64(name: str):
    """The family's tiny model in float64, patched; MoE experts on the eager path (torch's
    grouped matmul takes no float64 on the CPU)."""
    model = build(name, dtype=torch.float64)
    try:
        model.set_experts_implementation("eager")
    except (AttributeError, ValueError):
        pass  # no experts, or a release without the switch
    return gi.patch(model)


def _pair_ids(seed: int = 0, B: int = 1):
    clean = ids_for(T, B=B, seed=seed)
    corrupt = clean.clone()
    corrupt[:, FIRST] = (clean[:, FIRST] + 7) % 90 + 3
    corrupt[:, FIRST + 3] = (clean[:, FIRST + 3] + 11) % 90 + 3
    return clean, corrupt


def _answers(model, clean, corrupt):
    """Two fixed answer tokens (the random models' argmax may coincide)."""
    return torch.tensor([5] * clean.shape[0]), torch.tensor([7] * clean.shape[0])


def _directional(model, base_ids, source_ids, answers, cell, source_value):
    """d metric / d eps at eps = 0 with the cell's value x + eps (source - x), through the whole
    model in float64 (state cells: the prefill split after the position, first firing only)."""
    eps = torch.zeros((), dtype=torch.float64, requires_grad=True)
    fired = []

    def mix(x):
        fired.append(1)
        if len(fired) > 1:
            return None
        y = x.clone()
        if site(cell.site).has_time:
            y[:, cell.position] = x[:, cell.position] + eps * (source_value[:, cell.position] - x[:, cell.position])
        else:
            y = x + eps * (source_value - x)
        return y

    split = (
        gi.state_at(model, [cell.position], [cell.layer]) if not site(cell.site).has_time else contextlib.nullcontext()
    )
    with torch.enable_grad(), split, gi.intervene(model, {(cell.layer, cell.site): mix}):
        last = model(input_ids=base_ids, use_cache=False).logits[0, -1]
        metric = last[answers[0]] - last[answers[1]]
    (grad,) = torch.autograd.grad(metric, eps)
    return float(grad)


def _source_value(model, ids, cell):
    split = (
        gi.state_at(model, [cell.position], [cell.layer]) if not site(cell.site).has_time else contextlib.nullcontext()
    )
    with torch.no_grad(), split, gi.capture(model, sites=[cell.site], layers=[cell.layer]) as cache:
        model(input_ids=ids, use_cache=False)
    return cache[cell.layer, cell.site][0]


@pytest.mark.parametrize("patch", [tracing.CLEAN_INTO_CORRUPT, tracing.CORRUPT_INTO_CLEAN])
@pytest.mark.parametrize("name", NAMES)
def test_each_score_is_the_directional_derivative(name, patch):
    model = _f64(name)
    clean, corrupt = _pair_ids()
    answers = _answers(model, clean, corrupt)
    res = tracing.attribution_patching(model, clean, corrupt, answers=answers, patch=patch, steps=1)
    assert res.method == "attribution patching"
    base, source = (corrupt, clean) if patch == tracing.CLEAN_INTO_CORRUPT else (clean, corrupt)
    sign = 1.0 if patch == tracing.CLEAN_INTO_CORRUPT else -1.0
    span = res.clean_diff - res.corrupt_diff
    layer = res.layers[-1]
    checked = 0
    for n in TRACE_SITES:
        for p in (FIRST, FIRST + 3, T - 1 if site(n).has_time else T - 2):
            cell = tracing.Cell(n, layer, p)
            want = sign * _directional(model, base, source, (5, 7), cell, _source_value(model, source, cell)) / span
            got = res.score(cell)
            # token sites: autograd through the same kernels; the state: the float64 scan against
            # HF's float32 chunk kernel after the split (see the module doc)
            # (HF's float32 kernels: an absolute floor of 1e-6 of the logit-difference span)
            tol = 1e-6 if site(n).has_time else 5e-5
            assert abs(got - want) <= tol * abs(want) + 1e-6, (cell, got, want)
            checked += want != 0
    assert checked >= 10  # not vacuous
    assert torch.isnan(res.scores["state"][:, -1]).all()
    assert not res.scores["state"][:, :FIRST].any()  # states before the first corrupted token are equal


@pytest.mark.parametrize("name", NAMES)
def test_every_site_of_the_registry_scores_its_directional_derivative(name):
    """Beyond the trace sites: every registry site with a time axis (pre-conv projections, the
    conv, beta and decay before and after their nonlinearity, the gate, the norm)."""
    model = _f64(name)
    clean, corrupt = _pair_ids()
    every = tuple(s.name for s in gi.SITES if s.has_time)
    res = tracing.attribution_patching(model, clean, corrupt, answers=(5, 7), sites=every, steps=1)
    span = res.clean_diff - res.corrupt_diff
    checked = 0
    for n in every:
        cell = tracing.Cell(n, res.layers[0], FIRST + 3)
        want = _directional(model, corrupt, clean, (5, 7), cell, _source_value(model, clean, cell)) / span
        assert abs(res.score(cell) - want) <= 1e-6 * abs(want) + 1e-6, (cell, res.score(cell), want)
        checked += want != 0
    assert checked >= len(every) - 2  # not vacuous


@pytest.mark.parametrize("name", NAMES)
def test_the_state_scan_is_exact_on_the_layers_own_inputs(name):
    """The adjoint scan against a float64 recurrence of the layer's captured inputs, with the
    gradient at `recurrence` from the model: d/d eps of sum_t delta_t . o_t(eps), o from the
    state after p mixed toward the source run's (1e-9)."""
    model = _f64(name)
    clean, corrupt = _pair_ids()
    layer = list(gi.gdn_layers(model))[0]
    base, grads, _ = tracing.attribution.values_and_grads(
        model,
        corrupt,
        (*tracing.attribution.RUN_SITES, "recurrence"),
        (layer,),
        lambda last: (torch.tensor([5]), torch.tensor([7])),
    )
    with torch.no_grad(), gi.capture(model, sites=tracing.attribution.RUN_SITES, layers=[layer]) as cache:
        model(input_ids=clean, use_cache=False)
    run_b = ops.DeltaRuleRun(*(base[layer, s] for s in tracing.attribution.RUN_SITES))
    run_s = ops.DeltaRuleRun(*(cache[layer, s][0] for s in tracing.attribution.RUN_SITES))
    delta = grads[layer, "recurrence"]
    scores = ops.state_patching_scores(run_b, run_s, delta, dtype=torch.float64, chunk=5)  # chunks cross T
    for p in (FIRST, FIRST + 2, T - 2):
        pre = [ops.DeltaRuleRun(*(x[:, : p + 1] for x in r)) for r in (run_b, run_s)]
        (_, Sb), (_, Ss) = (ops.naive_gated_delta_rule(r.q, r.k, r.v, g=r.g, beta=r.beta) for r in pre)
        eps = torch.zeros((), dtype=torch.float64, requires_grad=True)
        rest = ops.DeltaRuleRun(*(x[:, p + 1 :] for x in run_b))
        o, _ = ops.naive_gated_delta_rule(
            rest.q, rest.k, rest.v, g=rest.g, beta=rest.beta, initial_state=Sb + eps * (Ss - Sb)
        )
        (want,) = torch.autograd.grad((o * delta[:, p + 1 :]).sum(), eps)
        assert abs(float(scores[:, :, p].sum()) - float(want)) <= 1e-9 * max(abs(float(want)), 1e-6)
    assert not scores[..., -1].any()


def test_a_batch_of_pairs_equals_each_pair_alone():
    name = next(iter(MODELS))
    model = gi.patch(build(name))
    clean, corrupt = _pair_ids(B=3)
    answers = (torch.tensor([5, 9, 11]), torch.tensor([7, 7, 3]))
    batch = tracing.attribution_patching(model, clean, corrupt, answers=answers)
    assert isinstance(batch, list) and len(batch) == 3
    for r, res in enumerate(batch):
        one = tracing.attribution_patching(
            model, clean[r : r + 1], corrupt[r : r + 1], answers=(answers[0][r], answers[1][r])
        )
        for n in res.sites:
            torch.testing.assert_close(res.scores[n], one.scores[n], rtol=1e-4, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("name", NAMES)
def test_a_left_padded_batch_equals_each_pair_alone(name):
    """Pairs of 12, 9 and 7 tokens, left-padded into one batch (pad tokens differ from row to
    row, so a leak would show): each row's result is the pair's own, traced alone."""
    model = _f64(name)
    lengths = (T, T - 3, T - 5)
    clean, corrupt = _pair_ids(B=3)
    mask = torch.zeros(3, T, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, T - n :] = 1
    pads = torch.tensor([[0], [50], [81]]).expand(3, T)
    clean_p, corrupt_p = (torch.where(mask.bool(), x, pads) for x in (clean, corrupt))
    labels = [[f"t{p}" for p in range(n)] for n in lengths]
    batch = tracing.attribution_patching(
        model,
        clean_p,
        corrupt_p,
        answers=(5, 7),
        attention_mask=mask,
        verify=3,
        tokens=[labels[0], ["pad"] * 3 + labels[1], labels[2]],
    )  # T labels or its own
    assert [res.tokens for res in batch] == labels
    batch = tracing.attribution_patching(model, clean_p, corrupt_p, answers=(5, 7), attention_mask=mask, verify=3)
    for r, (res, n) in enumerate(zip(batch, lengths)):
        alone = tracing.attribution_patching(
            model, clean[r : r + 1, T - n :], corrupt[r : r + 1, T - n :], answers=(5, 7), verify=3
        )
        assert res.tokens == alone.tokens and len(res.tokens) == n
        assert res.corrupted_positions == alone.corrupted_positions
        assert res.clean_diff == pytest.approx(alone.clean_diff, rel=1e-6)
        for s in res.sites:
            assert res.scores[s].shape == (len(res.layers), n)
            torch.testing.assert_close(res.scores[s], alone.scores[s], rtol=1e-4, atol=1e-6, equal_nan=True)
        # the same top cells, but for ties: estimates equal to 1e-4 may swap places (4.57's kernels)
        kth = min(abs(alone.score(c)) for c in alone.verified)
        for c in set(res.verified) ^ set(alone.verified):
            assert abs(abs(alone.score(c)) - kth) <= 1e-4 * kth + 1e-6, (c, alone.score(c), kth)
        for c in set(res.verified) & set(alone.verified):
            assert res.verified[c] == pytest.approx(alone.verified[c], rel=1e-4, abs=1e-6)
    assert any(batch[2].scores[s].abs().nan_to_num().sum() > 0 for s in batch[2].sites)  # not vacuous
    # one padded pair runs as itself (HF masks padding only in batches)
    one = tracing.attribution_patching(model, clean_p[2:], corrupt_p[2:], answers=(5, 7), attention_mask=mask[2:])
    alone = tracing.attribution_patching(model, clean[2:, T - 7 :], corrupt[2:, T - 7 :], answers=(5, 7))
    for s in one.sites:
        torch.testing.assert_close(one.scores[s], alone.scores[s], rtol=0, atol=0, equal_nan=True)


def test_verify_reruns_activation_patching_on_the_top_cells():
    """verify=K: the K cells of largest |estimate|, each with causal_trace's score for it."""
    name = next(iter(MODELS))
    model = gi.patch(build(name))
    clean, corrupt = _pair_ids()
    answers = (5, 7)
    res = tracing.attribution_patching(model, clean, corrupt, answers=answers, verify=6)
    full = tracing.causal_trace(model, clean, corrupt, answers=answers)
    assert list(res.verified) == res.top(6) and len(res.verified) == 6
    # Same patch, other batch: causal_trace runs every token cell in one batch, verify six rows,
    # and the kernels' batched matmuls round by batch size (4.57's chunk kernel: 1.6e-5 seen).
    span = full.clean_diff - full.corrupt_diff
    for cell, v in res.verified.items():
        got, want = (x * span + full.corrupt_diff for x in (v, full.score(cell)))
        assert abs(got - want) <= 1e-5 * (1 + abs(want)), cell
    assert [c["estimate"] for c in res.to_json()["verified"]] == [round(res.score(c), 6) for c in res.top(6)]


def test_figures_take_an_attribution_patching_result(tmp_path):
    from gdn_intervene import plot

    model = gi.patch(build(next(iter(MODELS))))
    clean, corrupt = _pair_ids()
    res = tracing.attribution_patching(model, clean, corrupt, answers=(5, 7))
    plot.trace_figure(res, path=tmp_path / "atp.png")
    assert (tmp_path / "atp.png").stat().st_size > 0


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(patch="sideways"), "patch must be"),
        (dict(verify=-1), "verify must be an int"),
        (dict(layers=[1]), "layers must be GDN layer indices"),
        (dict(sites=["nope"]), "unknown site"),
        (dict(answers=(5, 5)), "same answer"),
        (dict(attention_mask=torch.ones(1, T - 1)), r"attention_mask must be \[B, T\] = \[1, 12\]"),
        (dict(attention_mask=torch.tensor([[1] * (T - 1) + [0]])), "row 0 is not left padding"),
        (dict(attention_mask=torch.tensor([[0, 1] * (T // 2)])), "row 0 is not left padding"),
        (dict(attention_mask=torch.zeros(1, T)), "row 0 is not left padding"),
        (dict(attention_mask=torch.full((1, T), 2)), "0 and 1 only"),
        (dict(tokens=["a"] * (T - 1)), r"tokens must label the pair's 12 tokens \(or all T = 12 positions\); got 11"),
        (dict(tokens=[["a"] * T] * 2), r"tokens must hold one list of labels per pair, \[B\] = \[1\] lists; got 2"),
        (dict(answers=(5, 10**6)), r"the corrupt answer 1000000 is not a token id in \[0, "),
        (dict(answers=(torch.tensor([5, 6]), 7)), r"the clean answer must be one token id or \[B\] = \[1\] of them"),
    ],
)
def test_bad_arguments_are_named(kw, message):
    model = gi.patch(build(next(iter(MODELS))))
    clean, corrupt = _pair_ids()
    kw = {"answers": (5, 7), **kw}
    with pytest.raises(ValueError, match=message):
        tracing.attribution_patching(model, clean, corrupt, **kw)


# ------------------------------------------------------------------ integrated gradients (steps=K)


def _decoder_input(model):
    """The first decoder layer (found here by type, independently of the library)."""
    for m in model.modules():
        layers = getattr(m, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and any(
            gi.gdn_layers(model)[L] in x.modules() for x in layers for L in [0]
        ):
            return layers[0]
    raise LookupError


@contextlib.contextmanager
def _residual(model, replace=None, seen=None):
    """Record (or replace) the hidden states entering the first decoder layer."""

    def pre(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if seen is not None:
            seen.append(h.detach().clone())
        if replace is None:
            return None
        return ((replace, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": replace})

    h = _decoder_input(model).register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


def _quadrature(model, base_ids, source_ids, cell, path, K):
    """(1/K) sum_k d metric / d eps at eps = 0, the cell's value x + eps (x_source - x_base) in
    the run at point a_k = k / K of `path`, through the whole model in float64: the reference
    for `steps=K` (its own hooks; shares nothing with the library's integration)."""
    base_v, source_v = (_source_value(model, ids, cell) for ids in (base_ids, source_ids))
    hb, hs = [], []
    with torch.no_grad():
        for ids, seen in ((base_ids, hb), (source_ids, hs)):
            with _residual(model, seen=seen):
                model(input_ids=ids, use_cache=False)
    run_sites = (cell.site,) if site(cell.site).has_time else tracing.attribution.RUN_SITES
    ends = {}
    for s in run_sites:
        c = tracing.Cell(s, cell.layer, cell.position)
        ends[s] = tuple(_source_value(model, ids, c) if site(s).has_time else None for ids in (base_ids, source_ids))
    total = 0.0
    for k in range(K):
        a = k / K
        eps = torch.zeros((), dtype=torch.float64, requires_grad=True)
        edits, fired = {}, []

        def interp(s):
            b, src = ends[s]
            return lambda x: (b + a * (src - b)).clone()

        if path == "activations" and a > 0:
            edits = {(cell.layer, s): interp(s) for s in run_sites}

        def mix(x, edit=edits.get((cell.layer, cell.site))):  # noqa: B008 (bound now, on purpose)
            y = edit(x) if edit is not None else x.clone()
            if site(cell.site).has_time:
                y[:, cell.position] = y[:, cell.position] + eps * (source_v - base_v)[:, cell.position]
                return y
            fired.append(1)
            return y + eps * (source_v - base_v) if len(fired) == 1 else None

        edits[(cell.layer, cell.site)] = mix
        h = hb[0] + a * (hs[0] - hb[0]) if path == "inputs" and a > 0 else None
        split = (
            gi.state_at(model, [cell.position], [cell.layer])
            if not site(cell.site).has_time
            else contextlib.nullcontext()
        )
        with torch.enable_grad(), split, gi.intervene(model, edits), _residual(model, replace=h):
            last = model(input_ids=base_ids, use_cache=False).logits[0, -1]
            metric = last[5] - last[7]
        (g,) = torch.autograd.grad(metric, eps)
        total += float(g)
    return total / K


@pytest.mark.parametrize("path", ["inputs", "activations"])
@pytest.mark.parametrize("name", NAMES)
def test_k_step_scores_are_the_quadrature_of_the_directional_derivative(name, path):
    """steps=K: each cell's score is the mean over the K path points of the directional
    derivative along source - base, computed independently at each point (the inputs path:
    the residual entering the first decoder layer interpolated; the activations path: the cell's
    own site, or for the state its layer's q, k, v, beta, decay, interpolated)."""
    model = _f64(name)
    clean, corrupt = _pair_ids()
    K = 3
    res = tracing.attribution_patching(model, clean, corrupt, answers=(5, 7), steps=K, path=path)
    assert res.steps == K
    span = res.clean_diff - res.corrupt_diff
    layer = res.layers[0]
    checked = 0
    for n in ("k", "beta", "decay", "state", "recurrence", "out_proj"):
        cell = tracing.Cell(n, layer, FIRST + 3 if site(n).has_time else FIRST + 1)
        want = _quadrature(model, corrupt, clean, cell, path, K) / span
        tol = 1e-6 if site(n).has_time else 5e-5  # the state: the float64 scan against HF's float32 kernel
        assert abs(res.score(cell) - want) <= tol * abs(want) + 1e-6, (cell, res.score(cell), want)
        checked += want != 0
    assert checked >= 5  # not vacuous
    first = tracing.attribution_patching(model, clean, corrupt, answers=(5, 7), steps=1)
    assert any(not torch.equal(res.scores[n], first.scores[n]) for n in res.sites)  # the path changed something


def test_one_step_is_first_order_on_either_path():
    model = _f64(next(iter(NAMES)))
    clean, corrupt = _pair_ids()
    a = tracing.attribution_patching(model, clean, corrupt, answers=(5, 7), steps=1, path="inputs")
    b = tracing.attribution_patching(model, clean, corrupt, answers=(5, 7), steps=1, path="activations")
    assert all(torch.equal(a.scores[n].nan_to_num(), b.scores[n].nan_to_num()) for n in a.sites)


@pytest.mark.parametrize("path", ["inputs", "activations"])
def test_path_points_batched_or_one_per_run_give_the_same_scores(path):
    """`grad_batch_size` only groups the path's rows into fewer forwards + backwards (memory for
    time): the scores are the same to float64 rounding. Default: one point per run (before, all
    K - 1 points ran as one batch, and 16 points at T = 128 of a real-width model ran out of
    24 GiB)."""
    model = _f64(next(iter(NAMES)))
    clean, corrupt = _pair_ids()
    one = tracing.attribution_patching(model, clean, corrupt, answers=(5, 7), steps=4, path=path)
    many = tracing.attribution_patching(model, clean, corrupt, answers=(5, 7), steps=4, path=path, grad_batch_size=64)
    for n in one.sites:
        torch.testing.assert_close(one.scores[n], many.scores[n], rtol=1e-10, atol=1e-12, equal_nan=True)
