"""Tokens are data, never markup: every PNG figure shows token strings literally, whatever mathtext
they look like ("$$", "$x^2$", "\\alpha"), and draws without a mathtext ParseException."""

import pytest
import torch

from gdn_intervene import plot
from gdn_intervene.analysis import Attribution
from gdn_intervene.tracing import TraceResult

pytest.importorskip("matplotlib")

TOKENS = ["$$", "a$b", "$x^2$", "\\alpha", "<s>", "x_1", "a\\$b", "$"]
T = len(TOKENS)
LABELS = plot.position_labels(TOKENS)


def _shown(text) -> tuple[str, bool]:
    """(what matplotlib draws for `text`, whether as mathtext) -- Text._preprocess_math decides it."""
    return text._preprocess_math(text.get_text())


def _check_ticks(fig, ticks, expected, path):
    fig.canvas.draw()  # lays out and renders every text: mathtext would raise here
    assert [_shown(t) for t in ticks] == [(e, False) for e in expected]
    assert [t.get_text() for t in ticks] == [e.replace("$", "\\$") for e in expected]  # escaped, displayed as `$`
    assert path.stat().st_size > 0


def _trace():
    score = torch.zeros(2, T)
    score[0, 3:6] = 0.5
    state = score.clone()
    state[:, -1] = float("nan")
    return TraceResult(
        ("k", "state"), (0, 1), TOKENS, (27, 19), 4.5, -4.6, {"k": score, "state": state}, corrupted_positions=(2,)
    )


def test_trace_figures_show_tokens_literally(tmp_path):
    fig = plot.trace_figure(
        _trace(), answer_labels=("$$", "\\alpha"), corrupt_tokens={2: "$y$"}, path=tmp_path / "t.png"
    )
    expected = LABELS[:2] + [LABELS[2] + "→$y$"] + LABELS[3:]
    _check_ticks(fig, fig.axes[1].get_xticklabels(), expected, tmp_path / "t.png")
    assert _shown(fig._suptitle)[0].endswith(
        "clean answer '$$' vs corrupted answer '\\\\alpha'; colour = " + plot.SCORE_LABEL
    )
    fig = plot.trace_heatmap(_trace(), "state", path=tmp_path / "s.png")
    _check_ticks(fig, fig.axes[0].get_xticklabels(), LABELS, tmp_path / "s.png")


def test_effective_attention_figures_show_tokens_literally(tmp_path):
    M = torch.randn(1, 2, T, T).tril()
    fig = plot.effective_attention_heatmap(M, head=0, tokens=TOKENS, path=tmp_path / "m.png")
    _check_ticks(fig, fig.axes[0].get_xticklabels() + fig.axes[0].get_yticklabels(), TOKENS * 2, tmp_path / "m.png")
    fig = plot.effective_attention_grid(M, tokens=TOKENS, head_labels=["$1", "$2"], path=tmp_path / "g.png")
    _check_ticks(fig, fig.axes[1].get_xticklabels(), TOKENS, tmp_path / "g.png")
    assert [_shown(a.title)[0] for a in fig.axes[:2]] == ["head $1", "head $2"]


def test_attribution_heatmap_shows_tokens_literally(tmp_path):
    C = torch.zeros(1, 2, 2, 1, T)
    C[0, 0, 0, 0, 2] = 0.75
    z = torch.zeros
    att = Attribution(C, z(1, 2, 2, 1), z(1, 2, 1), C.sum((2, 4)), z(1, 1, 4), (0, 1), (0, 1), (T - 1,))
    fig = plot.attribution_heatmap(att, tokens=TOKENS, what="logit($$) - logit(x_1)", path=tmp_path / "a.png")
    _check_ticks(fig, fig.axes[1].get_xticklabels(), LABELS, tmp_path / "a.png")
    assert _shown(fig._suptitle)[0].startswith(f"attribution of logit($$) - logit(x_1) at position {LABELS[-1]} ")
    assert "logits" in fig.axes[-1].get_ylabel()  # the colour bar's unit


def test_every_site_has_its_own_colour():
    """The scatter tells sites apart by colour alone: 16 sites, 16 colours (k and out_proj once
    shared one, the registry index modulo a 10-colour palette)."""
    from gdn_intervene import plot
    from gdn_intervene.sites import SITE_NAMES

    colours = [plot.site_colour(n) for n in SITE_NAMES]
    assert len(set(colours)) == len(SITE_NAMES)
