"""What a causal trace or an attribution-patching run returns: scores per (site, GDN layer,
position), the prompt pair they belong to, and their strict-JSON form."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

__all__ = [
    "ACTIVATION",
    "ATTRIBUTION",
    "CLEAN_INTO_CORRUPT",
    "CORRUPT_INTO_CLEAN",
    "RESTORED",
    "Best",
    "Cell",
    "SameAnswerError",
    "TraceResult",
    "ZeroSpanError",
    "check_span",
]

#: |score| below this counts as "nothing restored" in `TraceResult.summary`.
RESTORED = 0.05
#: `TraceResult.method` of `causal_trace` and of `attribution_patching`.
ACTIVATION, ATTRIBUTION = "activation patching", "attribution patching"
#: `TraceResult.patch`: which run's values go into which run.
CLEAN_INTO_CORRUPT, CORRUPT_INTO_CLEAN = "clean_into_corrupt", "corrupt_into_clean"


class SameAnswerError(ValueError):
    """The clean and corrupted prompts have the same answer (`answer`, a token id): the
    corruption does not change the prediction, so there is nothing to restore."""

    def __init__(self, answer: int, pair: int | None = None):
        self.answer, self.pair = answer, pair
        at = "" if pair is None else f"pair {pair}: "
        super().__init__(
            f"{at}clean and corrupted prompts have the same answer (token {answer}): the corruption does not change "
            "the prediction, so there is nothing to restore; corrupt a token the answer depends on"
        )


class ZeroSpanError(ValueError):
    """The corruption leaves the metric logit[clean answer] - logit[corrupt answer] unchanged
    (or not finite): every score is a fraction of that change, so none can be computed."""

    def __init__(self, clean: float, corrupt: float, pair: int | None = None):
        self.clean, self.corrupt, self.pair = clean, corrupt, pair
        at = "" if pair is None else f"pair {pair}: "
        super().__init__(
            f"{at}the corruption leaves logit(clean answer) - logit(corrupt answer) at {clean!r} in both runs "
            f"(clean {clean!r}, corrupted {corrupt!r}), so no fraction of it can be restored; choose answers whose "
            "logit difference the corruption changes (or another corruption; in bf16, compare in float32)"
            if clean == corrupt
            else f"{at}the logit differences are not finite (clean {clean!r}, corrupted {corrupt!r}); scores would be "
            "inf or NaN: check the model's dtype and inputs"
        )


def check_span(clean: float, corrupt: float, pair: int | None = None) -> None:
    """Raise `ZeroSpanError` unless clean - corrupt is a finite, non-zero span (before any sweep)."""
    if not (math.isfinite(clean) and math.isfinite(corrupt)) or clean == corrupt:
        raise ZeroSpanError(clean, corrupt, pair)


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


def _finite_or_none(v: float, digits: int = 6):
    return round(float(v), digits) if math.isfinite(v) else None


@dataclass
class TraceResult:
    """scores[site]: [L, T] scores (layers in `layers` order). For `state`, column p patches the
    state after token p; the last column (the final state) cannot affect the last token's logits
    and is NaN (not applicable); every other score is finite (a pair whose corruption leaves the
    metric unchanged is refused, `ZeroSpanError`). `corrupted_positions`: where the two prompts
    differ. `method`: `ACTIVATION` ("activation patching", `causal_trace`) or `ATTRIBUTION`
    ("attribution patching", `attribution_patching`: estimates). `patch`: `CLEAN_INTO_CORRUPT`
    (score: the fraction of the logit difference restored) or `CORRUPT_INTO_CLEAN` (the fraction
    removed). `token_ids`: (clean, corrupt) token ids of the pair, for telling results of other
    prompts apart. `verified`: {Cell: activation-patching score} of the cells an attribution
    result was checked on (`verify=K`). `steps`: the integration points of attribution patching
    (1: first order)."""

    sites: tuple[str, ...]
    layers: tuple[int, ...]
    tokens: list[str]
    answers: tuple[int, int]
    clean_diff: float
    corrupt_diff: float
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    corrupted_positions: tuple[int, ...] = ()
    method: str = ACTIVATION
    verified: dict = field(default_factory=dict)
    patch: str = CLEAN_INTO_CORRUPT
    token_ids: tuple = ()
    steps: int = 1

    @property
    def estimates(self) -> bool:
        """Whether the scores are attribution-patching estimates (rank them by |score|)."""
        return self.method == ATTRIBUTION

    def best(self, name: str) -> Best:
        """The highest-scoring (layer, position, score) of site `name` (NaN cells ignored); for
        attribution patching the largest |score| (a saturated effect can read negative)."""
        s = self.scores[name]
        if self.estimates:
            s = s.abs()
        s = torch.nan_to_num(s, nan=-float("inf"))
        i = int(s.argmax())
        L, p = divmod(i, s.shape[1])
        return Best(self.layers[L], p, float(self.scores[name][L, p]))

    def summary(self, answer_labels: Sequence[str] | None = None) -> str:
        """A few lines for a terminal: the answers, then per site its best cell, or that no cell
        of the site restored anything (|score| < RESTORED everywhere). `answer_labels`: the two
        answers as text, e.g. `tokenizer.convert_ids_to_tokens(result.answers)` (default: their token
        ids, said so)."""
        if self.estimates:
            what = (
                f"estimate (attribution patching{'' if self.steps == 1 else f', {self.steps} steps'}) of the fraction"
            )
            what += " of that difference restored; rank by |score|"
        else:
            what = "fraction of that difference restored"
        a = answer_labels
        answers = (
            f"clean answer {a[0]!r}, corrupted answer {a[1]!r}"
            if a
            else f"clean answer: token id {self.answers[0]}, corrupted answer: token id {self.answers[1]}"
        )
        lines = [
            f"{answers}; logit diff clean {self.clean_diff:.2f}, corrupted {self.corrupt_diff:.2f}; score = {what}"
        ]
        rows, quiet = [], []
        for name in self.sites:
            b = self.best(name)
            if b.score >= RESTORED or (self.estimates and abs(b.score) >= RESTORED):
                rows.append(f"{name:<11} {b.layer:>10} {b.position:>8} {self.tokens[b.position]:>8} {b.score:6.2f}")
            else:
                quiet.append(name)
        if rows:
            lines += [f"{'site':<11} {'best layer':>10} {'position':>8} {'token':>8} {'score':>6}", *rows]
        if quiet:
            lines.append(f"no cell restored anything (score < {RESTORED}) at: {', '.join(quiet)}")
        if self.verified:
            lines.append(f"checked by activation patching (the top {len(self.verified)} cells by |estimate|):")
            lines += [
                f"  {c.site:<11} layer {c.layer} position {c.position:>3} {self.tokens[c.position]:>8}: estimate "
                f"{self.score(c):6.2f}, measured {v:6.2f}"
                for c, v in self.verified.items()
            ]
        return "\n".join(lines)

    def to_json(self) -> dict:
        """A dict that `json.dumps(..., allow_nan=False)` writes: NaN scores (not applicable) are null."""
        return {
            "sites": list(self.sites),
            "layers": list(self.layers),
            "tokens": self.tokens,
            "token_ids": {"clean": list(self.token_ids[0]), "corrupt": list(self.token_ids[1])}
            if self.token_ids
            else None,
            "corrupted_positions": list(self.corrupted_positions),
            "answers": {"clean": self.answers[0], "corrupt": self.answers[1]},
            "logit_diff": {"clean": _finite_or_none(self.clean_diff), "corrupt": _finite_or_none(self.corrupt_diff)},
            "scores": {k: [[_finite_or_none(v) for v in row] for row in s.tolist()] for k, s in self.scores.items()},
            "method": self.method,
            "patch": self.patch,
            "steps": self.steps,
            "verified": [
                {
                    "site": c.site,
                    "layer": c.layer,
                    "position": c.position,
                    "estimate": _finite_or_none(self.score(c)),
                    "activation_patching": _finite_or_none(v),
                }
                for c, v in self.verified.items()
            ],  # fmt: skip
        }

    def score(self, cell: Cell) -> float:
        """This result's score of `cell`."""
        return float(self.scores[cell.site][self.layers.index(cell.layer), cell.position])

    def cells(self) -> dict[Cell, float]:
        """{Cell: score} of every scored cell (NaN cells left out), in site, layer, position order."""
        return {
            Cell(n, L, p): v
            for n in self.sites
            for i, L in enumerate(self.layers)
            for p, v in enumerate(self.scores[n][i].tolist())
            if v == v
        }

    def top(self, k: int) -> list[Cell]:
        """The k cells of largest |score| (NaN cells left out), largest first."""
        cells = self.cells()
        return sorted(cells, key=lambda c: -abs(cells[c]))[:k]
