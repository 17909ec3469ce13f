"""`torch.inference_mode()`, what many evaluation scripts use: reading and editing sites works
and gives the numbers of `torch.no_grad()`; the first-call self-check runs under it too."""

import pytest
import torch
from conftest import ids_for, logits
from models import ANY_GDN, MODELS, build

import gdn_intervene as gi
from gdn_intervene import selfcheck
from gdn_intervene.sites import SITE_NAMES

NAMES = list(MODELS)


def _halve(x):
    return x * 0.5


@pytest.mark.parametrize("name", NAMES)
def test_capture_and_intervene_under_inference_mode(name):
    model = gi.patch(build(name))
    layer = next(iter(gi.gdn_layers(model)))
    ids = ids_for(9)
    results = {}
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            with gi.capture(model, sites=list(SITE_NAMES), layers=[layer]) as cache:
                plain = logits(model, ids)
            with gi.intervene(model, {(layer, "beta"): _halve}):
                edited = logits(model, ids)
        results[mode.__name__] = (plain, edited, [cache[layer, s][0] for s in SITE_NAMES])
    (p0, e0, c0), (p1, e1, c1) = results.values()
    assert torch.equal(p0, p1) and torch.equal(e0, e1) and not torch.equal(p1, e1)
    assert all(torch.equal(a, b) for a, b in zip(c0, c1))


def test_an_in_place_edit_under_inference_mode_is_checked():
    model = gi.patch(build(ANY_GDN))
    layer = next(iter(gi.gdn_layers(model)))

    def poison(x):
        x[0, 0, 0] = float("nan")

    with torch.inference_mode(), gi.intervene(model, {(layer, "beta"): poison}):
        with pytest.raises(gi.SiteValueError, match="not finite"):
            logits(model, ids_for(5))


def test_the_self_check_runs_under_inference_mode_and_state_at(monkeypatch):
    """A class's first call inside inference mode, or inside `state_at`, checks itself against
    HF and passes (it used to blame the release for our own per-call settings)."""
    monkeypatch.setattr("gdn_intervene.layer._CLASSES", {})
    selfcheck.reset()
    try:
        model = gi.patch(build(ANY_GDN))
        with torch.inference_mode():
            logits(model, ids_for(9))
        monkeypatch.setattr("gdn_intervene.layer._CLASSES", {})
        selfcheck.reset()
        model = gi.patch(build(ANY_GDN))
        with gi.state_at(model, [3]):
            logits(model, ids_for(9))
        assert not selfcheck._FAILED
    finally:
        selfcheck.reset()


@pytest.mark.parametrize("name", NAMES)
def test_attribution_patching_under_inference_mode(name):
    """AtP takes a backward: under inference_mode it leaves the mode for the call and gives the
    numbers it gives outside (inputs made inside the block included)."""
    from gdn_intervene import tracing

    model = gi.patch(build(name))
    clean = ids_for(10, B=1)
    corrupt = clean.clone()
    corrupt[0, 3] = (clean[0, 3] + 5) % 90 + 3
    want = tracing.attribution_patching(model, clean, corrupt, answers=(5, 7), verify=2)
    with torch.inference_mode():
        clean_i, corrupt_i = clean.clone(), corrupt.clone()
        got = tracing.attribution_patching(
            model, clean_i, corrupt_i, answers=(torch.tensor(5), torch.tensor(7)), verify=2
        )
    assert torch.is_inference(clean_i)
    for s in want.sites:
        torch.testing.assert_close(got.scores[s], want.scores[s], rtol=0, atol=0, equal_nan=True)
    assert got.verified == want.verified and want.scores["state"].nan_to_num().abs().sum() > 0
