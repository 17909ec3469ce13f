"""Interactive HTML report: one self-contained, offline file (plotly, its JavaScript embedded).

    from gdn_intervene import report
    report.write_html("report.html", trace=result, trace_answers=("v12", "v4"),
                      attention={0: att0, 1: att1}, tokens=labels)

- causal trace: one heatmap, rows (site, GDN layer), columns positions; hovering a cell shows
  site, layer, position, token and score (the fraction of the clean-vs-corrupt logit difference
  restored); not-applicable cells are gaps.
- attribution patching: the same heatmap of estimates, its verified cells outlined (hover and a
  table give estimate and measurement), and against a causal trace a scatter of both (y = x
  drawn, one colour per site as in the PNG).
- effective attention: one heatmap per (layer, head), picked with a drop-down; hover shows the
  query and key positions and tokens and M[t, s]; the future (s > t) is a grey gap.
- attribution: per (layer, head), a bar per source position (drop-down, hover as above).

plotly is an optional dependency (`pip install "gdn_intervene[all]"`); it is imported when a
function here is called. The page's interactivity is plotly's own (hover, drop-down menus).

Tokens are data, never markup: plotly reads a subset of HTML in labels (and $...$ as TeX where
MathJax is loaded), so every token is escaped and shows literally -- "<s>", "x<br>y", "a&amp;b".
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path

# one wording of what a trace score is and of how an estimate was made; one colour per site
from .plot import SCORE_LABEL, estimate_wording, site_colour

__all__ = ["trace_figure", "atp_scatter_figure", "attention_figure", "attribution_figure", "write_html"]

_GAP = "#d0d0d0"  # background: NaN / masked cells show through as grey
_MARK = "#d62728"  # corrupted positions (as in plot.py)


def _text(s) -> str:
    """`s` as plotly label text that shows literally: `&`, `<`, `>` as entities (plotly parses
    tags such as <b>, <br>, <s>) and `$` as `&#36;` (no TeX), all decoded by plotly for display."""
    return html.escape(str(s), quote=False).replace("$", "&#36;")


def _labels(tokens) -> list[str]:
    """``pos:token`` axis labels, escaped."""
    return [_text(f"{p}:{t}") for p, t in enumerate(tokens)]


def _plotly():
    try:
        import plotly.graph_objects as go
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            'the HTML report needs plotly: pip install "gdn_intervene[all]" (or pip install plotly)'
        ) from e
    return go


def _answer_text(result, answer_labels) -> str:
    if answer_labels:
        return f"clean answer {_text(answer_labels[0])} vs corrupted answer {_text(answer_labels[1])}"
    return f"clean answer: token id {result.answers[0]} vs corrupted answer: token id {result.answers[1]}"


def trace_figure(result, *, answer_labels: Sequence[str] | None = None):
    """A plotly Figure of a `tracing.TraceResult`: rows (site, layer), columns positions. For an
    attribution-patching result the scores are named estimates, and the cells it was verified on
    (`result.verified`) are outlined in black, their hover giving the measured score too."""
    go = _plotly()
    estimates = getattr(result, "estimates", False)
    measured = {(c.site, c.layer, c.position): v for c, v in getattr(result, "verified", {}).items()}
    z, custom, ylabels = _trace_grid(result, measured)
    xlabels = _labels(result.tokens)
    # the corrupted positions' tick labels in red and bold, as in the PNG trace figure
    ticks = [
        f'<span style="color:{_MARK}"><b>{x}</b></span>' if p in result.corrupted_positions else x
        for p, x in enumerate(xlabels)
    ]
    heat = go.Heatmap(
        z=z,
        x=xlabels,
        y=ylabels,
        customdata=custom,
        zmin=-1,
        zmax=1,
        zmid=0,
        colorscale="RdBu",
        reversescale=True,
        xgap=1,
        ygap=1,
        hoverongaps=False,
        colorbar=dict(title=dict(text="estimated<br>restored<br>fraction" if estimates else "restored<br>fraction",
                                 side="right")),
        hovertemplate="site %{customdata[0]}, layer %{customdata[1]}<br>position %{x} (token %{customdata[2]})"
        + ("<br>estimate %{customdata[3]}%{customdata[4]}" if estimates else "<br>score %{customdata[3]}")
        + "<extra></extra>",
    )  # fmt: skip
    fig = go.Figure(heat)
    what = f"Attribution patching, {estimate_wording(result)}" if estimates else "Causal trace: "
    fig.update_layout(
        title=dict(
            text=f"{what}{html.escape(SCORE_LABEL)}<br><sup>{_answer_text(result, answer_labels)}; corrupted "
            f"positions {', '.join(map(str, result.corrupted_positions)) or 'none'}</sup>"
        ),
        plot_bgcolor=_GAP,
        height=220 + 26 * len(ylabels),
        margin=dict(l=140, r=40, t=90, b=90),
        yaxis=dict(autorange="reversed", tickfont=dict(size=11)),
        xaxis=dict(
            tickangle=-60,
            tickfont=dict(size=11),
            automargin=True,
            tickvals=xlabels,
            ticktext=ticks,
            title=dict(
                text=f'position:token of the clean prompt (<span style="color:{_MARK}">red</span>: corrupted)',
                font=dict(size=12),
            ),
        ),
    )
    _outline(fig, result, measured, len(ylabels))
    return fig


def _trace_grid(result, measured: dict) -> tuple[list, list, list]:
    """(z [rows][T], hover data [rows][T], row labels) of a trace, one row per (site, layer)."""
    z, custom, ylabels = [], [], []
    for name in result.sites:
        for i, layer in enumerate(result.layers):
            row = [None if v != v else round(float(v), 4) for v in result.scores[name][i].tolist()]
            z.append(row)
            custom.append(
                [[name, layer, _text(result.tokens[p]), "n/a" if row[p] is None else f"{row[p]:.3f}",
                  f"<br>measured by activation patching {measured[name, layer, p]:.3f}"
                  if (name, layer, p) in measured else ""] for p in range(len(result.tokens))]
            )  # fmt: skip
            ylabels.append(f"{name} · layer {layer}")
    return z, custom, ylabels


def _outline(fig, result, measured: dict, rows: int) -> None:
    """Outline the corrupted columns (red) and the verified cells (black)."""
    for p in result.corrupted_positions:
        fig.add_shape(type="rect", x0=p - 0.5, x1=p + 0.5, y0=-0.5, y1=rows - 0.5, xref="x", yref="y",
                      line=dict(color=_MARK, width=2))  # fmt: skip
    for name, layer, p in measured:
        if name in result.sites and layer in result.layers:
            y = result.sites.index(name) * len(result.layers) + result.layers.index(layer)
            fig.add_shape(type="rect", x0=p - 0.45, x1=p + 0.45, y0=y - 0.45, y1=y + 0.45, xref="x", yref="y",
                          line=dict(color="black", width=2))  # fmt: skip


def _verified_table(result) -> str:
    """An HTML table of the cells an attribution-patching result was verified on."""
    if not getattr(result, "verified", None):
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(c.site)}</td><td>{c.layer}</td><td>{c.position}:{html.escape(str(result.tokens[c.position]))}"
        f"</td><td>{result.score(c):.3f}</td><td>{v:.3f}</td></tr>"
        for c, v in result.verified.items()
    )
    return (
        f'<table class="verified"><caption>Checked by activation patching: the {len(result.verified)} cells of '
        "largest |estimate|</caption><tr><th>site</th><th>layer</th><th>position:token</th><th>estimate</th>"
        f"<th>measured</th></tr>{rows}</table>"
    )


def atp_scatter_figure(atp, trace):
    """A plotly scatter: attribution patching (x) against activation patching (y), one point per
    cell both score (paired by site, layer and position), one colour per site as in the PNG
    (legend: Pearson r, Spearman rho), the diagonal y = x, hover naming the cell."""
    from .tracing.pairing import agreement, paired

    go = _plotly()
    pairs, stats = paired(atp, trace), agreement(atp, trace)
    fig = go.Figure()
    lo = hi = 0.0
    for name, (cells, x, y) in pairs.items():
        a = stats[name]
        lo, hi = min(lo, float(x.min()), float(y.min())), max(hi, float(x.max()), float(y.max()))
        fig.add_trace(go.Scatter(
            x=x.tolist(), y=y.tolist(), mode="markers", name=f"{name} (r {a.pearson:.2f}, ρ {a.spearman:.2f})",
            marker=dict(color=site_colour(name)),
            customdata=[[c.layer, _text(f"{c.position}:{atp.tokens[c.position]}")] for c in cells],
            hovertemplate=f"{name}, layer %{{customdata[0]}}, %{{customdata[1]}}<br>estimate %{{x:.3f}}, "
                          "measured %{y:.3f}<extra></extra>"))  # fmt: skip
    pad = 0.05 * (hi - lo or 1.0)
    fig.add_trace(go.Scatter(x=[lo - pad, hi + pad], y=[lo - pad, hi + pad], mode="lines", name="agreement (y = x)",
                             line=dict(color="#999999", dash="dash", width=1), hoverinfo="skip"))  # fmt: skip
    al = stats["all"]
    fig.update_layout(
        title=dict(text=f"Estimated vs measured, every cell<br><sup>all {al.cells} cells: r {al.pearson:.2f}, "
                        f"ρ {al.spearman:.2f}; top-10 recall in AtP's top 20: {al.recall:.0%}</sup>"),
        xaxis=dict(title=f"attribution patching ({estimate_wording(atp).removesuffix(' of the ')})", zeroline=True),
        yaxis=dict(title="activation patching (causal trace)", zeroline=True),
        height=520, width=760, margin=dict(l=80, r=40, t=90, b=70),
    )  # fmt: skip
    return fig


def _views(matrices: Mapping):
    """[(label, [R, T] numpy)] per (layer, head) of {layer: [H, R, T] tensor or (tensor, head labels)}."""
    views = []
    for layer, m in matrices.items():
        m, heads = m if isinstance(m, tuple) else (m, None)
        m = m.detach().float().cpu()
        heads = list(range(m.shape[0])) if heads is None else list(heads)
        for h, lab in enumerate(heads):
            views.append((f"layer {layer}, head {lab}", m[h].numpy()))
    return views


def _heatmap_menu(views, tokens, *, title, hover, row_pos=None, colorbar="M[t, s]"):
    go = _plotly()
    import numpy as np

    T = len(tokens)
    xlabels = _labels(tokens)
    fig = go.Figure()
    # one colour scale for every view, so switching heads compares like with like
    lim = max([float(np.abs(d).max()) for _, d in views] + [1e-12])
    for i, (label, data) in enumerate(views):
        R = data.shape[0]
        rows = list(range(R)) if row_pos is None else list(row_pos)
        masked = np.where(np.arange(T)[None, :] > np.asarray(rows)[:, None], np.nan, data)
        custom = [[[_text(tokens[t]), _text(tokens[s])] for s in range(T)] for t in rows]
        fig.add_trace(
            go.Heatmap(
                z=masked,
                x=xlabels,
                y=[xlabels[t] for t in rows],
                customdata=custom,
                name=label,
                zmid=0,
                zmin=-lim,
                zmax=lim,
                colorscale="RdBu",
                reversescale=True,
                hoverongaps=False,
                visible=i == 0,
                colorbar=dict(title=dict(text=colorbar, side="right")),
                hovertemplate=hover,
            )
        )
    buttons = [
        dict(
            label=label,
            method="update",
            args=[{"visible": [j == i for j in range(len(views))]}, {"title.text": f"{title}: {label}"}],
        )
        for i, (label, _) in enumerate(views)
    ]
    fig.update_layout(
        title=dict(text=f"{title}: {views[0][0]}" if views else title, x=0.01, xanchor="left"),
        plot_bgcolor=_GAP,
        updatemenus=[
            dict(buttons=buttons, direction="down", x=1.0, xanchor="right", y=1.02, yanchor="bottom", showactive=True)
        ]
        if len(views) > 1
        else [],
        height=260 + 22 * (len(views[0][1]) if views else 1),
        width=max(520, 200 + 26 * T),
        margin=dict(l=90, r=40, t=110, b=90),
        yaxis=dict(autorange="reversed", title="query t (output o_t)"),
        xaxis=dict(tickangle=-60, title="key s (value v_s)"),
    )
    return fig


def attention_figure(attention: Mapping, tokens: Sequence[str], *, rows: Sequence[int] | None = None):
    """Effective attention, one heatmap per (layer, head) with a drop-down head picker.

    attention: {layer: M [H, R, T]} (one batch row), or {layer: (M, head labels)}, or
    {layer: LayerAttention} (batch row 0 is used).
    """
    mats = {}
    for layer, a in attention.items():
        m = getattr(a, "matrix", a)
        if not isinstance(m, tuple) and m.dim() == 4:
            m = m[0]
        mats[layer] = m
    hover = (
        "query t = %{y} (token %{customdata[0]})<br>key s = %{x} (token %{customdata[1]})"
        "<br>M[t, s] = %{z:.4f}<extra></extra>"
    )
    return _heatmap_menu(_views(mats), list(tokens), title="Effective attention (o = M v)", hover=hover, row_pos=rows)


def attribution_figure(att, tokens: Sequence[str], *, row: int = 0, what: str = "the projected output"):
    """An `analysis.Attribution` for query row `row`: one bar chart of source-position
    contributions per (layer, head), picked in a drop-down; hover shows position, token, value."""
    go = _plotly()
    C = att.contributions[0, :, :, row].detach().float().cpu()  # [L, H, T]
    t = att.positions[row]
    xlabels = _labels(tokens)
    fig = go.Figure()
    lim = float(C.abs().max()) or 1.0
    names = []
    for i, layer in enumerate(att.layers):
        for j, head in enumerate(att.heads):
            names.append(f"layer {layer}, head {head}")
            fig.add_trace(
                go.Bar(
                    x=xlabels,
                    y=C[i, j].tolist(),
                    name=names[-1],
                    visible=not fig.data,
                    customdata=[_text(x) for x in tokens],
                    marker_color=["#b2182b" if v >= 0 else "#2166ac" for v in C[i, j].tolist()],
                    hovertemplate="source %{x} (token %{customdata})<br>contribution %{y:.4f}<extra>%{fullData.name}</extra>",
                )
            )
    n = len(names)
    title = f"Attribution of {_text(what)} at position {xlabels[t]}"
    buttons = [
        dict(
            label=nm, method="update", args=[{"visible": [k == i for k in range(n)]}, {"title.text": f"{title}: {nm}"}]
        )
        for i, nm in enumerate(names)
    ]
    fig.update_layout(
        title=dict(text=f"{title}: {names[0]}", x=0.01, xanchor="left"),
        showlegend=False,
        updatemenus=[dict(buttons=buttons, direction="down", x=1.0, xanchor="right", y=1.02, yanchor="bottom")]
        if n > 1
        else [],
        yaxis=dict(
            range=[-1.05 * lim, 1.05 * lim], automargin=True, title="contribution (logits)<br>one scale for all heads"
        ),
        xaxis=dict(tickangle=-60, title="source position s", automargin=True),
        height=480,
        margin=dict(l=100, t=110, b=100),
    )
    return fig


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px}} p.note{{color:#444;max-width:60em}}
table.verified{{border-collapse:collapse;margin:0.5em 0 2em}} table.verified td,table.verified th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}
table.verified caption{{text-align:left;color:#444;padding-bottom:4px}}</style>
</head><body><h1>{title}</h1>
{sections}
</body></html>
"""


def _atp_note(result) -> str:
    steps = getattr(result, "steps", 1)
    how = (
        "each cell's first-order estimate, (clean - corrupted value) . gradient at the corrupted run"
        if steps == 1
        else f"each cell's (clean - corrupted value) . the gradient averaged over {steps} points on the path from the "
        "corrupted to the clean run (integrated gradients)"
    )
    checked = (
        f" Black outline: the {len(result.verified)} cells re-measured by activation patching (hover, and the table "
        "below, give both numbers)."
        if getattr(result, "verified", None)
        else ""
    )
    return (
        f"Estimates, not measurements: {how}; the state after every position through the adjoint scan. Colour: the "
        f"estimated {SCORE_LABEL}. Saturated effects can read low, even with the wrong sign: rank by |estimate| and "
        f"confirm the top cells by activation patching (verify=K, --verify K).{checked}"
    )


def write_html(
    path,
    *,
    trace=None,
    trace_answers=None,
    attention=None,
    attention_rows=None,
    attribution=None,
    attribution_of: str = "the projected output",
    tokens=None,
    title: str = "gdn_intervene report",
    notes: Sequence[str] = (),
    atp=None,
):
    """Write one self-contained HTML file (plotly.js embedded once; works offline). Returns the path.

    trace: a TraceResult: activation patching (the causal trace), or attribution patching (then
    headed as such, its scores named estimates, its verified cells outlined and listed); atp: an
    attribution-patching TraceResult of the same cells (its view, and the estimated-vs-measured
    scatter against `trace`); trace_answers: the two answers as text (default: their token ids); attention: as `attention_figure` takes; attribution: an
    `analysis.Attribution` (its first query row), `attribution_of` saying what it attributes;
    tokens: labels of the prompt (default the trace's tokens).
    """
    tokens = list(tokens if tokens is not None else (trace.tokens if trace is not None else []))
    parts = _trace_parts(trace, atp, trace_answers)
    if attention:
        parts.append(("Effective attention", "attention", attention_figure(attention, tokens, rows=attention_rows),
                      _ATTENTION_NOTE, ""))  # fmt: skip
    if attribution:
        parts.append(("Attribution", "attribution", attribution_figure(attribution, tokens, what=attribution_of),
                      _ATTRIBUTION_NOTE.format(what=attribution_of), ""))  # fmt: skip
    if not parts:
        raise ValueError("write_html needs at least one of trace=, atp=, attention=, attribution=")
    sections = []
    for i, (heading, div, fig, note, after) in enumerate(parts):
        body = fig.to_html(full_html=False, include_plotlyjs=i == 0, div_id=div, config={"displaylogo": False})
        sections.append(f'<h2>{heading}</h2>\n<p class="note">{html.escape(note)}</p>\n{body}{after}')
    sections += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    path = Path(path)
    path.write_text(_PAGE.format(title=html.escape(title), sections="\n".join(sections)), encoding="utf-8")
    return path


_TRACE_NOTE = (
    "Each cell restores one GDN site of the clean run at one (layer, position) in the corrupted run. "
    f"Colour: the {SCORE_LABEL} (1 = all of it, 0 = none). Grey: not applicable (the final state "
    "cannot reach the last logits). Red outline: corrupted positions."
)
_SCATTER_NOTE = (
    "One point per cell: attribution patching (x) against the causal trace (y), one colour per "
    "site. On the dashed line y = x the estimate equals the measurement; a saturated effect may sit "
    "far from it (first-order estimates even take the wrong sign): rank by the estimate, read effect sizes "
    "from the verified cells."
)
_ATTENTION_NOTE = (
    "o = M v: row t of M is how the layer's output o_t (the delta-rule output, before the gated "
    "norm) mixes the values v_s; exact, from the delta rule. Grey: the future (s > t). "
    "Pick the layer and head in the menu."
)
_ATTRIBUTION_NOTE = (
    "Exact split of each GDN layer's direct effect on {what} over heads and source "
    "positions: M[t, s] times the value v_s projected through the gated norm (its scale frozen) and "
    "the output projection. v_s mixes tokens s-3..s through the causal conv. Pick the layer and head "
    "in the menu."
)


def _trace_parts(trace, atp, answers) -> list[tuple]:
    """(heading, div id, figure, note, html after) of the trace, the attribution patching and the
    scatter of one against the other, as far as they are given."""
    parts = []
    if trace is not None and getattr(trace, "estimates", False):  # `gdn-intervene trace --method atp`
        parts.append(("Attribution patching", "trace", trace_figure(trace, answer_labels=answers),
                      _atp_note(trace), _verified_table(trace)))  # fmt: skip
    elif trace is not None:
        parts.append(("Causal trace", "trace", trace_figure(trace, answer_labels=answers), _TRACE_NOTE, ""))
    if atp is not None:
        parts.append(("Attribution patching", "atp", trace_figure(atp, answer_labels=answers), _atp_note(atp),
                      _verified_table(atp)))  # fmt: skip
        if trace is not None and not getattr(trace, "estimates", False):
            parts.append(("Estimated vs measured", "atp-scatter", atp_scatter_figure(atp, trace), _SCATTER_NOTE, ""))
    return parts
