"""Causal tracing over GDN sites, batched: every (layer, position) cell of a site is one row of
one forward pass (in batches of `batch_size` rows), not one forward per cell.

For each cell, the corrupted prompt runs with that site's value at that (layer, position)
restored from the clean run. The score is the restored fraction of the logit difference
between the clean answer and the corrupted answer at the last position:
    score = (d_restored - d_corrupt) / (d_clean - d_corrupt),   d = logit[clean] - logit[corrupt]
1 = fully restored, 0 = no effect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .analysis import state_at
from .patch import gdn_layers, intervene
from .sites import site

__all__ = ["TRACE_SITES", "TraceResult", "causal_trace"]

TRACE_SITES = ("k", "v", "beta", "decay", "state", "recurrence", "out_proj")


@dataclass
class TraceResult:
    """scores[site]: [L, T] restoration scores (layers in `layers` order). For `state`, column p
    restores the state after token p; the last column (the final state) cannot affect the
    last token's logits and is NaN."""

    sites: tuple[str, ...]
    layers: tuple[int, ...]
    tokens: list[str]
    answers: tuple[int, int]
    clean_diff: float
    corrupt_diff: float
    scores: dict[str, torch.Tensor] = field(default_factory=dict)

    def best(self, name: str) -> tuple[int, int, float]:
        """(layer, position, score) of the highest-scoring cell of site `name`."""
        s = torch.nan_to_num(self.scores[name], nan=-float("inf"))
        i = int(s.argmax())
        L, p = divmod(i, s.shape[1])
        return self.layers[L], p, float(s[L, p])

    def to_json(self) -> dict:
        return {
            "sites": list(self.sites),
            "layers": list(self.layers),
            "tokens": self.tokens,
            "answers": {"clean": self.answers[0], "corrupt": self.answers[1]},
            "logit_diff": {"clean": self.clean_diff, "corrupt": self.corrupt_diff},
            "scores": {k: [[None if v != v else round(float(v), 6) for v in row] for row in s.tolist()]
                       for k, s in self.scores.items()},
        }


def _logit_diff(model: nn.Module, ids: torch.Tensor, answers: tuple[int, int]) -> torch.Tensor:
    """[N] logit[clean answer] - logit[corrupt answer] at the last position."""
    last = model(input_ids=ids, use_cache=False).logits[:, -1].float()
    return last[:, answers[0]] - last[:, answers[1]]


def _capture(model, ids, names, layers, state_positions) -> dict:
    """{(layer, site): value [1, ...]}; for `state`, {p: state [1, HV, K, V] after token p} for
    each p of `state_positions` (the prefill split there)."""
    saved: dict = {}

    def keep(key):
        return lambda x: saved.setdefault(key, []).append(x.detach().clone())

    with intervene(model, {(L, n): keep((L, n)) for L in layers for n in names}):
        if "state" in names and state_positions:
            with state_at(model, state_positions, layers):
                model(input_ids=ids, use_cache=False)
        else:
            model(input_ids=ids, use_cache=False)
    return {k: (dict(zip(state_positions, v)) if k[1] == "state" else v[0]) for k, v in saved.items()}


def causal_trace(
    model: nn.Module,
    clean_ids: torch.Tensor,
    corrupt_ids: torch.Tensor,
    *,
    sites: Sequence[str] = TRACE_SITES,
    answers: tuple[int, int] | None = None,
    tokens: list[str] | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> TraceResult:
    """Restore each site at each (GDN layer, position) of the corrupted run; see module doc.

    clean_ids, corrupt_ids: [1, T] (equal lengths). answers: (clean, corrupt) token ids,
    default the argmax of each run's last position. Returns scores [L, T] per site.
    """
    if clean_ids.dim() != 2 or clean_ids.shape[0] != 1 or clean_ids.shape != corrupt_ids.shape:
        raise ValueError(
            f"causal tracing needs one clean and one corrupted prompt of equal token length, as [1, T]; "
            f"got clean {list(clean_ids.shape)} and corrupted {list(corrupt_ids.shape)}"
        )
    names = tuple(sites)
    for n in names:
        site(n)  # unknown names raise, listing the sites
    layers = tuple(gdn_layers(model))
    T = clean_ids.shape[1]
    with torch.no_grad():
        if answers is None:
            answers = tuple(int(model(input_ids=x, use_cache=False).logits[0, -1].argmax()) for x in (clean_ids, corrupt_ids))
        if answers[0] == answers[1]:
            raise ValueError(f"clean and corrupted prompts have the same answer (token {answers[0]}); nothing to restore")
        d_clean, d_corrupt = (float(_logit_diff(model, x, answers)) for x in (clean_ids, corrupt_ids))
        differ = (clean_ids[0] != corrupt_ids[0]).nonzero()
        if not len(differ):
            raise ValueError("the clean and corrupted prompts are the same tokens; nothing to restore")
        # States before the first corrupted token are the same in both runs: only later ones count.
        state_positions = list(range(int(differ[0]), T - 1))
        clean = _capture(model, clean_ids, names, layers, state_positions)
        corrupt = _capture(model, corrupt_ids, tuple(n for n in names if n != "state"), layers, [])
        result = TraceResult(names, layers, tokens or [str(int(t)) for t in clean_ids[0]], answers, d_clean, d_corrupt)
        # Cells (site, layer, position) whose clean value equals the corrupted one cannot change
        # anything: they score 0 without a forward.
        cells, result.scores = [], {n: torch.full((len(layers), T), float("nan")) for n in names}
        for n in names:
            for i, L in enumerate(layers):
                for p in range(T - 1 if n == "state" else T):
                    same = p not in clean[(L, n)] if n == "state" else torch.equal(clean[(L, n)][0, p], corrupt[(L, n)][0, p])
                    if same:
                        result.scores[n][i, p] = 0.0
                    else:
                        cells.append((n, L, p))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(cells), desc="causal trace", unit="cell")
        for batch in _batches(cells, batch_size):
            d = _restored(model, corrupt_ids, batch, clean, T, answers)
            for (n, L, p), v in zip(batch, ((d - d_corrupt) / (d_clean - d_corrupt)).tolist()):
                result.scores[n][layers.index(L), p] = v
            if bar:
                bar.update(len(batch))
        if bar:
            bar.close()
    return result


def _batches(cells: list, batch_size: int):
    """Rows of one forward each: token sites of any site and layer together; a state restore
    needs the prefill split at its position, which applies to the whole batch, so state cells
    are grouped by position."""
    groups: dict = {}
    for cell in cells:
        groups.setdefault(cell[2] if cell[0] == "state" else "tokens", []).append(cell)
    for group in groups.values():
        yield from (group[i : i + batch_size] for i in range(0, len(group), batch_size))


def _restored(model, corrupt_ids, cells, clean, T, answers) -> torch.Tensor:
    """Logit differences [N] of N corrupted rows, row i restored at cells[i] = (site, layer, p)."""
    ids = corrupt_ids.expand(len(cells), T)
    rows: dict = {}
    for i, (n, L, p) in enumerate(cells):
        rows.setdefault((L, n), []).append((i, p))
    edits = {}
    for (L, n), rp in rows.items():
        r, pos = (torch.tensor(x, dtype=torch.long) for x in zip(*rp))
        value = clean[(L, n)]
        edits[(L, n)] = _state_restorer(r, value[rp[0][1]][0]) if n == "state" else _token_restorer(r, pos, value)
    with intervene(model, edits):
        if cells[0][0] == "state":
            with state_at(model, [cells[0][2]], sorted({L for _, L, _ in cells})):  # split after that position
                return _logit_diff(model, ids, answers)
        return _logit_diff(model, ids, answers)


def _token_restorer(rows, pos, clean):
    """Site output [N, T, ...]: row rows[i] gets the clean value at position pos[i]."""

    def edit(x):
        x = x.clone()
        x[rows, pos] = clean[0, pos]
        return x

    return edit


def _state_restorer(rows, clean_state):
    """`state` fires after the split position, then at the end of the call: rows `rows` get the
    clean state [HV, K, V] at the first firing only."""
    calls = [0]

    def edit(S):
        calls[0] += 1
        if calls[0] > 1:
            return None
        S = S.clone()
        S[rows] = clean_state
        return S

    return edit
