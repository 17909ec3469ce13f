"""How well one result ranks the cells of another (attribution patching against activation
patching): cells paired by identity, (site, GDN layer, position), never by row order."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .result import Cell, TraceResult

__all__ = ["Agreement", "agreement", "paired"]


class Agreement(NamedTuple):
    """How an estimate (attribution patching) ranks the cells of a measurement (activation
    patching), over the cells both score (NaN left out): Pearson and Spearman correlations of the
    scores (NaN where either side is constant), and the recall of the measurement's top `top`
    cells (by |score|) among the estimate's top `within`."""

    cells: int
    pearson: float
    spearman: float
    recall: float


def paired(estimate: TraceResult, measured: TraceResult) -> dict[str, tuple[list[Cell], torch.Tensor, torch.Tensor]]:
    """{site: (cells, x [N], y [N])} over the cells both results score, x the estimate's and y the
    measurement's score of each cell (float64). Raises ValueError in one line where the two are
    not results of one prompt pair, answers and patching direction, or share no cell."""
    ids = bool(estimate.token_ids and measured.token_ids)  # else the position labels stand in for them
    for what, a, b in (
        ("prompt pairs (token ids)", estimate.token_ids, measured.token_ids),
        ("prompts (position labels)", [] if ids else list(estimate.tokens), [] if ids else list(measured.tokens)),
        ("answers", tuple(estimate.answers), tuple(measured.answers)),
        ("patching directions", estimate.patch, measured.patch),
    ):
        if a and b and a != b:
            raise ValueError(f"the two results have different {what} ({a!r} vs {b!r}): they score different patchings")
    x_cells, y_cells = estimate.cells(), measured.cells()
    out = {}
    for name in (n for n in estimate.sites if n in measured.sites):
        cells = [c for c in x_cells if c.site == name and c in y_cells]
        if cells:
            x = torch.tensor([x_cells[c] for c in cells], dtype=torch.float64)
            y = torch.tensor([y_cells[c] for c in cells], dtype=torch.float64)
            out[name] = (cells, x, y)
    if not out:
        raise ValueError(
            f"the two results share no scored cell (sites {list(estimate.sites)} at layers {list(estimate.layers)} vs "
            f"sites {list(measured.sites)} at layers {list(measured.layers)})"
        )
    return out


def agreement(estimate: TraceResult, measured: TraceResult, *, top: int = 10, within: int = 20) -> dict[str, Agreement]:
    """{site: Agreement} per site both results score, and "all" over every shared cell; cells
    paired by (site, layer, position) (`paired`)."""
    pairs = paired(estimate, measured)
    out = {name: _agreement(x, y, top, within) for name, (_, x, y) in pairs.items()}
    out["all"] = _agreement(
        torch.cat([x for _, x, _ in pairs.values()]), torch.cat([y for *_, y in pairs.values()]), top, within
    )
    return out


def _agreement(x: torch.Tensor, y: torch.Tensor, top: int, within: int) -> Agreement:
    want = set(y.abs().argsort(descending=True, stable=True)[:top].tolist())
    got = set(x.abs().argsort(descending=True, stable=True)[:within].tolist())
    return Agreement(len(x), _pearson(x, y), _pearson(_ranks(x), _ranks(y)), len(want & got) / max(1, len(want)))


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else float("nan")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks with ties averaged (as Spearman's correlation takes them)."""
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]
