"""Figures: causal traces and effective attention (matplotlib, imported when a function is called).

    fig = plot.trace_figure(result, answer_labels=("v12", "v4"), path="trace.png")   # all sites
    fig = plot.trace_heatmap(result, "state", path="trace_state.png")                # one site
    fig = plot.effective_attention_heatmap(att[0], head=1, tokens=labels, path="m.png")
    fig = plot.effective_attention_grid(att[0], heads=[0, 1], tokens=labels)          # shared scale
    fig = plot.attribution_heatmap(an.attribution_for(model, ids, direction=(a, b)), tokens=labels)

Tokens are data, never markup: every label built from token strings (tick labels, the answers
and `what` in titles) is shown literally -- a token such as "$x^2$" or "\\alpha" is not mathtext.

Figures are built with the object-oriented API (`matplotlib.figure.Figure`), not pyplot: no
global state or backend change, no figure leak in loops, and saving goes through the Agg canvas
whatever the session's backend. In a notebook, a returned Figure displays as usual.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "DPI",
    "SCORE_LABEL",
    "position_labels",
    "trace_heatmap",
    "trace_figure",
    "atp_scatter",
    "estimate_wording",
    "site_colour",
    "effective_attention_heatmap",
    "effective_attention_grid",
    "attribution_heatmap",
]

DPI = 160
#: What a causal-trace score is (title and colour-bar label of every trace figure).
SCORE_LABEL = "fraction of the clean-vs-corrupt logit difference restored"
_NA_COLOUR = "#bdbdbd"
_MARK = "#d62728"  # corrupted positions and the answers


def position_labels(tokens: Sequence[str]) -> list[str]:
    """``pos:token`` tick labels (a token may occur twice; its position tells them apart)."""
    return [f"{i}:{t}" for i, t in enumerate(tokens)]


def _literal(text) -> str:
    """`text` as matplotlib shows it literally: a `$` escaped as `\\$` never opens mathtext (the
    only markup in non-usetex text); matplotlib displays `\\$` as `$`."""
    return str(text).replace("$", r"\$")


def _save(fig, path) -> None:
    from matplotlib.backend_bases import FigureCanvasBase
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if type(fig.canvas) is FigureCanvasBase:  # a bare Figure: render with Agg; leave GUI canvases alone
        FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    fig.savefig(path, dpi=DPI)


def _answers(result, answer_labels) -> str:
    """The answers as text: the labels given, else their token ids (said so, never quoted as if
    they were tokens); pass `answer_labels=tokenizer.convert_ids_to_tokens(result.answers)`."""
    if answer_labels:
        return _literal(f"clean answer {answer_labels[0]!r} vs corrupted answer {answer_labels[1]!r}")
    return f"clean answer: token id {result.answers[0]} vs corrupted answer: token id {result.answers[1]}"


def estimate_wording(result) -> str:
    """How a trace result's scores were made, for titles and colour bars: "" for activation
    patching; for attribution patching its integration (first order or K steps) and "estimate"."""
    if not getattr(result, "estimates", False):
        return ""
    steps = getattr(result, "steps", 1)
    how = "first-order" if steps == 1 else f"{steps}-step integrated-gradient"
    return f"{how} estimate of the "


#: The widest a figure grows to fit its title (inches); longer title lines wrap.
_MAX_TITLE_WIDTH = 18.0


def _fit_title(fig, text: str, fontsize: float) -> str:
    """Widen `fig` so that every line of its title fits (a title line is never cut at the
    figure's edges); lines wider than `_MAX_TITLE_WIDTH` wrap. Returns the text to draw."""
    import textwrap

    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import text_to_path

    prop = FontProperties(size=fontsize)
    width = lambda line: text_to_path.get_text_width_height_descent(line, prop, ismath=False)[0] / 72  # noqa: E731
    lines = []
    for line in text.split("\n"):
        if width(line) + 0.6 > _MAX_TITLE_WIDTH:
            chars = max(20, int(len(line) * (_MAX_TITLE_WIDTH - 0.6) / width(line)))
            lines += textwrap.wrap(line, chars)
        else:
            lines.append(line)
    need = max(width(line) for line in lines) + 0.6  # the layout's side margins
    if need > fig.get_figwidth():
        fig.set_figwidth(need)
    return "\n".join(lines)


def _trace_panel(ax, result, name, *, norm, cmap, show_x: bool, annotate: bool, corrupt_tokens=None):
    """One site's [L, T] scores into `ax`: NaN cells hatched grey, corrupted columns outlined;
    cells an attribution-patching result was verified on outlined in black, with the measured
    score under the estimate."""
    import numpy as np
    from matplotlib.patches import Rectangle

    score = result.scores[name].float().numpy()
    L, T = score.shape
    ax.add_patch(
        Rectangle((-0.5, -0.5), T, L, facecolor=_NA_COLOUR, hatch="///", edgecolor="white", linewidth=0, zorder=0)
    )
    im = ax.imshow(np.ma.masked_invalid(score), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest", zorder=1)
    for p in result.corrupted_positions:
        ax.add_patch(Rectangle((p - 0.5, -0.5), 1, L, fill=False, edgecolor=_MARK, linewidth=1.6, zorder=3))
    measured = {
        (result.layers.index(c.layer), c.position): v
        for c, v in getattr(result, "verified", {}).items()
        if c.site == name and c.layer in result.layers
    }
    for (i, p), m in measured.items():
        ax.add_patch(Rectangle((p - 0.45, i - 0.45), 0.9, 0.9, fill=False, edgecolor="black", linewidth=1.4, zorder=5))
        v = score[i, p]
        ax.text(p, i, f"{v:.2f}\n({m:.2f})", ha="center", va="center", fontsize=6, zorder=6,
                color="white" if abs(v) > 0.6 else "black")  # fmt: skip
    if annotate:
        for i in range(L):
            for p in range(T):
                v = score[i, p]
                if v == v and abs(v) >= 0.05 and (i, p) not in measured:
                    ax.text(
                        p,
                        i,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        zorder=4,
                        color="white" if abs(v) > 0.6 else "black",
                    )
    ax.set_yticks(range(L), [f"layer {l}" for l in result.layers], fontsize=8)
    ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9, fontweight="bold")
    ax.set_xticks(range(T))
    if show_x:
        labels = position_labels(result.tokens)
        for p, tok in (corrupt_tokens or {}).items():
            labels[p] += f"→{tok}"
        ax.set_xticklabels([_literal(x) for x in labels], rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
        for p in result.corrupted_positions:
            ax.get_xticklabels()[p].set_color(_MARK)
            ax.get_xticklabels()[p].set_fontweight("bold")
    else:
        ax.tick_params(labelbottom=False)
    return im


def _trace_figure(result, names, answer_labels, title, path, corrupt_tokens):
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    T, L = len(result.tokens), len(result.layers)
    width = max(7.0, 2.2 + 0.42 * T)
    height = max(3.6, 1.9 + len(names) * (0.28 * L + 0.22))
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    norm, cmap = Normalize(-1, 1), "RdBu_r"  # one scale for every panel: 0 white, restored red
    for i, (ax, name) in enumerate(zip(axes, names)):
        im = _trace_panel(
            ax,
            result,
            name,
            norm=norm,
            cmap=cmap,
            show_x=i == len(names) - 1,
            annotate=True,
            corrupt_tokens=corrupt_tokens,
        )
    what = estimate_wording(result)
    cb = fig.colorbar(im, ax=list(axes), fraction=0.025, pad=0.01, extend="both")
    cb.set_label(
        ("estimated " if what else "") + "fraction of the clean-vs-corrupt\nlogit difference restored", fontsize=8
    )
    axes[-1].set_xlabel("position:token of the clean prompt (red: corrupted, →the corrupted token)", fontsize=8)
    text = f"{title}\n{_answers(result, answer_labels)}; colour = {what}{SCORE_LABEL}"
    fig.suptitle(_fit_title(fig, text, 9), fontsize=9)
    handles = [
        Patch(facecolor=_NA_COLOUR, hatch="///", edgecolor="white", label="n/a (cannot reach the last logits)"),
        Patch(fill=False, edgecolor=_MARK, linewidth=1.6, label="corrupted position"),
    ]
    if getattr(result, "verified", None):
        handles.append(Patch(fill=False, edgecolor="black", linewidth=1.4,
                             label=f"checked by activation patching ({len(result.verified)} cells): estimate (measured)"))  # fmt: skip
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    if path is not None:
        _save(fig, path)
    return fig


def trace_heatmap(result, site: str, *, answer_labels: Sequence[str] | None = None, corrupt_tokens=None, path=None):
    """One site's causal-trace scores, GDN layers x positions (a `tracing.TraceResult`).

    Colour: the fraction of the clean-vs-corrupt logit difference restored (1 all, 0 none,
    shared scale -1..1); numbers in cells with |score| >= 0.05; NaN (not applicable) cells
    hatched grey; corrupted positions outlined and their tick labels red. answer_labels: the
    (clean, corrupted) answers as text; corrupt_tokens: {position: corrupted token} appended to
    those tick labels. Returns a Figure.
    """
    if site not in result.scores:
        raise ValueError(f"site {site!r} was not traced; traced sites: {', '.join(result.sites)}")
    title = f"restoring linear_attn.{site} of the clean run at one (layer, position) of the corrupted run"
    return _trace_figure(result, [site], answer_labels, title, path, corrupt_tokens)


def trace_figure(result, *, answer_labels: Sequence[str] | None = None, corrupt_tokens=None, path=None):
    """All traced sites of a `tracing.TraceResult`, one panel each, one shared colour scale
    (arguments as `trace_heatmap`)."""
    title = "causal trace: restore one GDN site of the clean run at (layer, position) in the corrupted run"
    if getattr(result, "estimates", False):
        title = f"attribution patching: {estimate_wording(result)}effect of restoring one GDN site at (layer, position)"
    return _trace_figure(result, list(result.scores), answer_labels, title, path, corrupt_tokens)


#: One colour per site, in the PNG and the HTML scatter alike: the trace sites first (tab10), then
#: the others (tab10's rest, then tab20's light shades); no two sites share one.
SITE_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
)


def site_colour(name: str) -> str:
    """The colour of site `name` (`SITE_COLOURS`: the trace sites in `TRACE_SITES` order, then the
    rest in registry order)."""
    from .sites import SITE_NAMES, TRACE_SITES

    order = list(TRACE_SITES) + [n for n in SITE_NAMES if n not in TRACE_SITES]
    return SITE_COLOURS[order.index(name)]


def atp_scatter(atp, trace, *, title: str = "", path=None):
    """Attribution patching (x) against activation patching (y), one point per cell both score
    (paired by site, layer and position) and one colour per site, each labelled with its Pearson
    r and Spearman rho (`tracing.agreement`); the diagonal y = x marks agreement. Returns a Figure."""
    from matplotlib.figure import Figure

    from .tracing.pairing import agreement, paired

    pairs, stats = paired(atp, trace), agreement(atp, trace)
    fig = Figure(figsize=(6.4, 5.2), layout="constrained")
    ax = fig.subplots()
    lo = hi = 0.0
    for name, (_, x, y) in pairs.items():
        x, y = x.numpy(), y.numpy()
        a = stats[name]
        ax.scatter(x, y, s=14, alpha=0.75, color=site_colour(name), edgecolors="none",
                   label=f"{name} (r {a.pearson:.2f}, ρ {a.spearman:.2f})")  # fmt: skip
        lo, hi = min(lo, x.min(), y.min()), max(hi, x.max(), y.max())
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot(
        [lo - pad, hi + pad],
        [lo - pad, hi + pad],
        color="0.6",
        linewidth=0.8,
        linestyle="--",
        label="agreement (y = x)",
    )
    ax.axhline(0, color="0.85", linewidth=0.6, zorder=0)
    ax.axvline(0, color="0.85", linewidth=0.6, zorder=0)
    ax.set_xlabel(f"attribution patching ({estimate_wording(atp).removesuffix(' of the ')})", fontsize=9)
    ax.set_ylabel("activation patching (causal trace)", fontsize=9)
    al = stats["all"]
    text = (_literal(title or "each cell: estimated vs measured fraction of the logit difference restored")
            + f"\nall {al.cells} cells: r {al.pearson:.2f}, ρ {al.spearman:.2f}, "
            f"top-10 recall in AtP's top 20: {al.recall:.0%}")  # fmt: skip
    ax.set_title(_fit_title(fig, text, 9), fontsize=9)
    ax.legend(fontsize=7, loc="best", frameon=False)
    if path is not None:
        _save(fig, path)
    return fig


# --------------------------------------------------------------------------- effective attention


def _matrix(M) -> torch.Tensor:
    """Accept a tensor, ops.EffectiveAttention or analysis.LayerAttention (anything with .matrix)."""
    return getattr(M, "matrix", M)


_CAPTION = (
    "o = M v: row t of M is how the layer's output o_t mixes the values v_s (exact, from the "
    "delta rule). Hatched grey: s > t, the future (masked)."
)


def _check(M, head, batch, tokens, rows):
    M = _matrix(M)
    if M.dim() != 4:
        raise ValueError(f"M must be [B, H, R, T]; got shape {list(M.shape)}")
    B, H, R, T = M.shape
    if not 0 <= batch < B:
        raise ValueError(f"batch must be in [0, {B}); got {batch}")
    if head is not None and not -H <= head < H:
        raise ValueError(f"head must be in [0, {H}) (M has {H} heads) or None for the mean; got {head}")
    if tokens is not None and len(tokens) != T:
        raise ValueError(f"tokens must have T={T} labels (M's key axis); got {len(tokens)}")
    if rows is not None and len(rows) != R:
        raise ValueError(f"rows must have R={R} entries (M's query axis); got {len(rows)}")
    return M


def _attention_panel(ax, data, *, row_pos, tokens, cmap, lim, title):
    """Draw one [R, T] matrix: the future (s > t) masked and hatched, a diverging scale centred at 0."""
    import numpy as np
    from matplotlib.patches import Rectangle

    R, T = data.shape
    future = np.arange(T)[None, :] > np.asarray(row_pos)[:, None]
    ax.add_patch(
        Rectangle((-0.5, -0.5), T, R, facecolor=_NA_COLOUR, hatch="///", edgecolor="white", linewidth=0, zorder=0)
    )
    im = ax.imshow(
        np.ma.masked_array(data, mask=future),
        cmap=cmap,
        vmin=-lim,
        vmax=lim,
        interpolation="nearest",
        aspect="auto",
        zorder=1,
    )
    if T <= 64 and tokens is not None:
        ax.set_xticks(
            range(T), [_literal(t) for t in tokens], rotation=60, ha="right", rotation_mode="anchor", fontsize=7
        )
    if R <= 64 and tokens is not None:
        ax.set_yticks(range(R), [_literal(tokens[p]) for p in row_pos], fontsize=7)
    elif R <= 64:
        ax.set_yticks(range(R), [str(p) for p in row_pos], fontsize=7)
    ax.set_xlabel("key position s (value v_s)", fontsize=8)
    ax.set_ylabel("query position t (output o_t)", fontsize=8)
    ax.set_title(title, fontsize=9)
    return im


def effective_attention_heatmap(
    M,
    *,
    head: int | None = None,
    batch: int = 0,
    tokens: Sequence[str] | None = None,
    rows: Sequence[int] | None = None,
    ax=None,
    title: str | None = None,
    cmap: str = "RdBu_r",
    vmax: float | None = None,
    path: str | None = None,
):
    """Heatmap of the effective attention M of one head, or the mean over heads.

    Args:
        M: [B, H, R, T] tensor (or an object with `.matrix`, e.g. a LayerAttention); rows are
            queries, columns keys: o_t = sum_s M[t, s] v_s (+ the initial-state term).
        head: index into M's head axis; None plots the mean over heads.
        batch: which batch row.
        tokens: T labels for the key axis (and the query axis when all rows are shown).
        rows: the query positions M's R rows stand for (when M was computed with rows=[...]);
            used for the query-axis labels and the masked (future) cells.
        ax: draw into this Axes (its figure is returned); default a new Figure.
        cmap: a diverging map, centred at 0 (delta-rule weights can be negative).
        vmax: colour limit (-vmax..vmax); default the largest |M| shown. Pass one value to
            compare several figures on one scale.
        path: also save the figure there (Agg canvas, DPI).

    The future cells (key s > query t, zero by causality) are hatched grey, not coloured as 0;
    a new figure carries the caption "o = M v ...".

    Returns:
        matplotlib.figure.Figure.
    """
    from matplotlib.figure import Figure

    M = _check(M, head, batch, tokens, rows)
    B, H, R, T = M.shape
    data = (M[batch].mean(0) if head is None else M[batch, head]).detach().float().cpu().numpy()
    row_pos = list(range(R)) if rows is None else list(rows)
    new = ax is None
    if new:
        fig = Figure(figsize=(2.6 + 0.3 * min(T, 48), 2.2 + 0.3 * min(R, 48)), layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure
    lim = float(vmax) if vmax else (float(abs(data).max()) or 1.0)
    im = _attention_panel(
        ax,
        data,
        row_pos=row_pos,
        tokens=tokens,
        cmap=cmap,
        lim=lim,
        title=title or ("mean over heads" if head is None else f"head {head}"),
    )
    fig.colorbar(im, ax=ax, shrink=0.8).set_label("M[t, s] (0 = white)", fontsize=8)
    if new:
        fig.text(0.5, 0.0, _CAPTION, ha="center", va="bottom", fontsize=7, wrap=True)
        fig.get_layout_engine().set(rect=(0, 0.05, 1, 0.95))
    if path is not None:
        _save(fig, path)
    return fig


def effective_attention_grid(
    M,
    *,
    heads: Sequence[int] | None = None,
    head_labels: Sequence | None = None,
    batch: int = 0,
    tokens: Sequence[str] | None = None,
    rows: Sequence[int] | None = None,
    title: str | None = None,
    cmap: str = "RdBu_r",
    path: str | None = None,
):
    """Several heads of one layer side by side on ONE colour scale (so panels compare).

    heads: indices into M's head axis (default all); head_labels: their names in the panel
    titles (default the indices, e.g. the model's head numbers when M holds selected heads).
    Returns a Figure with one panel per head, one colour bar and the "o = M v" caption.
    """
    from matplotlib.figure import Figure

    M = _check(M, None, batch, tokens, rows)
    B, H, R, T = M.shape
    heads = list(range(H)) if heads is None else list(heads)
    for h in heads:
        _check(M, h, batch, tokens, rows)
    labels = list(head_labels) if head_labels is not None else heads
    data = M[batch, heads].detach().float().cpu().numpy()  # [H', R, T]
    lim = float(abs(data).max()) or 1.0
    row_pos = list(range(R)) if rows is None else list(rows)
    side = 1.6 + 0.28 * min(T, 48)
    fig = Figure(figsize=(0.8 + side * len(heads), 2.4 + 0.28 * min(R, 48)), layout="constrained")
    axes = fig.subplots(1, len(heads), squeeze=False, sharey=True)[0]
    for ax, d, lab in zip(axes, data, labels):
        im = _attention_panel(ax, d, row_pos=row_pos, tokens=tokens, cmap=cmap, lim=lim, title=_literal(f"head {lab}"))
    for ax in axes[1:]:
        ax.set_ylabel("")
    fig.colorbar(im, ax=list(axes), shrink=0.8).set_label("M[t, s], one scale for all heads", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.0, _CAPTION, ha="center", va="bottom", fontsize=7, wrap=True)
    fig.get_layout_engine().set(rect=(0, 0.05, 1, 0.95))
    if path is not None:
        _save(fig, path)
    return fig


# --------------------------------------------------------------------------- attribution


def attribution_heatmap(
    att,
    *,
    tokens: Sequence[str] | None = None,
    row: int = 0,
    batch: int = 0,
    what: str = "the projected output",
    path=None,
):
    """Contributions of an `analysis.Attribution`: one panel per GDN layer, heads x source
    positions, for query row `row` (position att.positions[row]); one diverging scale centred at 0
    for all panels. Each panel's title gives the layer's total (its direct effect on `what`).
    Returns a Figure."""
    from matplotlib.figure import Figure

    C = att.contributions[batch, :, :, row].detach().float().cpu().numpy()  # [L, H, T]
    L, H, T = C.shape
    if tokens is not None and len(tokens) != T:
        raise ValueError(f"tokens must have T={T} labels; got {len(tokens)}")
    t = att.positions[row]
    labels = position_labels(tokens) if tokens is not None else [str(p) for p in range(T)]
    lim = float(abs(C).max()) or 1.0
    fig = Figure(figsize=(max(7.0, 2.4 + 0.42 * T), 1.6 + L * (0.35 * H + 0.6)), layout="constrained")
    axes = fig.subplots(L, 1, squeeze=False, sharex=True)[:, 0]
    for i, ax in enumerate(axes):
        im = ax.imshow(C[i], cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(H), [f"head {h}" for h in att.heads], fontsize=8)
        ax.set_title(f"GDN layer {att.layers[i]}: total {float(att.value[batch, i, row]):.3f}", fontsize=9, loc="left")
        ax.set_xticks(range(T))
        ax.tick_params(labelbottom=i == L - 1)
        ax.axvspan(
            t + 0.5, T - 0.5, facecolor=_NA_COLOUR, hatch="///", edgecolor="white", linewidth=0
        ) if t < T - 1 else None
    axes[-1].set_xticklabels([_literal(x) for x in labels], rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    axes[-1].set_xlabel("source position s (value v_s; v_s mixes tokens s-3..s through the conv)", fontsize=8)
    fig.colorbar(im, ax=list(axes), fraction=0.025, pad=0.01).set_label("contribution (logits, one scale)", fontsize=8)
    fig.suptitle(
        _literal(f"attribution of {what} at position {labels[t]} to source positions, per GDN layer and head")
        + "\n(exact: M[t, s] times the projected value; the gated norm's scale frozen)",
        fontsize=9,
    )
    if path is not None:
        _save(fig, path)
    return fig
