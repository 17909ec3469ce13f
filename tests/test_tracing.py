"""Batched causal tracing equals one forward per cell, computed independently with hooks."""

import pytest
import torch
from conftest import ids_for

import gdn_intervene as gi
from gdn_intervene.analysis import state_at
from gdn_intervene.tracing import causal_trace


def _one_cell(model, clean, bad, layer, name, p, answers):
    """Reference: capture the clean value, run the corrupted prompt with one cell restored."""
    T = clean.shape[1]
    split = name == "state"
    vals = []
    with torch.no_grad():
        with gi.intervene(model, {(layer, name): lambda x: vals.append(x.clone())}):
            if split:
                with state_at(model, list(range(T - 1)), [layer]):
                    model(clean, use_cache=False)
            else:
                model(clean, use_cache=False)
        calls = [0]

        def restore(x):
            x = x.clone()
            if split:
                j, calls[0] = calls[0], calls[0] + 1
                if j == p:
                    x[:] = vals[p]
                return x
            x[:, p] = vals[0][:, p]
            return x

        with gi.intervene(model, {(layer, name): restore}):
            if split:
                with state_at(model, list(range(T - 1)), [layer]):
                    last = model(bad, use_cache=False).logits[0, -1]
            else:
                last = model(bad, use_cache=False).logits[0, -1]
        d = lambda x: float(x[answers[0]] - x[answers[1]])  # noqa: E731
        d_clean = d(model(clean, use_cache=False).logits[0, -1])
        d_bad = d(model(bad, use_cache=False).logits[0, -1])
    return (d(last) - d_bad) / (d_clean - d_bad)


@pytest.mark.parametrize("name", ["qwen3_5", "olmo_hybrid"])
def test_batched_sweep_matches_one_forward_per_cell(pair, name):
    model, _ = pair(name)
    clean = ids_for(10, B=1, seed=3)
    bad = clean.clone()
    bad[0, 2] = (bad[0, 2] + 7) % 90 + 3
    with torch.no_grad():
        answers = (int(model(clean).logits[0, -1].argmax()), int(model(bad).logits[0, -1].argmax()))
    if answers[0] == answers[1]:
        answers = (answers[0], (answers[0] + 1) % 96)
    result = causal_trace(model, clean, bad, sites=("beta", "recurrence", "state", "out_proj"), answers=answers, batch_size=7)
    layers = list(gi.gdn_layers(model))
    assert result.layers == tuple(layers)
    for site_name in result.sites:
        score = result.scores[site_name]
        for L in layers:
            for p in (0, 2, 5, 9):
                if site_name == "state" and p == 9:
                    assert torch.isnan(score[layers.index(L), p])
                    continue
                ref = _one_cell(model, clean, bad, L, site_name, p, answers)
                # batched rows vs a batch of one: BLAS may block differently, so not bitwise
                assert score[layers.index(L), p].item() == pytest.approx(ref, abs=1e-4), (site_name, L, p)
    # positions before the corruption cannot restore anything; restoring the last layer output
    # at the last position restores everything
    assert torch.all(result.scores["recurrence"][:, :2].abs() < 1e-4)


def test_bad_input(pair):
    model, _ = pair("qwen3_5")
    with pytest.raises(ValueError, match="equal token length.*clean \\[1, 5\\] and corrupted \\[1, 6\\]"):
        causal_trace(model, ids_for(5, B=1), ids_for(6, B=1))
    with pytest.raises(ValueError, match="unknown site 'bta'; sites are"):
        causal_trace(model, ids_for(5, B=1), ids_for(5, B=1, seed=1), sites=("bta",))
