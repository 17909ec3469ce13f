"""Causal tracing over GDN sites, batched: every (layer, position) cell of a site is one row of
one forward pass (in batches of `batch_size` rows), not one forward per cell.

For each cell, the corrupted prompt runs with that site's value at that (layer, position)
restored from the clean run. The score is the restored fraction of the logit difference
between the clean answer and the corrupted answer at the last position:
    score = (d_restored - d_corrupt) / (d_clean - d_corrupt),   d = logit[clean] - logit[corrupt]
1 = fully restored, 0 = no effect.

Threads: a trace's hooks act on its own thread's forwards only, so concurrent traces of one
model each get their single-threaded result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
from torch import nn

from .capturing import capture  # the core's; tracing never imports analysis
from .edit import intervene, state_at
from .patching import gdn_layers
from .sites import TRACE_SITES, site

__all__ = ["TRACE_SITES", "Cell", "Best", "TraceResult", "SameAnswerError", "causal_trace"]

#: |score| below this counts as "nothing restored" in `TraceResult.summary`.
RESTORED = 0.05


class SameAnswerError(ValueError):
    """The clean and corrupted prompts have the same answer (`answer`, a token id): the
    corruption does not change the prediction, so there is nothing to restore."""

    def __init__(self, answer: int):
        self.answer = answer
        super().__init__(f"clean and corrupted prompts have the same answer (token {answer}): the corruption does not "
                         "change the prediction, so there is nothing to restore; corrupt a token the answer depends on")


class Cell(NamedTuple):
    """One restoration: site `site` of GDN layer `layer` at token `position` (for `state`: the
    state after that token)."""

    site: str
    layer: int
    position: int


class Best(NamedTuple):
    """The highest-scoring cell of a site: GDN layer, position and its score."""

    layer: int
    position: int
    score: float


@dataclass
class TraceResult:
    """scores[site]: [L, T] restoration scores (layers in `layers` order). For `state`, column p
    restores the state after token p; the last column (the final state) cannot affect the
    last token's logits and is NaN (not applicable). `corrupted_positions`: the positions where
    the two prompts differ."""

    sites: tuple[str, ...]
    layers: tuple[int, ...]
    tokens: list[str]
    answers: tuple[int, int]
    clean_diff: float
    corrupt_diff: float
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    corrupted_positions: tuple[int, ...] = ()

    def best(self, name: str) -> Best:
        """The highest-scoring (layer, position, score) of site `name` (NaN cells ignored)."""
        s = torch.nan_to_num(self.scores[name], nan=-float("inf"))
        i = int(s.argmax())
        L, p = divmod(i, s.shape[1])
        return Best(self.layers[L], p, float(s[L, p]))

    def summary(self, answer_labels: Sequence[str] | None = None) -> str:
        """A few lines for a terminal: the answers, then per site its best cell, or that no cell
        of the site restored anything (|score| < RESTORED everywhere)."""
        a = answer_labels or [str(x) for x in self.answers]
        lines = [f"clean answer {a[0]!r}, corrupted answer {a[1]!r}; logit diff clean {self.clean_diff:.2f}, "
                 f"corrupted {self.corrupt_diff:.2f}; score = fraction of that difference restored"]
        rows, quiet = [], []
        for name in self.sites:
            b = self.best(name)
            if b.score >= RESTORED:
                rows.append(f"{name:<11} {b.layer:>10} {b.position:>8} {self.tokens[b.position]:>8} {b.score:6.2f}")
            else:
                quiet.append(name)
        if rows:
            lines += [f"{'site':<11} {'best layer':>10} {'position':>8} {'token':>8} {'score':>6}", *rows]
        if quiet:
            lines.append(f"no cell restored anything (score < {RESTORED}) at: {', '.join(quiet)}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "sites": list(self.sites),
            "layers": list(self.layers),
            "tokens": self.tokens,
            "corrupted_positions": list(self.corrupted_positions),
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
    if not names:
        return {}
    with capture(model, sites=names, layers=layers) as cache:
        if "state" in names and state_positions:
            with state_at(model, state_positions, layers):
                model(input_ids=ids, use_cache=False)
        else:
            model(input_ids=ids, use_cache=False)
    return {(L, n): dict(zip(state_positions, cache[L, n])) if n == "state" else cache[L, n][0]
            for L in layers for n in names}


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
            raise SameAnswerError(answers[0])
        d_clean, d_corrupt = (float(_logit_diff(model, x, answers)) for x in (clean_ids, corrupt_ids))
        differ = (clean_ids[0] != corrupt_ids[0]).nonzero()
        if not len(differ):
            raise ValueError("the clean and corrupted prompts are the same tokens; nothing to restore")
        # States before the first corrupted token are the same in both runs: only later ones count.
        state_positions = list(range(int(differ[0]), T - 1))
        clean = _capture(model, clean_ids, names, layers, state_positions)
        corrupt = _capture(model, corrupt_ids, tuple(n for n in names if n != "state"), layers, [])
        result = TraceResult(names, layers, tokens or [str(int(t)) for t in clean_ids[0]], answers, d_clean, d_corrupt,
                             corrupted_positions=tuple(differ.flatten().tolist()))
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
                        cells.append(Cell(n, L, p))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(cells), desc="causal trace", unit="cell")
        for batch in _batches(cells, batch_size):
            d = _restored(model, corrupt_ids, batch, clean, T, answers)
            for cell, v in zip(batch, ((d - d_corrupt) / (d_clean - d_corrupt)).tolist()):
                result.scores[cell.site][layers.index(cell.layer), cell.position] = v
            if bar:
                bar.update(len(batch))
        if bar:
            bar.close()
    return result


def _batches(cells: list[Cell], batch_size: int):
    """Rows of one forward each: token sites of any site and layer together; a state restore
    needs the prefill split at its position, which applies to the whole batch, so state cells
    are grouped by position."""
    groups: dict = {}
    for cell in cells:
        groups.setdefault(cell.position if cell.site == "state" else "tokens", []).append(cell)
    for group in groups.values():
        yield from (group[i : i + batch_size] for i in range(0, len(group), batch_size))


def _restored(model, corrupt_ids, cells: list[Cell], clean, T, answers) -> torch.Tensor:
    """Logit differences [N] of N corrupted rows, row i restored at cells[i]."""
    ids = corrupt_ids.expand(len(cells), T)
    rows: dict = {}
    for i, c in enumerate(cells):
        rows.setdefault((c.layer, c.site), []).append((i, c.position))
    edits = {}
    for (L, n), rp in rows.items():
        r, pos = (torch.tensor(x, dtype=torch.long) for x in zip(*rp))
        value = clean[(L, n)]
        edits[(L, n)] = _state_restorer(r, value[rp[0][1]][0]) if n == "state" else _token_restorer(r, pos, value)
    with intervene(model, edits):
        if cells[0].site == "state":
            with state_at(model, [cells[0].position], sorted({c.layer for c in cells})):  # split after that position
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
