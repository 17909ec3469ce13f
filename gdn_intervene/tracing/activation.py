"""Causal tracing (activation patching) over GDN sites, batched: every (layer, position) cell of a
site is one row of one forward pass (in batches of `batch_size` rows), not one forward per cell.

For each cell, the corrupted prompt runs with that site's value at that (layer, position)
restored from the clean run. The score is the restored fraction of the logit difference
between the clean answer and the corrupted answer at the last position:

    score = (d_restored - d_corrupt) / (d_clean - d_corrupt),   d = logit[clean] - logit[corrupt]

1 = fully restored, 0 = no effect. A trace's hooks act on its own thread's forwards only, so
concurrent traces of one model each get their single-threaded result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..hooking import scope
from ..hooking.capture import capture
from ..hooking.edit import intervene, state_at
from ..hooking.locate import gdn_layer, select_layers
from ..sites import TRACE_SITES, site
from . import inputs, sweep
from .result import ACTIVATION, CLEAN_INTO_CORRUPT, Cell, SameAnswerError, TraceResult, check_span

__all__ = ["causal_trace", "logit_diff", "patch_scores", "site_values"]


def causal_trace(
    model: nn.Module,
    clean_ids: torch.Tensor,
    corrupt_ids: torch.Tensor,
    *,
    sites: Sequence[str] = TRACE_SITES,
    layers: Sequence[int] | None = None,
    answers: tuple[int, int] | None = None,
    tokens: list[str] | None = None,
    batch_size: int = 256,
    progress: bool = False,
    process_group=None,
) -> TraceResult:
    """Restore each site at each (GDN layer, position) of the corrupted run; see module doc.

    clean_ids, corrupt_ids: [1, T] (equal lengths). layers: GDN layer indices to sweep (default
    all; a single layer's state at every position is T - 1 forwards). answers: (clean, corrupt)
    token ids, default the argmax of each run's last position. tokens: T position labels for
    figures. Returns scores [L, T] per site, L the layers in the order given. `process_group`: a `torch.distributed` group whose ranks each hold a
    replica of the model and call this with the same arguments: the cells are split between the
    ranks and the result, gathered, is the same on every rank (and equal to one process's).
    Raises before any sweep where the answers are equal (`SameAnswerError`) or the corruption
    leaves their logit difference unchanged (`ZeroSpanError`).
    """
    inputs.check_pair(clean_ids, corrupt_ids, "causal tracing", one=True)
    names = inputs.check_sites(sites)
    layers = tuple(select_layers(model, layers))
    inputs.check_answers(answers, 1, inputs.vocabulary(model, "causal tracing"))
    labels = inputs.token_labels(tokens, clean_ids.shape, [0])
    model = scope.dispatched(model)  # a lazy nnsight model's real weights, before its first plain call
    with torch.no_grad():
        answers, d_clean, d_corrupt = _metric_ends(model, clean_ids, corrupt_ids, answers)
        differ = (clean_ids[0] != corrupt_ids[0]).nonzero().flatten().tolist()
        if not differ:
            raise ValueError("the clean and corrupted prompts are the same tokens; nothing to restore")
        T = clean_ids.shape[1]
        # States before the first corrupted token are the same in both runs: only later ones count.
        clean = site_values(model, clean_ids, names, layers, range(differ[0], T - 1))
        corrupt = site_values(model, corrupt_ids, tuple(n for n in names if site(n).has_time), layers, ())
        result = TraceResult(
            names, layers, labels[0] if labels else [str(int(t)) for t in clean_ids[0]], answers, d_clean, d_corrupt,
            scores={n: torch.full((len(layers), T), float("nan")) for n in names}, corrupted_positions=tuple(differ),
            method=ACTIVATION, patch=CLEAN_INTO_CORRUPT, token_ids=(tuple(clean_ids[0].tolist()), tuple(corrupt_ids[0].tolist())),
        )  # fmt: skip
        cells = []
        for cell, same in _cells(names, layers, T, clean, corrupt):
            if same:  # the clean value equals the corrupted one: restoring it changes nothing
                result.scores[cell.site][layers.index(cell.layer), cell.position] = 0.0
            else:
                cells.append(cell)
        scores = patch_scores(model, corrupt_ids, cells, clean, answers, d_corrupt, d_clean - d_corrupt,
                              batch_size=batch_size, progress=progress, process_group=process_group)  # fmt: skip
        for cell, v in scores.items():
            result.scores[cell.site][layers.index(cell.layer), cell.position] = v
    return result


def _metric_ends(model, clean_ids, corrupt_ids, answers) -> tuple[tuple[int, int], float, float]:
    """((clean answer, corrupt answer), d_clean, d_corrupt), refused where nothing can be restored."""
    if answers is None:
        answers = tuple(
            int(model(input_ids=x, use_cache=False).logits[0, -1].argmax()) for x in (clean_ids, corrupt_ids)
        )
    answers = tuple(int(torch.as_tensor(a).reshape(-1)[0]) for a in answers)
    if answers[0] == answers[1]:
        raise SameAnswerError(answers[0])
    d_clean, d_corrupt = (float(logit_diff(model, x, answers)) for x in (clean_ids, corrupt_ids))
    check_span(d_clean, d_corrupt)
    return answers, d_clean, d_corrupt


def _cells(names, layers, T: int, clean: dict, corrupt: dict) -> Iterable[tuple[Cell, bool]]:
    """(cell, whether its clean value equals the corrupted one) for every cell that can reach the
    last logits (the final state cannot: its column stays NaN)."""
    for n in names:
        timed = site(n).has_time
        for L in layers:
            for p in range(T if timed else T - 1):
                same = torch.equal(clean[(L, n)][0, p], corrupt[(L, n)][0, p]) if timed else p not in clean[(L, n)]
                yield Cell(n, L, p), same


def logit_diff(model: nn.Module, ids: torch.Tensor, answers: tuple[int, int]) -> torch.Tensor:
    """[N] logit[clean answer] - logit[corrupt answer] at the last position, in float32."""
    last = model(input_ids=ids, use_cache=False).logits[:, -1].float()
    return last[:, answers[0]] - last[:, answers[1]]


def site_values(model, ids, names, layers, state_positions) -> dict:
    """{(layer, site): value [1, ...]} of one run; for `state`, {p: state [1, HV, K, V] after
    token p} for each p of `state_positions` (the prefill split there)."""
    state_positions = tuple(state_positions)
    if not names:
        return {}
    split = state_positions and not all(site(n).has_time for n in names)
    with capture(model, sites=names, layers=layers) as cache:
        with state_at(model, state_positions, layers) if split else contextlib.nullcontext():
            model(input_ids=ids, use_cache=False)
    out = {}
    for L in layers:
        for n in names:
            if site(n).has_time:
                out[(L, n)] = cache[L, n][0]
            else:
                out[(L, n)] = {
                    f.position: v for v, f in zip(cache[L, n], cache.firings(L)) if f.position in state_positions
                }
    return out


def patch_scores(model, base_ids, cells: list[Cell], source: dict, answers, d_base: float, span: float, *,
                 batch_size: int = 256, progress: bool = False, process_group=None) -> dict[Cell, float]:  # fmt: skip
    """{cell: (d_patched - d_base) / span}: the base run with each cell's value taken from the
    source run (`source`, as `site_values` gives it), in batches of rows; cells split between the
    ranks of `process_group`, if given, and gathered."""
    mine = sweep.share(list(_batches(cells, batch_size)), process_group)  # whole batches: the same rows as one process
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(map(len, mine)), desc="causal trace", unit="cell")
    out = {}
    for batch in mine:
        d = _patched(model, base_ids, batch, source, answers)
        out.update(zip(batch, ((d - d_base) / span).tolist()))
        if bar:
            bar.update(len(batch))
    if bar:
        bar.close()
    return sweep.gather(out, cells, process_group)


def _batches(cells: list[Cell], batch_size: int):
    """Rows of one forward each: token sites of any site and layer together; a state restore
    needs the prefill split at its position, which applies to the whole batch, so state cells
    are grouped by position."""
    groups: dict = {}
    for cell in cells:
        groups.setdefault("tokens" if site(cell.site).has_time else cell.position, []).append(cell)
    for group in groups.values():
        yield from (group[i : i + batch_size] for i in range(0, len(group), batch_size))


def _patched(model, base_ids, cells: list[Cell], source, answers) -> torch.Tensor:
    """Logit differences [N] of N base rows, row i patched at cells[i]."""
    T = base_ids.shape[1]
    ids = base_ids.expand(len(cells), T)
    rows: dict = {}
    for i, c in enumerate(cells):
        rows.setdefault((c.layer, c.site), []).append((i, c.position))
    edits = {}
    for (L, n), rp in rows.items():
        r, pos = (torch.tensor(x, dtype=torch.long) for x in zip(*rp))
        value = source[(L, n)]
        if site(n).has_time:
            edits[(L, n)] = _token_patch(r, pos, value)
        else:
            p = rp[0][1]
            edits[(L, n)] = _state_patch(r, value[p][0], gdn_layer(model, L), p)
    with intervene(model, edits):
        if not site(cells[0].site).has_time:
            with state_at(model, [cells[0].position], sorted({c.layer for c in cells})):  # split after that position
                return logit_diff(model, ids, answers)
        return logit_diff(model, ids, answers)


def _token_patch(rows, pos, source):
    """Site output [N, T, ...]: row rows[i] gets the source value at position pos[i]."""

    def edit(x):
        x = x.clone()
        x[rows, pos] = source[0, pos]
        return x

    return edit


def _state_patch(rows, source_state, layer, position: int):
    """The state after `position` (asked of the layer: `GDNLayer.firing`): rows `rows` get the
    source state [HV, K, V]; the other firings pass."""

    def edit(S):
        firing = layer.firing
        if firing is None or firing.position != position:
            return None
        S = S.clone()
        S[rows] = source_state
        return S

    return edit
