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


def _capture(model, ids, names, layers, T) -> dict:
    """{(layer, site): clean value}; `state` holds [T-1, ...] states after tokens 0..T-2."""
    saved: dict = {}

    def keep(key):
        return lambda x: saved.setdefault(key, []).append(x.detach().clone())

    with intervene(model, {(L, n): keep((L, n)) for L in layers for n in names}):
        if "state" in names and T > 1:
            with state_at(model, list(range(T - 1)), layers):
                model(input_ids=ids, use_cache=False)
        else:
            model(input_ids=ids, use_cache=False)
    return {k: (torch.cat(v[: T - 1]) if k[1] == "state" else v[0]) for k, v in saved.items()}


def causal_trace(
    model: nn.Module,
    clean_ids: torch.Tensor,
    corrupt_ids: torch.Tensor,
    *,
    sites: Sequence[str] = TRACE_SITES,
    answers: tuple[int, int] | None = None,
    tokens: list[str] | None = None,
    batch_size: int = 128,
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
        clean = _capture(model, clean_ids, names, layers, T)
        corrupt = _capture(model, corrupt_ids, names, layers, T)
        result = TraceResult(names, layers, tokens or [str(int(t)) for t in clean_ids[0]], answers, d_clean, d_corrupt)

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(names) * len(layers) * T, desc="causal trace", unit="cell")
        for n in names:
            score = torch.full((len(layers), T), float("nan"))
            cells = []
            for i, L in enumerate(layers):
                for p in range(T - 1 if n == "state" else T):
                    if torch.equal(_at(clean[(L, n)], n, p), _at(corrupt[(L, n)], n, p)):
                        score[i, p] = 0.0  # restoring an identical value cannot change anything
                    else:
                        cells.append((L, p))
            for chunk in _batches(cells, n, batch_size):
                d = _restored(model, corrupt_ids, n, chunk, clean, layers, T, answers)
                for (L, p), v in zip(chunk, ((d - d_corrupt) / (d_clean - d_corrupt)).tolist()):
                    score[layers.index(L), p] = v
            result.scores[n] = score
            if bar:
                bar.update(len(layers) * T)
        if bar:
            bar.close()
    return result


def _at(value: torch.Tensor, name: str, p: int) -> torch.Tensor:
    """A site's value at position p: the state after token p, or row p of a token site."""
    return value[p] if name == "state" else value[0, p]


def _batches(cells: list, name: str, batch_size: int):
    """Rows of one forward each. A state restore needs the prefill split at its position, and a
    split applies to the whole batch, so state cells are grouped by position."""
    if name != "state":
        yield from (cells[i : i + batch_size] for i in range(0, len(cells), batch_size))
        return
    by_pos: dict[int, list] = {}
    for L, p in cells:
        by_pos.setdefault(p, []).append((L, p))
    for group in by_pos.values():
        yield from (group[i : i + batch_size] for i in range(0, len(group), batch_size))


def _restored(model, corrupt_ids, name, cells, clean, layers, T, answers) -> torch.Tensor:
    """Logit differences [N] of N corrupted rows, row i restored at cells[i] (state cells share
    one position)."""
    N = len(cells)
    ids = corrupt_ids.expand(N, T)
    edits = {}
    for L in layers:
        rows = torch.tensor([i for i, (l, _) in enumerate(cells) if l == L], dtype=torch.long)
        if not len(rows):
            continue
        pos = torch.tensor([p for l, p in cells if l == L], dtype=torch.long)
        value = clean[(L, name)]
        edits[(L, name)] = _state_restorer(rows, value[cells[0][1]]) if name == "state" else _token_restorer(rows, pos, value)
    with intervene(model, edits):
        if name == "state":
            with state_at(model, [cells[0][1]], layers):  # split once, after the restored position
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
