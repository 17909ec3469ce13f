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

from .capturing import _dispatched, capture  # the core's; tracing never imports analysis
from .edit import intervene, state_at
from .patching import as_module, gdn_layers
from .sites import TRACE_SITES, site

__all__ = ["TRACE_SITES", "Cell", "Best", "TraceResult", "SameAnswerError", "causal_trace", "attribution_patching", "Agreement", "agreement"]

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
    the two prompts differ. `method`: "activation patching" (`causal_trace`) or "attribution
    patching" (`attribution_patching`: first-order estimates); `verified`: {Cell: activation
    patching score} for the cells an attribution-patching result was checked on (`verify=K`)."""

    sites: tuple[str, ...]
    layers: tuple[int, ...]
    tokens: list[str]
    answers: tuple[int, int]
    clean_diff: float
    corrupt_diff: float
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    corrupted_positions: tuple[int, ...] = ()
    method: str = "activation patching"
    verified: dict = field(default_factory=dict)

    def best(self, name: str) -> Best:
        """The highest-scoring (layer, position, score) of site `name` (NaN cells ignored); for
        attribution patching the largest |score| (a saturated effect can read negative)."""
        s = self.scores[name]
        if self.method == "attribution patching":
            s = s.abs()
        s = torch.nan_to_num(s, nan=-float("inf"))
        i = int(s.argmax())
        L, p = divmod(i, s.shape[1])
        return Best(self.layers[L], p, float(self.scores[name][L, p]))

    def summary(self, answer_labels: Sequence[str] | None = None) -> str:
        """A few lines for a terminal: the answers, then per site its best cell, or that no cell
        of the site restored anything (|score| < RESTORED everywhere)."""
        a = answer_labels or [str(x) for x in self.answers]
        what = ("first-order estimate (attribution patching) of the fraction of that difference restored; rank by "
                "|score|" if self.method == "attribution patching" else "fraction of that difference restored")
        lines = [f"clean answer {a[0]!r}, corrupted answer {a[1]!r}; logit diff clean {self.clean_diff:.2f}, "
                 f"corrupted {self.corrupt_diff:.2f}; score = {what}"]
        rows, quiet = [], []
        for name in self.sites:
            b = self.best(name)
            if b.score >= RESTORED or (self.method == "attribution patching" and abs(b.score) >= RESTORED):
                rows.append(f"{name:<11} {b.layer:>10} {b.position:>8} {self.tokens[b.position]:>8} {b.score:6.2f}")
            else:
                quiet.append(name)
        if rows:
            lines += [f"{'site':<11} {'best layer':>10} {'position':>8} {'token':>8} {'score':>6}", *rows]
        if quiet:
            lines.append(f"no cell restored anything (score < {RESTORED}) at: {', '.join(quiet)}")
        if self.verified:
            lines.append(f"checked by activation patching (the top {len(self.verified)} cells by |estimate|):")
            lines += [f"  {c.site:<11} layer {c.layer} position {c.position:>3} {self.tokens[c.position]:>8}: estimate "
                      f"{self.score(c):6.2f}, measured {v:6.2f}" for c, v in self.verified.items()]
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
            "method": self.method,
            "verified": [{"site": c.site, "layer": c.layer, "position": c.position, "estimate": self.score(c),
                          "activation_patching": round(v, 6)} for c, v in self.verified.items()],
        }

    def score(self, cell: Cell) -> float:
        """This result's score of `cell`."""
        return float(self.scores[cell.site][self.layers.index(cell.layer), cell.position])

    def top(self, k: int) -> list[Cell]:
        """The k cells of largest |score| (NaN cells left out), largest first."""
        cells = [Cell(n, L, p) for n in self.sites for i, L in enumerate(self.layers)
                 for p, v in enumerate(self.scores[n][i].tolist()) if v == v]
        return sorted(cells, key=lambda c: -abs(self.score(c)))[:k]


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
        if state_positions and not all(site(n).has_time for n in names):
            with state_at(model, state_positions, layers):
                model(input_ids=ids, use_cache=False)
        else:
            model(input_ids=ids, use_cache=False)
    return {(L, n): cache[L, n][0] if site(n).has_time else dict(zip(state_positions, cache[L, n]))
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
    _check_answers(model, answers, 1)
    if tokens is not None and len(tokens) != T:
        raise ValueError(f"tokens must label the T = {T} positions; got {len(tokens)} labels")
    model = _dispatched(model)  # a lazy nnsight model's real weights, before its first plain call
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
        corrupt = _capture(model, corrupt_ids, tuple(n for n in names if site(n).has_time), layers, [])
        result = TraceResult(names, layers, tokens or [str(int(t)) for t in clean_ids[0]], answers, d_clean, d_corrupt,
                             corrupted_positions=tuple(differ.flatten().tolist()))
        # Cells (site, layer, position) whose clean value equals the corrupted one cannot change
        # anything: they score 0 without a forward.
        cells, result.scores = [], {n: torch.full((len(layers), T), float("nan")) for n in names}
        for n in names:
            for i, L in enumerate(layers):
                timed = site(n).has_time
                for p in range(T if timed else T - 1):  # the final state reaches no later token
                    same = torch.equal(clean[(L, n)][0, p], corrupt[(L, n)][0, p]) if timed else p not in clean[(L, n)]
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
        groups.setdefault("tokens" if site(cell.site).has_time else cell.position, []).append(cell)
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
        edits[(L, n)] = _token_restorer(r, pos, value) if site(n).has_time else _state_restorer(r, value[rp[0][1]][0])
    with intervene(model, edits):
        if not site(cells[0].site).has_time:
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


# ------------------------------------------------------------------ attribution patching

#: `patch=` of `attribution_patching`: which run's values go into which run.
CLEAN_INTO_CORRUPT, CORRUPT_INTO_CLEAN = "clean_into_corrupt", "corrupt_into_clean"
# What the state's adjoint scan reads of each layer (ops.DeltaRuleRun's fields, in order).
_RUN_SITES = ("q", "k", "v", "beta", "decay")


def attribution_patching(
    model: nn.Module,
    clean_ids: torch.Tensor,
    corrupt_ids: torch.Tensor,
    *,
    sites: Sequence[str] = TRACE_SITES,
    layers: Sequence[int] | None = None,
    answers=None,
    tokens: list[str] | None = None,
    patch: str = CLEAN_INTO_CORRUPT,
    verify: int = 0,
    batch_size: int = 256,
    attention_mask: torch.Tensor | None = None,
):
    """Attribution patching (AtP): every cell `causal_trace` would patch, ranked from one clean
    forward, one corrupted forward and one backward, the recurrent state after every position
    included.

    A cell's score is the first-order estimate of its activation-patching score,

        est = (source - base) . d metric / d value,   metric d = logit[clean answer] - logit[corrupt answer]

    at the last position, taken in the base run: `patch="clean_into_corrupt"` (default, as
    `causal_trace`) patches clean values into the corrupted run, score = est / (d_clean -
    d_corrupt), the fraction of the difference restored; `"corrupt_into_clean"` patches
    corrupted values into the clean run, score = -est / (d_clean - d_corrupt), the fraction
    removed. Token sites take their gradients from one backward (`gi.capture(detach=False)`);
    the state after token p takes <mu_p, S^source_p - S^base_p> with mu_p the metric's gradient
    with respect to that state, from the adjoint scan `ops.state_patching_scores` (exact for
    GDN and KDA's per-channel decay, GQA, beta x2). Same sites, layers, normalisation and NaN
    conventions as `causal_trace` (the final state's column is NaN), so every figure, the HTML
    report and the CLI take the result.

    AtP is linear: it under-reads saturated effects (a state that restores everything once
    patched may score far below 1). `verify=K` re-runs activation patching on the K cells of
    largest |estimate| and stores their scores in `result.verified`.

    clean_ids, corrupt_ids: [B, T] prompt pairs of equal length (B >= 1). answers: (clean,
    corrupt) token ids, ints or [B] tensors; default each run's argmax at the last position.
    tokens: position labels for the figures: T strings (B = 1), or B lists (a batch), each of T
    labels or of its pair's own length (default the token ids).
    attention_mask: [B, T], 1 for tokens and 0 for left padding, shared by both prompts of a
    pair (pairs of different lengths in one batch); each row's result covers that pair's own
    tokens, positions from 0, as if it were traced alone (`verify` runs on the unpadded pair).
    Returns one `TraceResult` for B = 1, else a list of B.
    """
    if torch.is_inference_mode_enabled():
        # AtP takes a backward, which inference_mode rules out: leave it for this call, with
        # copies of the inputs (autograd cannot save inference tensors)
        copy = lambda x: x.clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
        with torch.inference_mode(False):
            return attribution_patching(
                model, copy(clean_ids), copy(corrupt_ids), sites=sites, layers=layers,
                answers=None if answers is None else tuple(copy(x) for x in answers), tokens=tokens, patch=patch,
                verify=verify, batch_size=batch_size, attention_mask=copy(attention_mask),
            )
    if clean_ids.dim() != 2 or clean_ids.shape != corrupt_ids.shape:
        raise ValueError(
            f"attribution patching needs clean and corrupted prompts of equal token length, as [B, T]; "
            f"got clean {list(clean_ids.shape)} and corrupted {list(corrupt_ids.shape)}"
        )
    if patch not in (CLEAN_INTO_CORRUPT, CORRUPT_INTO_CLEAN):
        raise ValueError(f"patch must be {CLEAN_INTO_CORRUPT!r} or {CORRUPT_INTO_CLEAN!r}; got {patch!r}")
    if isinstance(verify, bool) or not isinstance(verify, int) or verify < 0:
        raise ValueError(f"verify must be an int >= 0 (cells to re-check by activation patching); got {verify!r}")
    names = tuple(sites)
    for n in names:
        site(n)
    layers = tuple(gdn_layers(model)) if layers is None else tuple(layers)
    mods = gdn_layers(model)
    bad = [L for L in layers if L not in mods]
    if bad:
        raise ValueError(f"layers must be GDN layer indices from {list(mods)}; got {list(layers)}")
    _check_answers(model, answers, clean_ids.shape[0])
    starts = _left_padding(attention_mask, clean_ids.shape)  # [B]: each row's first token
    labels = _token_labels(tokens, clean_ids.shape, starts)
    if clean_ids.shape[0] == 1 and starts[0]:
        # HF masks padding only in batches (B > 1): a single padded pair runs as itself
        clean_ids, corrupt_ids, attention_mask, starts = clean_ids[:, starts[0]:], corrupt_ids[:, starts[0]:], None, [0]
    B, T = clean_ids.shape
    model = _dispatched(model)  # a lazy nnsight model's real weights, before its first plain call
    base_ids, source_ids = (corrupt_ids, clean_ids) if patch == CLEAN_INTO_CORRUPT else (clean_ids, corrupt_ids)
    timed = tuple(n for n in names if site(n).has_time)
    states = len(timed) < len(names)
    run_sites = tuple(dict.fromkeys((*timed, *((*_RUN_SITES, "recurrence") if states else ()))))
    # two forwards and one backward: the source run first (no graph), then the base run, whose
    # logits settle the answers before its backward
    with torch.no_grad(), capture(model, sites=run_sites, layers=layers) as cache:
        source_last = model(input_ids=source_ids, attention_mask=attention_mask, use_cache=False).logits[:, -1].float()
    source = {key: cache[key][0] for key in ((L, n) for L in layers for n in run_sites)}
    last = {}

    def pick(base_last):
        last.update(zip(("corrupt", "clean") if patch == CLEAN_INTO_CORRUPT else ("clean", "corrupt"), (base_last, source_last)))
        a, b = _answer_pair(answers, last, B)
        same = (a == b).nonzero().flatten().tolist()
        if same:
            raise SameAnswerError(int(a[same[0]]))
        return a, b

    base, grads, (a, b) = _values_and_grads(model, base_ids, run_sites, layers, pick, attention_mask)
    rows = torch.arange(B)
    d = {k: v[rows, a] - v[rows, b] for k, v in last.items()}  # [B]
    sign = 1.0 if patch == CLEAN_INTO_CORRUPT else -1.0
    scale = sign / (d["clean"] - d["corrupt"]).double()  # [B]
    scores = {n: torch.full((B, len(layers), T), float("nan"), dtype=torch.float64) for n in names}
    for i, L in enumerate(layers):
        for n in timed:
            diff = source[L, n].double() - base[L, n].double()
            scores[n][:, i] = (diff * grads[L, n].double()).reshape(B, T, -1).sum(-1) * scale[:, None]
        if states:
            from . import ops

            runs = [ops.DeltaRuleRun(*(v[L, s] for s in _RUN_SITES)) for v in (base, source)]
            dtype = torch.float64 if base[L, "v"].dtype == torch.float64 else torch.float32
            st = ops.state_patching_scores(*runs, grads[L, "recurrence"], dtype=dtype).sum(1).double()  # [B, T]
            for n in names:
                if not site(n).has_time:
                    scores[n][:, i, : T - 1] = st[:, : T - 1] * scale[:, None]
    results = []
    for r in range(B):
        own = slice(starts[r], T)  # the pair's own tokens
        clean_r, corrupt_r = clean_ids[r : r + 1, own], corrupt_ids[r : r + 1, own]
        differ = (clean_r[0] != corrupt_r[0]).nonzero().flatten()
        res = TraceResult(
            names, layers, labels[r] if labels else [str(int(t)) for t in clean_r[0]],
            (int(a[r]), int(b[r])), float(d["clean"][r]), float(d["corrupt"][r]),
            scores={n: s[r, :, own].float() for n, s in scores.items()}, corrupted_positions=tuple(differ.tolist()),
            method="attribution patching",
        )
        if verify:
            res.verified = _verify(model, res, clean_r, corrupt_r, patch, verify, batch_size)
        results.append(res)
    return results[0] if B == 1 else results


def _left_padding(mask, shape: torch.Size) -> list[int]:
    """Each row's first token ([B] ints) under a left-padding `mask` [B, T] (None: no padding);
    any other mask raises, naming what was expected and what came."""
    B, T = shape
    if mask is None:
        return [0] * B
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, T):
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask must be [B, T] = {[B, T]} like the prompts (1 = token, 0 = left padding); got {got}")
    m = mask.detach().to("cpu", torch.long)
    if not ((m == 0) | (m == 1)).all():
        raise ValueError(f"attention_mask must hold 0 and 1 only; got values {sorted(set(m.unique().tolist()))}")
    n = m.sum(1)
    bad = [r for r in range(B) if n[r] == 0 or not m[r, T - int(n[r]):].all()]
    if bad:
        raise ValueError(f"attention_mask row {bad[0]} is not left padding (0s, then 1s through the last position, at least "
                         f"one token): {m[bad[0]].tolist()}; the metric reads each row's last position")
    return [T - int(k) for k in n]


def _token_labels(tokens, shape: torch.Size, starts: list[int]) -> list[list[str]] | None:
    """Each pair's position labels, its own tokens only; `tokens`: None, T labels (B = 1), or B
    lists, each of T labels or of its pair's own length. Raises on any other count."""
    if tokens is None:
        return None
    B, T = shape
    rows = [tokens] if B == 1 and not (len(tokens) and isinstance(tokens[0], (list, tuple))) else list(tokens)
    if len(rows) != B:
        raise ValueError(f"tokens must hold one list of labels per pair, [B] = [{B}] lists; got {len(rows)}")
    out = []
    for r, (row, start) in enumerate(zip(rows, starts)):
        row = [str(x) for x in row]
        row = row[start:] if len(row) == T else row
        if len(row) != T - start:
            where = "tokens" if B == 1 else f"tokens[{r}]"
            raise ValueError(f"{where} must label the pair's {T - start} tokens (or all T = {T} positions); got {len(row)} labels")
        out.append(row)
    return out


def _check_answers(model, answers, B: int) -> None:
    """Raise unless `answers` is None or (clean, corrupt) token ids in the model's vocabulary,
    each one id or [B] ids; before any forward runs."""
    if answers is None:
        return
    if not isinstance(answers, (tuple, list)) or len(answers) != 2:
        raise ValueError(f"answers must be (clean answer, corrupt answer) token ids; got {answers!r}")
    head = getattr(as_module(model), "get_output_embeddings", lambda: None)()
    V = getattr(getattr(head, "weight", None), "shape", (None,))[0]  # unknown: no range check
    for which, x in zip(("clean", "corrupt"), answers):
        t = torch.as_tensor(x)
        if t.is_floating_point() or t.is_complex() or t.dim() > 1 or t.numel() not in (1, B):
            raise ValueError(f"answers: the {which} answer must be one token id or [B] = [{B}] of them; got {x!r}")
        if V is not None and ((t < 0) | (t >= V)).any():
            raise ValueError(f"answers: the {which} answer {t.tolist()} is not a token id in [0, {V})")


def _answer_pair(answers, last: dict, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean answers [B], corrupt answers [B]): given, or each run's argmax at the last position."""
    if answers is None:
        return last["clean"].argmax(-1), last["corrupt"].argmax(-1)
    return tuple(torch.as_tensor(x, dtype=torch.long).expand(B).clone() for x in answers)


def _values_and_grads(model, ids, names, layers, pick, attention_mask=None) -> tuple[dict, dict, tuple]:
    """The base run: {(layer, site): value} of one forward with autograd, {(layer, site):
    d sum_b (logit[b, a_b] - logit[b, b_b]) / d value} from one backward (zeros where a value
    does not reach the metric), and the answers (a [B], b [B]) = pick(last logits [B, vocab]).
    The embedding output is made to require grad, so frozen parameters (pyvene freezes them) do
    not cut the graph."""
    emb = as_module(model).get_input_embeddings()
    handle = emb.register_forward_hook(lambda m, args, out: out if out.requires_grad else out.detach().requires_grad_())
    try:
        with torch.enable_grad(), capture(model, sites=names, layers=layers, detach=False, clone=False) as cache:
            logits = model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits[:, -1].float()
            a, b = pick(logits.detach())
            rows = torch.arange(ids.shape[0])
            metric = (logits[rows, a] - logits[rows, b]).sum()
            keys = [(L, n) for L in layers for n in names]
            values = [cache[key][0] for key in keys]
            grads = torch.autograd.grad(metric, values, allow_unused=True)
    finally:
        handle.remove()
    return (
        {key: v.detach() for key, v in zip(keys, values)},
        {key: torch.zeros_like(v) if g is None else g for key, v, g in zip(keys, values, grads)},
        (a, b),
    )


def _verify(model, res: TraceResult, clean_ids, corrupt_ids, patch: str, k: int, batch_size: int) -> dict:
    """Activation-patching scores of `res`'s top k cells (one pair), with `causal_trace`'s
    machinery: {Cell: score}, same normalisation and sign convention as `res`."""
    cells = res.top(k)
    base_ids, source_ids = (corrupt_ids, clean_ids) if patch == CLEAN_INTO_CORRUPT else (clean_ids, corrupt_ids)
    names = tuple(dict.fromkeys(c.site for c in cells))
    positions = sorted({c.position for c in cells if not site(c.site).has_time})
    with torch.no_grad():
        source = _capture(model, source_ids, names, tuple(dict.fromkeys(c.layer for c in cells)), positions)
        d_base = res.corrupt_diff if patch == CLEAN_INTO_CORRUPT else res.clean_diff
        out = {}
        for batch in _batches(cells, batch_size):
            d = _restored(model, base_ids, batch, source, base_ids.shape[1], res.answers)
            for cell, v in zip(batch, d.tolist()):
                frac = (v - d_base) / (res.clean_diff - res.corrupt_diff)
                out[cell] = frac if patch == CLEAN_INTO_CORRUPT else -frac
    return {c: out[c] for c in cells}  # largest |estimate| first


class Agreement(NamedTuple):
    """How an attribution-patching result ranks the cells of an activation-patching one, over
    the cells both score (NaN left out): Pearson and Spearman correlations of the scores, and the
    recall of activation patching's top `top` cells (by |score|) among AtP's top `within`."""

    cells: int
    pearson: float
    spearman: float
    recall: float


def agreement(atp: TraceResult, trace: TraceResult, *, top: int = 10, within: int = 20) -> dict[str, Agreement]:
    """{site: Agreement} per site of both results, and "all" over every cell."""
    out = {}
    for name in (*[n for n in atp.sites if n in trace.sites], "all"):
        names = [n for n in atp.sites if n in trace.sites] if name == "all" else [name]
        x = torch.cat([atp.scores[n].flatten() for n in names]).double()
        y = torch.cat([trace.scores[n].flatten() for n in names]).double()
        ok = ~(x.isnan() | y.isnan())
        x, y = x[ok], y[ok]
        want = set(y.abs().argsort(descending=True)[:top].tolist())
        got = set(x.abs().argsort(descending=True)[:within].tolist())
        out[name] = Agreement(int(ok.sum()), _pearson(x, y), _pearson(_ranks(x), _ranks(y)), len(want & got) / max(1, len(want)))
    return out


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else float("nan")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks with ties averaged (as Spearman's correlation takes them)."""
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]
