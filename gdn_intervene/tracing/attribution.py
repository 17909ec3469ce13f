"""Attribution patching (AtP): every cell `causal_trace` would patch, estimated from a few forwards
and backwards instead of one forward per cell, the recurrent state after every position included
(the adjoint scan `ops.state_patching_scores`); with `steps=K`, integrated gradients: the gradient
averaged over K points of a path from the base run to the source run.

Paths (`path=`):
- "inputs" (EAP-IG): the residual stream entering the first decoder layer, h(a) = h_base +
  a (h_source - h_base); every site's gradient is read in that one run. K forwards and backwards
  for every cell at once.
- "activations": each site's own value, v(a) = v_base + a (v_source - v_base) at that site alone
  (one row per site and layer and point, batched); the state's cells interpolate their layer's
  kernel inputs (q, k, v, beta, decay) together. K forwards and backwards per (site, layer), as rows.

Points: a_k = k / K, k = 0..K-1 (the left Riemann sum: the first point is the base run itself, so
`steps=1` is first-order AtP, bit for bit).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import _compat, ops
from ..hooking import scope
from ..hooking.capture import capture
from ..hooking.edit import intervene
from ..hooking.locate import as_module, decoder_layers, select_layers
from ..sites import TRACE_SITES, site
from . import inputs
from .activation import patch_scores, site_values
from .paths import ACTIVATIONS, DEFAULT_PATH, DEFAULT_STEPS, INPUTS, path_points
from .result import ATTRIBUTION, CLEAN_INTO_CORRUPT, CORRUPT_INTO_CLEAN, Cell, SameAnswerError, TraceResult, check_span

__all__ = [
    "ACTIVATIONS",
    "INPUTS",
    "RUN_SITES",
    "attribution_patching",
    "path_points",
    "values_and_grads",
    "verify_top",
]

# What the state's adjoint scan reads of each layer (ops.DeltaRuleRun's fields, in order).
RUN_SITES = ("q", "k", "v", "beta", "decay")


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
    steps: int = DEFAULT_STEPS,
    path: str = DEFAULT_PATH,
    process_group=None,
    grad_batch_size: int | None = None,
):
    """Attribution patching (AtP): every cell `causal_trace` would patch, estimated from a few
    forwards and backwards, the state after every position included (module doc: the math, the
    paths, the points). Same sites, layers, normalisation and NaN rule as `causal_trace`.

    A cell's score: est = (source - base) . d metric / d value (metric d = logit[clean answer] -
    logit[corrupt answer] at the last position), averaged over `steps` points of `path`, over the
    span d_clean - d_corrupt: the fraction restored (`patch="clean_into_corrupt"`, default) or,
    negated, removed (`"corrupt_into_clean"`). `verify=K` re-runs activation patching on the K
    cells of largest |estimate| into `result.verified` (split between the ranks of
    `process_group`, if given).

    clean_ids, corrupt_ids: [B, T] prompt pairs. answers: (clean, corrupt) token ids, ints or [B]
    tensors; default each run's argmax. tokens: position labels (T strings, or B lists).
    attention_mask: [B, T] (0: left padding), shared by both prompts of a pair; each row's result
    covers its own tokens, as if traced alone. batch_size: rows per forward of `verify`.
    grad_batch_size: rows per forward + backward of the path points (default B: one point per
    run, the memory of one forward + backward; more trades memory for time).
    Returns a `TraceResult` (B = 1) or a list of B. Refuses, before the backward, equal answers
    (`SameAnswerError`) or an unchanged logit difference (`ZeroSpanError`), naming the pair. Runs
    outside inference mode and reentrant checkpointing for its own call (both leave no gradient).
    """
    if torch.is_inference_mode_enabled():
        return _outside_inference_mode(attribution_patching, model, clean_ids, corrupt_ids, sites=sites,
                                       layers=layers, answers=answers, tokens=tokens, patch=patch, verify=verify,
                                       batch_size=batch_size, attention_mask=attention_mask, steps=steps, path=path,
                                       process_group=process_group, grad_batch_size=grad_batch_size)  # fmt: skip
    job = _job(
        model, clean_ids, corrupt_ids, sites, layers, answers, tokens, patch, verify, attention_mask, steps, path
    )
    model = scope.dispatched(model)  # a lazy nnsight model's real weights, before its first plain call
    with _compat.checkpoint.reentrant_checkpointing_off(as_module(model)):
        source, source_last, h_source = _source_run(model, job)
        base, grads, last, (a, b), h_base = _base_run(model, job, source_last, answers)
        grads = _Gradients(job, base, source).add_run(0.0, base, grads)  # a_0 = 0: the base run
        grad_rows = job.clean_ids.shape[0] if grad_batch_size is None else grad_batch_size
        for alpha, token_grads, state_runs in _path_runs(model, job, base, source, h_base, h_source, a, b, grad_rows):
            grads.add(alpha, token_grads, state_runs)
    scores = _scores(job, source, base, grads, last, a, b)
    return _results(model, job, scores, last, a, b, verify, batch_size, process_group)


def _outside_inference_mode(fn, model, *tensors, **kwargs):
    """fn(model, *tensors, **kwargs) with inference mode off and copies of the tensor inputs:
    AtP takes a backward, which inference mode rules out, and autograd cannot save inference
    tensors."""
    copy = lambda x: x.clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
    kwargs = {k: tuple(copy(a) for a in v) if k == "answers" and v is not None else copy(v) for k, v in kwargs.items()}
    with torch.inference_mode(False):
        return fn(model, *(copy(t) for t in tensors), **kwargs)


@dataclass
class _Job:
    """One attribution-patching call, checked: the sites, layers, pairs and their padding."""

    names: tuple[str, ...]
    layers: tuple[int, ...]
    clean_ids: torch.Tensor  # [B, T]
    corrupt_ids: torch.Tensor
    mask: torch.Tensor | None
    starts: list[int]  # each pair's first token
    labels: list[list[str]] | None
    patch: str
    steps: int = 1
    path: str = INPUTS

    @property
    def base_source(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(base ids, source ids): the run patched and the run its values come from."""
        if self.patch == CLEAN_INTO_CORRUPT:
            return self.corrupt_ids, self.clean_ids
        return self.clean_ids, self.corrupt_ids

    @property
    def timed(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if site(n).has_time)

    @property
    def run_sites(self) -> tuple[str, ...]:
        """The sites each run records: the token sites, and what the state's adjoint scan reads."""
        states = len(self.timed) < len(self.names)
        return tuple(dict.fromkeys((*self.timed, *((*RUN_SITES, "recurrence") if states else ()))))


def _job(model, clean_ids, corrupt_ids, sites, layers, answers, tokens, patch, verify, mask, steps, path) -> _Job:
    """Every check, before any forward."""
    inputs.check_pair(clean_ids, corrupt_ids, "attribution patching", one=False)
    if patch not in (CLEAN_INTO_CORRUPT, CORRUPT_INTO_CLEAN):
        raise ValueError(f"patch must be {CLEAN_INTO_CORRUPT!r} or {CORRUPT_INTO_CLEAN!r}; got {patch!r}")
    if isinstance(verify, bool) or not isinstance(verify, int) or verify < 0:
        raise ValueError(f"verify must be an int >= 0 (cells to re-check by activation patching); got {verify!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1 (points of the path the gradient is averaged over); got {steps!r}")
    if path not in (INPUTS, ACTIVATIONS):
        raise ValueError(f"path must be {INPUTS!r} or {ACTIVATIONS!r}; got {path!r}")
    if steps > 1 and path == INPUTS and getattr(_text_config(as_module(model)), "ple_layer_ids", None):
        raise ValueError(
            "path='inputs' interpolates the residual stream entering the first decoder layer, and this model also "
            "feeds token ids into later layers (per-layer embeddings, `ple_layer_ids`): use path='activations'"
        )
    names = inputs.check_sites(sites)
    chosen = tuple(select_layers(model, layers))
    inputs.check_answers(answers, clean_ids.shape[0], inputs.vocabulary(model, "attribution patching"))
    starts = inputs.left_padding(mask, clean_ids.shape)  # [B]: each row's first token
    labels = inputs.token_labels(tokens, clean_ids.shape, starts)
    if clean_ids.shape[0] == 1 and starts[0]:
        # HF masks padding only in batches (B > 1): a single padded pair runs as itself
        clean_ids, corrupt_ids, mask, starts = clean_ids[:, starts[0] :], corrupt_ids[:, starts[0] :], None, [0]
    return _Job(names, chosen, clean_ids, corrupt_ids, mask, starts, labels, patch, steps, path)


def _text_config(model):
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _source_run(model, job: _Job) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
    """The source run, no graph: ({(layer, site): value}, last logits [B, V] in float32, the
    residual entering the first decoder layer where the inputs path needs it)."""
    _, source_ids = job.base_source
    with (
        torch.no_grad(),
        capture(model, sites=job.run_sites, layers=job.layers) as cache,
        _first_input(model, job) as h,
    ):
        last = model(input_ids=source_ids, attention_mask=job.mask, use_cache=False).logits[:, -1].float()
    values = {key: cache[key][0] for key in ((L, n) for L in job.layers for n in job.run_sites)}
    return values, last, (h[0] if h else None)


def _base_run(model, job: _Job, source_last, answers):
    """The base run with its backward: (values, gradients, {"clean", "corrupt"}: last logits
    [B, V], (clean answers [B], corrupt answers [B]), the residual entering the first decoder
    layer or None). The answers are settled by the base run's logits, and a pair with equal
    answers or a zero span is refused, before the backward."""
    last = {}
    names = ("corrupt", "clean") if job.patch == CLEAN_INTO_CORRUPT else ("clean", "corrupt")

    def pick(base_last):
        last.update(zip(names, (base_last, source_last)))
        B = base_last.shape[0]
        a, b = inputs.answer_pair(answers, last, B)
        same = (a == b).nonzero().flatten().tolist()
        if same:
            raise SameAnswerError(int(a[same[0]]), pair=same[0] if B > 1 else None)
        rows = torch.arange(B)
        d = {k: v[rows, a] - v[rows, b] for k, v in last.items()}
        for r in range(B):
            check_span(float(d["clean"][r]), float(d["corrupt"][r]), pair=r if B > 1 else None)
        return a, b

    base_ids, _ = job.base_source
    with _first_input(model, job) as h:
        base, grads, (a, b) = values_and_grads(model, base_ids, job.run_sites, job.layers, pick, job.mask)
    return base, grads, last, (a, b), (h[0] if h else None)


@contextlib.contextmanager
def _first_input(model, job: _Job, replace: Callable | None = None) -> Iterator[list]:
    """Record (and with `replace(h) -> h'`, replace) the residual h entering the first decoder
    layer, for the inputs path; a no-op otherwise."""
    if job.steps == 1 or job.path != INPUTS:
        yield []
        return
    seen = []

    def pre(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        seen.append(h.detach())
        if replace is None:
            return None
        new = replace(h)
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    handle = decoder_layers(model)[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def values_and_grads(model, ids, names, layers, pick: Callable, attention_mask=None) -> tuple[dict, dict, tuple]:
    """One run with autograd: {(layer, site): value}, {(layer, site): d sum_b (logit[b, a_b] -
    logit[b, b_b]) / d value} from one backward (zeros where a value does not reach the metric),
    and the answers (a [B], b [B]) = pick(last logits [B, vocab]). The embedding output is made
    to require grad, so frozen parameters (pyvene freezes them) do not cut the graph."""
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


# ------------------------------------------------------------------ integrated gradients


class _Gradients:
    """The metric's gradient averaged over the path's points: per token site and layer, the
    gradient [B, T, ...]; per layer, the state scores <mu, S^source - S^base> [B, HV, T] (the
    adjoint taken along each point's run). `add` takes one point's (or part of one's) gradients."""

    def __init__(self, job: _Job, base: dict, source: dict):
        self.job, self.base, self.source = job, base, source
        self.token: dict[tuple, list] = {}
        self.state: dict[int, list] = {}

    def add(self, alpha: float, token_grads: dict, state_runs: dict) -> _Gradients:
        """One point's gradients: {(layer, site): d metric / d value} of token sites, and {layer:
        (d metric / d o, {(layer, site): value} of the run's kernel inputs)} for the state."""
        for key, g in token_grads.items():
            self.token.setdefault(key, []).append(g)
        for L, (delta, values) in state_runs.items():
            self.state.setdefault(L, []).append(self._state(L, delta, values, alpha))
        return self

    def add_run(self, alpha: float, values: dict, grads: dict) -> _Gradients:
        """A run in which every site of `job` was read (the base run, the inputs path's runs)."""
        states = len(self.job.timed) < len(self.job.names)
        token = {(L, n): grads[L, n] for L in self.job.layers for n in self.job.timed}
        return self.add(alpha, token, {L: (grads[L, "recurrence"], values) for L in self.job.layers} if states else {})

    def _state(self, L: int, delta, values: dict, alpha: float) -> torch.Tensor:
        base, source = (ops.DeltaRuleRun(*(v[L, s] for s in RUN_SITES)) for v in (self.base, self.source))
        along = None if alpha == 0 else ops.DeltaRuleRun(*(values[L, s] for s in RUN_SITES))
        dtype = torch.float64 if self.base[L, "v"].dtype == torch.float64 else torch.float32
        return ops.state_patching_scores(base, source, delta, along=along, dtype=dtype)

    def token_grad(self, key) -> torch.Tensor:
        """The mean gradient at (layer, site), float64 [B, T, ...]."""
        gs = self.token[key]
        return gs[0].double() if len(gs) == 1 else torch.stack([g.double() for g in gs]).mean(0)

    def state_scores(self, L: int) -> torch.Tensor:
        """The state after every position of layer L: the mean score summed over heads, float64 [B, T]."""
        st = self.state[L]
        return st[0].sum(1).double() if len(st) == 1 else torch.stack([x.double() for x in st]).mean(0).sum(1)


def _path_runs(model, job: _Job, base, source, h_base, h_source, a, b, batch_size: int):
    """(a_k, token-site gradients, state runs) of every path point after the base run (k >= 1),
    each [B, ...] (`_Gradients.add`)."""
    if job.steps == 1:
        return
    runs = _input_path if job.path == INPUTS else _activation_path
    yield from runs(model, job, base, source, h_base, h_source, a, b, batch_size)


def _rows(job: _Job, n: int, a, b):
    """The base prompts repeated for n blocks of rows: (ids [n*B, T], mask or None, pick)."""
    base_ids, _ = job.base_source
    mask = None if job.mask is None else job.mask.repeat(n, 1)
    return base_ids.repeat(n, 1), mask, lambda last: (a.repeat(n), b.repeat(n))


def _blocks(items: list, B: int, batch_size: int) -> Iterator[list]:
    per = max(1, batch_size // B)  # blocks of B rows per forward + backward (memory grows with them)
    for i in range(0, len(items), per):
        yield items[i : i + per]


def _input_path(model, job: _Job, base, source, h_base, h_source, a, b, batch_size: int):
    """EAP-IG's path: the residual entering the first decoder layer interpolated, every site read
    in each run."""
    B = job.clean_ids.shape[0]
    delta = h_source - h_base
    for alphas in _blocks(path_points(job.steps)[1:], B, batch_size):
        n = len(alphas)
        al = torch.tensor(alphas, dtype=h_base.dtype, device=h_base.device).repeat_interleave(B)
        reps = (n, *[1] * (h_base.dim() - 1))
        h = (h_base.repeat(reps) + al.view(-1, *reps[1:]) * delta.repeat(reps)).requires_grad_()
        ids, mask, pick = _rows(job, n, a, b)
        with _first_input(model, job, lambda _, h=h: h):
            values, grads, _ = values_and_grads(model, ids, job.run_sites, job.layers, pick, mask)
        for i, alpha in enumerate(alphas):
            rows = slice(i * B, (i + 1) * B)
            values_i, grads_i = ({k: v[rows] for k, v in d.items()} for d in (values, grads))
            token = {(L, n): grads_i[L, n] for L in job.layers for n in job.timed}
            states = len(job.timed) < len(job.names)
            yield alpha, token, ({L: (grads_i[L, "recurrence"], values_i) for L in job.layers} if states else {})


def _activation_path(model, job: _Job, base, source, h_base, h_source, a, b, batch_size: int):
    """Each site's own value interpolated, alone (one block of B rows per (site, layer) and
    point); the state's cells interpolate their layer's kernel inputs together."""
    B = job.clean_ids.shape[0]
    states = len(job.timed) < len(job.names)
    groups = [(L, (n,)) for L in job.layers for n in job.timed] + [(L, RUN_SITES) for L in job.layers if states]
    todo = [(g, alpha) for alpha in path_points(job.steps)[1:] for g in groups]
    for chunk in _blocks(todo, B, batch_size):
        spans: dict = {}  # (layer, site) -> [(block, a)]
        for i, ((L, names), alpha) in enumerate(chunk):
            for s in names:
                spans.setdefault((L, s), []).append((i, alpha))
        edits = {key: _interpolate(base[key], source[key], blocks, B) for key, blocks in spans.items()}
        ids, mask, pick = _rows(job, len(chunk), a, b)
        with intervene(model, edits):
            values, grads, _ = values_and_grads(model, ids, job.run_sites, job.layers, pick, mask)
        for i, ((L, names), alpha) in enumerate(chunk):
            rows = slice(i * B, (i + 1) * B)
            if names == RUN_SITES and states:
                run = {(L, s): values[L, s][rows] for s in RUN_SITES}
                yield alpha, {}, {L: (grads[L, "recurrence"][rows], run)}
            else:
                yield alpha, {(L, names[0]): grads[L, names[0]][rows]}, {}


def _interpolate(base: torch.Tensor, source: torch.Tensor, blocks: list, B: int) -> Callable:
    """A site edit: rows of block i get base + a_i (source - base) ([B, ...] each)."""

    def edit(x):
        x = x.clone()
        for i, alpha in blocks:
            x[i * B : (i + 1) * B] = base + alpha * (source - base)
        return x

    return edit


def _scores(job: _Job, source: dict, base: dict, grads: _Gradients, last: dict, a, b) -> dict[str, torch.Tensor]:
    """{site: [B, L, T] float64}: each cell's estimate over the pair's span (signed by `patch`);
    NaN where a cell cannot reach the last logits (the final state)."""
    B, T = job.clean_ids.shape
    rows = torch.arange(B)
    d = {k: v[rows, a] - v[rows, b] for k, v in last.items()}  # [B]
    sign = 1.0 if job.patch == CLEAN_INTO_CORRUPT else -1.0
    scale = sign / (d["clean"] - d["corrupt"]).double()  # [B]
    scores = {n: torch.full((B, len(job.layers), T), float("nan"), dtype=torch.float64) for n in job.names}
    for i, L in enumerate(job.layers):
        for n in job.timed:
            diff = source[L, n].double() - base[L, n].double()
            scores[n][:, i] = (diff * grads.token_grad((L, n))).reshape(B, T, -1).sum(-1) * scale[:, None]
        if len(job.timed) < len(job.names):
            st = grads.state_scores(L)  # [B, T]
            for n in job.names:
                if not site(n).has_time:
                    scores[n][:, i, : T - 1] = st[:, : T - 1] * scale[:, None]
    return scores


def _results(model, job: _Job, scores: dict, last: dict, a, b, verify: int, batch_size: int, process_group):
    """One TraceResult per pair (its own tokens only), verified where asked."""
    B, T = job.clean_ids.shape
    rows = torch.arange(B)
    d = {k: v[rows, a] - v[rows, b] for k, v in last.items()}
    results = []
    for r in range(B):
        own = slice(job.starts[r], T)  # the pair's own tokens
        clean_r, corrupt_r = job.clean_ids[r : r + 1, own], job.corrupt_ids[r : r + 1, own]
        differ = (clean_r[0] != corrupt_r[0]).nonzero().flatten()
        res = TraceResult(
            job.names, job.layers, job.labels[r] if job.labels else [str(int(t)) for t in clean_r[0]],
            (int(a[r]), int(b[r])), float(d["clean"][r]), float(d["corrupt"][r]),
            scores={n: s[r, :, own].float() for n, s in scores.items()}, corrupted_positions=tuple(differ.tolist()),
            method=ATTRIBUTION, patch=job.patch, token_ids=(tuple(clean_r[0].tolist()), tuple(corrupt_r[0].tolist())),
            steps=job.steps,
        )  # fmt: skip
        if verify:
            res.verified = verify_top(
                model, res, clean_r, corrupt_r, verify, batch_size=batch_size, process_group=process_group
            )
        results.append(res)
    return results[0] if B == 1 else results


def verify_top(
    model, res: TraceResult, clean_ids, corrupt_ids, k: int, *, batch_size: int = 256, process_group=None
) -> dict:
    """Confirm an estimate: activation-patching scores of `res`'s top k cells by |score| (one
    pair, clean_ids and corrupt_ids [1, T] as `res` was computed from), with `causal_trace`'s
    machinery: {Cell: score}, same normalisation and sign convention as `res`, largest |estimate|
    first. What `attribution_patching(..., verify=k)` stores in `result.verified`."""
    cells: list[Cell] = res.top(k)
    clean_into_corrupt = res.patch == CLEAN_INTO_CORRUPT
    base_ids, source_ids = (corrupt_ids, clean_ids) if clean_into_corrupt else (clean_ids, corrupt_ids)
    names = tuple(dict.fromkeys(c.site for c in cells))
    positions = sorted({c.position for c in cells if not site(c.site).has_time})
    layers = tuple(dict.fromkeys(c.layer for c in cells))
    with torch.no_grad():
        source = site_values(model, source_ids, names, layers, positions)
        d_base = res.corrupt_diff if clean_into_corrupt else res.clean_diff
        span = res.clean_diff - res.corrupt_diff
        out = patch_scores(model, base_ids, cells, source, res.answers, d_base, span, batch_size=batch_size,
                           process_group=process_group)  # fmt: skip
    return {c: out[c] if clean_into_corrupt else -out[c] for c in cells}  # largest |estimate| first
