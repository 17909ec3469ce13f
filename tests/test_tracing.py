"""Batched causal tracing equals one forward per cell, computed independently with hooks; the
trace figures say what the score means, mark what was corrupted and keep NaN cells apart."""

import pytest
import torch
from conftest import ids_for, trace_pair
from models import ANY_GDN, present

import gdn_intervene as gi
from gdn_intervene import plot
from gdn_intervene.tracing import Cell, TraceResult, causal_trace

state_at = gi.state_at


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


@pytest.mark.parametrize("name", present("qwen3_5", "olmo_hybrid") or [ANY_GDN])
def test_batched_sweep_matches_one_forward_per_cell(pair, name):
    model, _ = pair(name)
    clean, bad, answers = trace_pair(model, 10, seed=3)
    result = causal_trace(
        model, clean, bad, sites=("beta", "recurrence", "state", "out_proj"), answers=answers, batch_size=7
    )
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
    model, _ = pair(ANY_GDN)
    with pytest.raises(ValueError, match="equal token length.*clean \\[1, 5\\] and corrupted \\[1, 6\\]"):
        causal_trace(model, ids_for(5, B=1), ids_for(6, B=1))
    with pytest.raises(ValueError, match="unknown site 'bta'; sites are"):
        causal_trace(model, ids_for(5, B=1), ids_for(5, B=1, seed=1), sites=("bta",))
    with pytest.raises(
        ValueError, match=r"tokens must label the pair's 5 tokens \(or all T = 5 positions\); got 4 labels"
    ):
        causal_trace(model, ids_for(5, B=1), ids_for(5, B=1, seed=1), tokens=list("abcd"))
    V = model.get_output_embeddings().weight.shape[0]
    for answers, message in (
        ((5, V), rf"the corrupt answer {V} is not a token id in \[0, {V}\)"),
        ((-1, 7), r"the clean answer -1 is not a token id"),
        ((5.0, 7), "the clean answer must be one token id"),
        ((5,), r"answers must be \(clean answer, corrupt answer\)"),
    ):
        with pytest.raises(ValueError, match=message):
            causal_trace(model, ids_for(5, B=1), ids_for(5, B=1, seed=1), answers=answers)


def test_cells_are_named():
    c = Cell("state", 0, 7)
    assert (c.site, c.layer, c.position) == ("state", 0, 7) and c == ("state", 0, 7)


# ---------------------------------------------------------------- figures


def _result(T=19):
    """A synthetic trace (no model): two sites, two layers, the final state NaN."""
    score = torch.zeros(2, T)
    score[0, 7:12] = 1.0
    score[1, 9] = 0.55
    state = score.clone()
    state[:, -1] = float("nan")
    tokens = ["<bos>"] + [f"k{i % 5}" for i in range(T - 1)]  # repeated tokens: positions tell them apart
    return TraceResult(
        ("k", "state"), (0, 1), tokens, (27, 19), 4.5, -4.6, {"k": score, "state": state}, corrupted_positions=(5,)
    )


def _texts(fig):
    return [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]


def test_trace_figure_reads_at_a_glance(tmp_path):
    from PIL import Image

    r = _result()
    fig = plot.trace_figure(r, answer_labels=("v12", "v4"), corrupt_tokens={5: "k9"}, path=tmp_path / "t.png")
    texts = " ".join(_texts(fig))
    assert plot.SCORE_LABEL in fig._suptitle.get_text()  # the score's meaning in the title
    assert "'v12'" in fig._suptitle.get_text() and "'v4'" in fig._suptitle.get_text()  # both answers
    cbar = fig.axes[-1]
    assert "logit difference restored" in cbar.get_ylabel()
    heat = fig.axes[:2]
    labels = [t.get_text() for t in heat[-1].get_xticklabels()]
    assert labels[:3] == ["0:<bos>", "1:k0", "2:k1"] and labels[5] == "5:k4→k9"
    assert heat[-1].get_xticklabels()[5].get_color() == plot._MARK  # corrupted position in red
    assert "n/a (cannot reach the last logits)" in texts and "corrupted position" in texts  # legend
    assert "0.55" in texts  # values printed in the cells
    # NaN cells are masked (the hatched background shows through), not drawn as 0
    assert heat[1].images[0].get_array().mask[:, -1].all()
    assert any(p.get_hatch() for p in heat[1].patches)
    # both panels share one colour scale
    assert {(a.images[0].norm.vmin, a.images[0].norm.vmax) for a in heat} == {(-1.0, 1.0)}
    img = Image.open(tmp_path / "t.png")
    assert min(img.info["dpi"]) >= 150 and img.size[0] >= 1200
    # tick labels do not overlap once drawn
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in heat[-1].get_xticklabels()]
    assert not any(a.overlaps(b) and a.x1 - b.x0 > 2 for a, b in zip(boxes, boxes[1:]))


def test_trace_heatmap_one_site(tmp_path):
    fig = plot.trace_heatmap(_result(), "state", path=tmp_path / "s.png")
    assert "linear_attn.state" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="site 'v' was not traced; traced sites: k, state"):
        plot.trace_heatmap(_result(), "v")


def test_effective_attention_figures_mask_the_future(tmp_path):
    M = torch.randn(1, 2, 6, 6).tril()
    fig = plot.effective_attention_heatmap(M, head=0, tokens=list("abcdef"), path=tmp_path / "m.png")
    im = fig.axes[0].images[0]
    assert im.get_array().mask[0, 1:].all() and not im.get_array().mask[5].any()  # s > t masked
    assert im.norm.vmin == -im.norm.vmax  # diverging, centred at 0
    assert any("o = M v" in t for t in _texts(fig))
    grid = plot.effective_attention_grid(M, tokens=list("abcdef"), head_labels=[3, 5], path=tmp_path / "g.png")
    ims = [a.images[0] for a in grid.axes if a.images]
    assert len(ims) == 2 and len({(i.norm.vmin, i.norm.vmax) for i in ims}) == 1  # one shared scale
    assert [a.get_title() for a in grid.axes[:2]] == ["head 3", "head 5"]
