"""Plots of effective attention (matplotlib, imported when a function is called).

Figures are built with the object-oriented API (`matplotlib.figure.Figure`), not pyplot: no
global state, no figure leak in loops, and saving goes through the Agg canvas whatever the
session's backend. In a notebook, a returned Figure displays as usual.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["effective_attention_heatmap"]


def _matrix(M) -> torch.Tensor:
    """Accept a tensor, ops.EffectiveAttention or analysis.LayerAttention (anything with .matrix)."""
    return getattr(M, "matrix", M)


def effective_attention_heatmap(
    M,
    *,
    head: Optional[int] = None,
    batch: int = 0,
    tokens: Optional[Sequence[str]] = None,
    rows: Optional[Sequence[int]] = None,
    ax=None,
    title: Optional[str] = None,
    cmap: str = "RdBu_r",
    path: Optional[str] = None,
):
    """Heatmap of the effective attention M of one head, or the mean over heads.

    Args:
        M: [B, H, R, T] tensor (or an object with `.matrix`, e.g. a LayerAttention); rows are
            queries, columns keys: o_t = sum_s M[t, s] v_s (+ the initial-state term).
        head: index into M's head axis; None plots the mean over heads.
        batch: which batch row.
        tokens: T labels for the key axis (and the query axis when all rows are shown).
        rows: the query positions M's R rows stand for (when M was computed with rows=[...]);
            used for the query-axis labels.
        ax: draw into this Axes (its figure is returned); default a new Figure.
        cmap: a diverging map centred at 0 (delta-rule weights can be negative).
        path: also save the figure there (Agg canvas).

    Returns:
        matplotlib.figure.Figure.
    """
    from matplotlib.backend_bases import FigureCanvasBase
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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
    data = (M[batch].mean(0) if head is None else M[batch, head]).detach().float().cpu().numpy()

    if ax is None:
        fig = Figure(figsize=(1.5 + 0.25 * min(T, 48), 1.2 + 0.25 * min(R, 48)), layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure
    lim = float(abs(data).max()) or 1.0
    im = ax.imshow(data, cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest", aspect="auto")
    fig.colorbar(im, ax=ax, shrink=0.8)
    row_pos = list(range(R)) if rows is None else list(rows)
    if T <= 64 and tokens is not None:
        ax.set_xticks(range(T), [str(t) for t in tokens], rotation=90, fontsize=7)
    if R <= 64 and (tokens is not None or rows is not None):
        labels = [str(tokens[p]) if tokens is not None else str(p) for p in row_pos]
        ax.set_yticks(range(R), labels, fontsize=7)
    ax.set_xlabel("key position s")
    ax.set_ylabel("query position t")
    ax.set_title(title or ("mean over heads" if head is None else f"head {head}"))
    if path is not None:
        if type(fig.canvas) is FigureCanvasBase:  # a bare Figure: render with Agg; leave GUI canvases alone
            FigureCanvasAgg(fig)  # attaches itself as fig.canvas
        fig.savefig(path, dpi=120)
    return fig
