"""The numbers a researcher decides on: agreement between attribution and activation patching
paired by (site, layer, position), never by row order; a corruption that leaves the metric
unchanged refused before any sweep, never inf; every written JSON strict; a model without an LM
head refused in one line before any forward."""

import json
import math

import pytest
import torch
from conftest import ids_for, trace_pair
from models import ANY_GDN, build, present

import gdn_intervene as gi
from gdn_intervene import outputs, plot, tracing
from gdn_intervene.tracing import Cell


def _strict(text: str):
    """json.loads that refuses NaN and Infinity, as a strict parser does."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def traced():
    model = gi.patch(build(ANY_GDN))
    clean, bad, answers = trace_pair(model, 9, seed=4)
    sites = ("k", "v", "state", "out_proj")
    trace = tracing.causal_trace(model, clean, bad, sites=sites, answers=answers)
    return model, clean, bad, answers, sites, trace


def _reference_pearson(atp, trace) -> float:
    """Pearson over the cells both score, paired by hand from each result's own layer list."""
    xs, ys = [], []
    for n in atp.sites:
        for i, L in enumerate(atp.layers):
            for p in range(len(atp.tokens)):
                x = float(atp.scores[n][i, p])
                y = float(trace.scores[n][trace.layers.index(L), p])
                if x == x and y == y:
                    xs.append(x)
                    ys.append(y)
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


@pytest.mark.parametrize("layers", [None, [2, 0], [2], [0]])
def test_agreement_pairs_cells_by_layer(traced, layers, tmp_path):
    """AtP on `layers=[2, 0]` against a trace of the default layers gave Pearson 0.22 where the
    truth was 0.98 (cells paired by row); `layers=[2]` raised a raw size mismatch."""
    model, clean, bad, answers, sites, trace = traced
    atp = tracing.attribution_patching(model, clean, bad, sites=sites, answers=answers, layers=layers)
    stats = tracing.agreement(atp, trace)
    assert stats["all"].pearson == pytest.approx(_reference_pearson(atp, trace), abs=1e-12)
    assert stats["all"].cells == sum(
        not math.isnan(v) for v in torch.cat([s.flatten() for s in atp.scores.values()]).tolist()
    )
    plot.atp_scatter(atp, trace, path=tmp_path / "s.png")  # the figures pair the same way
    files = outputs.write(tmp_path, trace, atp=atp)
    data = _strict((tmp_path / "trace.json").read_text())
    assert data["agreement"]["all"]["cells"] == stats["all"].cells and len(files) == 4


@pytest.mark.parametrize("layers", [[2], [2, 0]])
def test_causal_trace_of_some_layers_is_those_rows_of_the_full_trace(traced, layers):
    """`layers=` sweeps only those GDN layers (one layer's state at every position at real sizes),
    in the order given: each row equals the full trace's row for that layer (the logit
    differences to rounding: the batches hold other cells)."""
    model, clean, bad, answers, sites, trace = traced
    part = tracing.causal_trace(model, clean, bad, sites=sites, answers=answers, layers=layers)
    assert part.layers == tuple(layers)
    span = trace.clean_diff - trace.corrupt_diff
    for n in sites:
        assert part.scores[n].shape == (len(layers), len(trace.tokens))
        for i, L in enumerate(layers):
            got, want = part.scores[n][i], trace.scores[n][trace.layers.index(L)]
            assert torch.equal(got.isnan(), want.isnan()), (n, L)
            assert ((got - want).nan_to_num() * span).abs().max() <= 1e-5 * (1 + abs(trace.corrupt_diff)), (n, L)
    assert tracing.agreement(part, part)["all"].cells > 0
    with pytest.raises(ValueError, match="layers must be GDN layer indices"):
        tracing.causal_trace(model, clean, bad, sites=sites, answers=answers, layers=[1])


def test_agreement_refuses_results_of_other_patchings(traced):
    model, clean, bad, answers, sites, trace = traced
    atp = tracing.attribution_patching(model, clean, bad, sites=sites, answers=answers)
    other = tracing.attribution_patching(model, clean, bad, sites=sites, answers=answers, patch="corrupt_into_clean")
    with pytest.raises(ValueError, match="different patching directions"):
        tracing.agreement(other, trace)
    swapped = tracing.attribution_patching(model, clean, bad, sites=sites, answers=answers[::-1])
    with pytest.raises(ValueError, match="different answers"):
        tracing.agreement(swapped, trace)
    shifted = ids_for(9, B=1, seed=11)
    bad2 = shifted.clone()
    bad2[0, 2] = (bad2[0, 2] + 7) % 90 + 3
    try:
        elsewhere = tracing.attribution_patching(model, shifted, bad2, sites=sites, answers=answers)
    except tracing.SameAnswerError:
        pytest.skip("the random model gives another prompt the same answers")
    with pytest.raises(ValueError, match="different prompt pairs"):
        tracing.agreement(elsewhere, trace)
    only_beta = tracing.attribution_patching(model, clean, bad, sites=("beta",), answers=answers)
    with pytest.raises(ValueError, match="share no scored cell"):
        tracing.agreement(only_beta, trace)


def _tied_answers(model):
    """A model whose LM head has two equal rows (a, b): logit(a) - logit(b) is 0 in every run,
    the zero span a bf16 model meets for real."""
    head = model.get_output_embeddings()
    a, b = 5, 9
    with torch.no_grad():
        head.weight[b] = head.weight[a]
        if getattr(head, "bias", None) is not None:
            head.bias[b] = head.bias[a]
    return a, b


def test_a_zero_span_is_refused_before_any_sweep():
    model = gi.patch(build(ANY_GDN))
    a, b = _tied_answers(model)
    clean = ids_for(8, B=1, seed=2)
    bad = clean.clone()
    bad[0, 2] = (bad[0, 2] + 7) % 90 + 3
    calls = []
    h = next(iter(gi.gdn_layers(model).values())).register_forward_hook(lambda *x: calls.append(1))
    try:
        with pytest.raises(tracing.ZeroSpanError, match="leaves logit") as e:
            tracing.causal_trace(model, clean, bad, answers=(a, b))
        assert len(calls) == 2  # the two runs that measured the span, no sweep
        assert "\n" not in str(e.value)
        with pytest.raises(tracing.ZeroSpanError):
            tracing.attribution_patching(model, clean, bad, answers=(a, b), verify=3)
        batch = torch.cat([clean, clean]), torch.cat([bad, bad])
        with pytest.raises(tracing.ZeroSpanError, match="^pair 0: "):
            tracing.attribution_patching(model, *batch, answers=(torch.tensor([a, 6]), torch.tensor([b, 7])))
    finally:
        h.remove()


@pytest.mark.parametrize("name", present("glm5_next_text") or [])
def test_a_model_without_an_lm_head_is_refused_in_one_line(name):
    model = gi.patch(build(name))
    clean = ids_for(6, B=1)
    bad = clean.clone()
    bad[0, 1] += 1
    for fn in (tracing.causal_trace, tracing.attribution_patching):
        with pytest.raises(ValueError, match="has no LM head") as e:
            fn(model, clean, bad, answers=(3, 4))
        assert "\n" not in str(e.value)


def test_a_bare_decoder_is_refused_before_any_forward():
    model = gi.patch(build(ANY_GDN))
    decoder = model.model  # the decoder without its LM head (what AutoModel loads)
    calls = []
    h = decoder.register_forward_hook(lambda *x: calls.append(1))
    try:
        with pytest.raises(ValueError, match="has no LM head"):
            tracing.causal_trace(decoder, ids_for(5, B=1), ids_for(5, B=1, seed=1))
        with pytest.raises(ValueError, match="has no LM head"):
            tracing.attribution_patching(decoder, ids_for(5, B=1), ids_for(5, B=1, seed=1), answers=(1, 2))
    finally:
        h.remove()
    assert not calls


def test_every_trace_json_is_strict(traced, tmp_path):
    model, clean, bad, answers, sites, trace = traced
    data = _strict(json.dumps(trace.to_json(), allow_nan=False))
    state = data["scores"]["state"]
    assert all(row[-1] is None for row in state)  # the final state's column: null, not NaN
    atp = tracing.attribution_patching(model, clean, bad, sites=sites, answers=answers, verify=3)
    _strict(json.dumps(atp.to_json(), allow_nan=False))
    assert len(atp.verified) == 3 and all(isinstance(c, Cell) for c in atp.verified)
