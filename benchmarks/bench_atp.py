#!/usr/bin/env python
"""Attribution patching (`tracing.attribution_patching`) against activation patching
(`tracing.causal_trace`): how well it ranks the cells, and what it costs at real model sizes.

    python benchmarks/bench_atp.py agreement            # the agreement table per path and K (minutes, CPU)
    python benchmarks/bench_atp.py sizes --T 128 512    # real dimensions (tens of minutes on 2 cores)
    python benchmarks/bench_atp.py pipeline --T 512     # find (AtP-IG) then confirm (verify 50) at real sizes
    python benchmarks/bench_atp.py cost --T 128         # each path and K over one forward + backward, real sizes
    python benchmarks/bench_atp.py table benchmarks/results/atp-agreement.json   # BENCHMARKS.md's table

Every JSON goes to out/ (untracked) unless --out says otherwise; benchmarks/results/ holds the
runs BENCHMARKS.md reports.

agreement: per prompt set, method (first order; integrated gradients along the inputs or the
activations path with K steps) and site, Pearson and Spearman correlation of AtP's estimates
with activation patching's scores over every cell both score, and the recall of activation
patching's top-10 cells (by |score|) in AtP's top 20 (`tracing.agreement`), averaged over the
set's prompt pairs; and per method its time over one forward + backward of the model on the
same pair. Sets: the demo's own pair (the bundled MQAR model, key corrupted, seed 0), the bundled
model with its key, value and query corruptions (several seeds each), and random-weight Qwen3.5
and Kimi Linear models with two corrupted positions per random prompt.

sizes: models with the GDN / KDA dimensions of the HF config classes' defaults (Qwen3.5: hidden
4096, 16 key / 32 value heads of 128; Kimi Linear: hidden 2304, 32 heads of 128; Qwen3-Next:
hidden 2048, 16 / 32 heads of 128), 4 layers (3 GDN / KDA, 1 full attention), a 32k vocabulary
instead of the real one (the unembedding is not what is measured) and, where the default MLP is
a mixture of hundreds of experts, 16 experts (Qwen3-Next) or dense MLPs (Kimi Linear): what does
not fit the machine is said in the output. Per T and dtype: one forward + backward of the
unpatched model (the baseline), attribution patching over all trace sites x GDN layers x
positions (wall time and allocator peak, as ratios to the baseline), and the time activation
patching would take for the same cells, measured on a batch of cells and extrapolated (said so).

pipeline: at real sizes, find then confirm: AtP-IG (the default steps and path) over every cell,
then activation patching of its top 50 (`verify=50`), timed, against activation patching's
measured cost per cell times the number of cells; with --full-state-layer, the full causal trace
of one layer's state too (every position), to compare the confirmed top cells with the true ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_overhead import cpu_peak_bytes, environment  # noqa: E402

import gdn_intervene as gi  # noqa: E402
from gdn_intervene import tracing  # noqa: E402
from gdn_intervene.sites import TRACE_SITES  # noqa: E402
from gdn_intervene.tracing import activation  # noqa: E402

# ------------------------------------------------------------------ agreement


def _random_pairs(model, n: int, T: int, vocab: int, seed: int):
    """n (clean [1, T], corrupt [1, T], answers) with two corrupted positions and answers that differ."""
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < n:
        clean = torch.randint(3, vocab, (1, T), generator=g)
        corrupt = clean.clone()
        pos = torch.randperm(T - 2, generator=g)[:2] + 1
        corrupt[0, pos] = torch.randint(3, vocab, (2,), generator=g)
        with torch.no_grad():
            a = model(clean).logits[0, -1].argmax()
            top = model(corrupt).logits[0, -1].topk(2).indices
        b = top[0] if top[0] != a else top[1]
        out.append((clean, corrupt, (int(a), int(b))))
    return out


def _tiny(kind: str):
    import transformers as tr

    torch.manual_seed(0)
    special = dict(vocab_size=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    layout = dict(
        num_hidden_layers=4, layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"]
    )
    if kind == "qwen3_5":
        cfg = tr.Qwen3_5TextConfig(
            **special,
            **layout,
            hidden_size=128,
            intermediate_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=32,
            linear_value_head_dim=32,
        )
        return tr.Qwen3_5ForCausalLM(cfg).eval()
    cfg = tr.KimiLinearConfig(
        **special,
        **layout,
        hidden_size=128,
        intermediate_size=256,
        mlp_layer_types=["dense"] * 4,
        num_local_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        n_group=1,
        topk_group=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=32,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=16,
        linear_num_heads=4,
        linear_head_dim=32,
    )
    return tr.KimiLinearForCausalLM(cfg).eval()


METHODS = (("inputs", 1), ("inputs", 2), ("inputs", 4), ("inputs", 8), ("inputs", 16),
           ("activations", 4), ("activations", 8), ("activations", 16))  # fmt: skip


def agreement_table(pairs_per_set: int) -> list[dict]:
    from gdn_intervene.toy import load_toy, mqar

    toy, _ = load_toy()
    gi.patch(toy)
    sets = {"the demo's pair (MQAR toy, key corrupted, seed 0)": [(*mqar.demo_prompts(0, "key")[:2], None)]}
    sets.update({
        f"MQAR toy, {kind} corrupted": [(c, x, None) for c, x, _ in (mqar.demo_prompts(s, kind) for s in range(pairs_per_set))]
        for kind in ("key", "value", "query")
    })  # fmt: skip
    rows = []
    for name, pairs in sets.items():
        rows += _agree(toy, name, pairs)
    for kind, label in (("qwen3_5", "random-weight Qwen3.5"), ("kimi", "random-weight Kimi Linear")):
        model = gi.patch(_tiny(kind))
        rows += _agree(model, f"{label}, T = 24", _random_pairs(model, pairs_per_set, 24, 512, seed=1))
    return rows


def _agree(model, name, pairs) -> list[dict]:
    per, cost = {}, {}
    for clean, corrupt, answers in pairs:
        try:
            trace = tracing.causal_trace(model, clean, corrupt, answers=answers)
        except (tracing.SameAnswerError, tracing.ZeroSpanError):
            continue
        base = _time(lambda: _fwd_bwd(model, corrupt, trace.answers), 3)
        for path, K in METHODS:
            run = lambda: tracing.attribution_patching(model, clean, corrupt, answers=trace.answers, steps=K, path=path)
            cost.setdefault((path, K), []).append(_time(run, 1) / base)
            for site, a in tracing.agreement(run(), trace).items():
                per.setdefault((path, K, site), []).append(a)
    rows = []
    for (path, K, site), stats in per.items():
        mean = lambda xs: float(torch.tensor(xs).nanmean()) if any(x == x for x in xs) else float("nan")
        rows.append(dict(set=name, path=path, steps=K, site=site, pairs=len(stats),
                         pearson=mean([s.pearson for s in stats]), spearman=mean([s.spearman for s in stats]),
                         recall=mean([s.recall for s in stats]), cost_over_fwd_bwd=mean(cost[path, K])))  # fmt: skip
        if site == "all":
            print(f"{name:<52} {path:<11} K={K:<3} pearson {rows[-1]['pearson']:6.3f}  spearman {rows[-1]['spearman']:5.2f}  "
                  f"recall {rows[-1]['recall']:5.0%}  cost {rows[-1]['cost_over_fwd_bwd']:5.1f}x fwd+bwd", flush=True)  # fmt: skip
    return rows


# ------------------------------------------------------------------ real sizes


def real_model(kind: str, dtype):
    """A random-weight model with the GDN / KDA dimensions of the HF config class's defaults (module docstring)."""
    import transformers as tr

    torch.manual_seed(0)
    common = dict(
        vocab_size=32000,
        num_hidden_layers=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    )
    if kind == "qwen3_5":
        model = tr.Qwen3_5ForCausalLM(tr.Qwen3_5TextConfig(**common))
    elif kind == "qwen3_next":
        model = tr.Qwen3NextForCausalLM(tr.Qwen3NextConfig(**common, num_experts=16))
    else:
        model = tr.KimiLinearForCausalLM(tr.KimiLinearConfig(**common, mlp_layer_types=["dense"] * 4))
    return model.to(dtype).eval()


def real_pair(T: int):
    """(clean [1, T], corrupt [1, T], answers) for the real-size runs: random tokens of the 32k
    vocabulary (seeded by T), one corrupted at T // 4, answers (5, 7)."""
    g = torch.Generator().manual_seed(T)
    clean = torch.randint(3, 32000, (1, T), generator=g)
    corrupt = clean.clone()
    corrupt[0, T // 4] = (clean[0, T // 4] + 1) % 32000
    return clean, corrupt, (5, 7)


def _fwd_bwd(model, ids, answers):
    model.zero_grad(set_to_none=True)
    last = model(input_ids=ids, use_cache=False).logits[:, -1].float()
    (last[0, answers[0]] - last[0, answers[1]]).backward()
    model.zero_grad(set_to_none=True)


def sizes(kinds, Ts, dtypes, reps: int) -> list[dict]:
    rows = []
    for kind in kinds:
        for dname in dtypes:
            dtype = getattr(torch, dname)
            model = gi.patch(real_model(kind, dtype))
            for T in Ts:
                clean, corrupt, answers = real_pair(T)
                layers = tuple(gi.gdn_layers(model))
                cells = len(TRACE_SITES) * len(layers) * T
                unpatched = _time(lambda: _with_unpatched(model, lambda: _fwd_bwd(model, clean, answers)), reps)
                base_peak = cpu_peak_bytes(lambda: _with_unpatched(model, lambda: _fwd_bwd(model, clean, answers)))
                atp_time = _time(
                    lambda: tracing.attribution_patching(model, clean, corrupt, answers=answers, steps=1), reps
                )
                atp_peak = cpu_peak_bytes(
                    lambda: tracing.attribution_patching(model, clean, corrupt, answers=answers, steps=1)
                )
                # activation patching: one forward of a batch of restored rows per group of cells
                batch = 8
                sample = [tracing.Cell("recurrence", layers[0], p) for p in range(T - batch, T)]
                source = activation.site_values(model, clean, ("recurrence",), (layers[0],), [])
                with torch.no_grad():
                    per_batch = _time(
                        lambda: activation.patch_scores(model, corrupt, sample, source, answers, 0.0, 1.0), reps
                    )
                trace_est = per_batch / batch * cells
                row = dict(
                    model=kind,
                    dtype=dname,
                    T=T,
                    layers=len(layers),
                    cells=cells,
                    fwd_bwd_s=unpatched,
                    atp_s=atp_time,
                    atp_over_fwd_bwd=atp_time / unpatched,
                    peak_fwd_bwd_MiB=base_peak / 2**20,
                    peak_atp_MiB=atp_peak / 2**20,
                    atp_peak_over_fwd_bwd=atp_peak / base_peak,
                    causal_trace_s_extrapolated=trace_est,
                    causal_trace_over_atp=trace_est / atp_time,
                )
                rows.append(row)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return rows


def _with_unpatched(model, fn):
    gi.unpatch(model)
    try:
        return fn()
    finally:
        gi.patch(model, selfcheck=False)


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def pipeline(kinds, Ts, dtype_name: str, top: int, full_state_layer: bool) -> list[dict]:
    """Find then confirm at real sizes (module doc)."""
    rows = []
    dtype = getattr(torch, dtype_name)
    for kind in kinds:
        model = gi.patch(real_model(kind, dtype))
        layers = tuple(gi.gdn_layers(model))
        for T in Ts:
            clean, corrupt, answers = real_pair(T)
            t = time.perf_counter()
            atp = tracing.attribution_patching(model, clean, corrupt, answers=answers)
            find = time.perf_counter() - t
            t = time.perf_counter()
            atp.verified = tracing.verify_top(model, atp, clean, corrupt, top, batch_size=64)
            confirm = time.perf_counter() - t
            cells = sum(v == v for s in atp.scores.values() for v in s.flatten().tolist())
            batch = 8  # activation patching's cost per cell: one batched forward of `batch` restored rows
            sample = [tracing.Cell("recurrence", layers[0], p) for p in range(T - batch, T)]
            source = activation.site_values(model, clean, ("recurrence",), (layers[0],), [])
            with torch.no_grad():
                per_cell = (
                    _time(lambda: activation.patch_scores(model, corrupt, sample, source, answers, 0.0, 1.0), 1) / batch
                )
            row = dict(model=kind, dtype=dtype_name, T=T, steps=atp.steps, cells=cells, atp_s=find, verify_top=top,
                       verify_s=confirm, pipeline_s=find + confirm, trace_per_cell_s=per_cell,
                       trace_all_cells_s_extrapolated=per_cell * cells, speedup=per_cell * cells / (find + confirm),
                       top_estimates_measured=[(c.site, c.layer, c.position, atp.score(c), v) for c, v in atp.verified.items()])  # fmt: skip
            if full_state_layer:
                row.update(_state_layer_check(model, clean, corrupt, answers, atp, layers[0]))
            rows.append(row)
            print(json.dumps(_finite({k: v for k, v in row.items() if k != "top_estimates_measured"})), flush=True)
    return rows


# The activations path's rows grow as (sites + 1) x layers per point: at real sizes one K of it
# stands for the rest (its cost is linear in K - 1 points, as the inputs path's).
COST_METHODS = (("inputs", 1), ("inputs", 2), ("inputs", 4), ("inputs", 8), ("inputs", 16), ("activations", 4))


def cost(kind: str, Ts, reps: int) -> list[dict]:
    """Each (path, K) of `COST_METHODS`: attribution patching's time over one forward + backward of
    the unpatched model on the same pair, at real dimensions; the runs interleaved round by
    round, median of the per-round ratios (the agreement table's cost column is on toy models,
    where fixed overheads dominate)."""
    model = gi.patch(real_model(kind, torch.float32))
    rows = []
    for T in Ts:
        clean, corrupt, answers = real_pair(T)
        base = lambda: _with_unpatched(model, lambda: _fwd_bwd(model, clean, answers))
        runs = {m: (lambda m=m: tracing.attribution_patching(model, clean, corrupt, answers=answers, path=m[0], steps=m[1]))
                for m in COST_METHODS}  # fmt: skip
        ratios = {m: [] for m in COST_METHODS}
        base()  # warm-up
        for _ in range(reps):
            for m, run in runs.items():
                t = time.perf_counter()
                base()
                b = time.perf_counter() - t
                t = time.perf_counter()
                run()
                ratios[m].append((time.perf_counter() - t) / b)
        for (path, K), xs in ratios.items():
            xs = sorted(xs)
            rows.append(dict(model=kind, T=T, path=path, steps=K, over_fwd_bwd=xs[len(xs) // 2], rounds=xs))
            print(f"{kind} T={T} {path:<11} K={K:<3} {rows[-1]['over_fwd_bwd']:6.1f}x fwd+bwd  (rounds {', '.join(f'{x:.1f}' for x in xs)})", flush=True)  # fmt: skip
    return rows


def _state_layer_check(model, clean, corrupt, answers, atp, layer) -> dict:
    """The full causal trace of one layer's state (every position), timed, against AtP-IG's
    ranking of the same cells: does AtP's top 10 of them hold the true top 10?"""
    t = time.perf_counter()
    full = tracing.causal_trace(model, clean, corrupt, sites=("state",), layers=[layer], answers=answers)
    took = time.perf_counter() - t
    i = full.layers.index(layer)
    true = full.scores["state"][i].nan_to_num(0).abs().argsort(descending=True)[:10].tolist()
    est = atp.scores["state"][atp.layers.index(layer)].nan_to_num(0).abs().argsort(descending=True)[:10].tolist()
    x = atp.scores["state"][atp.layers.index(layer)][:-1].double()
    y = full.scores["state"][i][:-1].double()
    x, y = x - x.mean(), y - y.mean()
    return dict(full_state_layer=layer, full_state_trace_s=took, state_true_top10=true, state_atp_top10=est,
                state_top10_overlap=len(set(true) & set(est)) / 10, state_pearson=float((x * y).sum() / (x.norm() * y.norm())))  # fmt: skip


def _finite(x):
    """NaN as null, recursively: the JSON is strict."""
    if isinstance(x, float):
        return None if x != x else x
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def table(path: str, methods=None) -> str:
    """The agreement JSON as BENCHMARKS.md's markdown table: per set and method, Pearson over all
    cells and over the state's, Spearman and top-10 recall over all cells."""
    rows = json.loads(Path(path).read_text())["rows"]
    by = {(r["set"], r["path"], r["steps"], r["site"]): r for r in rows}
    f = lambda x, spec: "n/a" if x is None else format(x, spec)
    out = [
        "| prompt set | path | K | Pearson, all | Pearson, state | Spearman, all | top-10 recall |",
        "|---|---|---|---|---|---|---|",
    ]
    for s, p, k, site in by:
        if site != "all" or (methods and (p, k) not in methods):
            continue
        a, st = by[s, p, k, "all"], by.get((s, p, k, "state"), {})
        out.append(f"| {s} | {p if k > 1 else 'first order'} | {k} | {f(a['pearson'], '.3f')} | "
                   f"{f(st.get('pearson'), '.3f')} | {f(a['spearman'], '.2f')} | {f(a['recall'], '.0%')} |")  # fmt: skip
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("agreement")
    a.add_argument("--pairs", type=int, default=4, help="prompt pairs per set (default: %(default)s)")
    s = sub.add_parser("sizes")
    s.add_argument("--models", nargs="+", default=["qwen3_5", "kimi_linear", "qwen3_next"])
    s.add_argument("--T", type=int, nargs="+", default=[128, 512])
    s.add_argument("--dtypes", nargs="+", default=["float32"])
    s.add_argument("--reps", type=int, default=1)
    p = sub.add_parser("pipeline")
    p.add_argument("--models", nargs="+", default=["qwen3_next"])
    p.add_argument("--T", type=int, nargs="+", default=[512])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--top", type=int, default=50)
    p.add_argument("--full-state-layer", action="store_true", help="also the full trace of the first layer's state")
    t = sub.add_parser("table")
    t.add_argument("json")
    c = sub.add_parser("cost")
    c.add_argument("--model", default="qwen3_next")
    c.add_argument("--T", type=int, nargs="+", default=[128])
    c.add_argument("--reps", type=int, default=1)
    for q in (a, s, p, c):
        q.add_argument("--out", default=None, help="JSON path (default out/atp-<what>.json, untracked)")
    args = ap.parse_args(argv)
    if args.what == "table":
        print(table(args.json))
        return 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.what == "agreement":
        rows = agreement_table(args.pairs)
    elif args.what == "sizes":
        rows = sizes(args.models, args.T, args.dtypes, args.reps)
    elif args.what == "cost":
        rows = cost(args.model, args.T, args.reps)
    else:
        rows = pipeline(args.models, args.T, args.dtype, args.top, args.full_state_layer)
    out = Path(args.out or Path("out") / f"atp-{args.what}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = environment(torch.device("cpu"), torch.float32, torch.get_num_threads())
    out.write_text(json.dumps(_finite({"environment": env, "rows": rows}), indent=1, allow_nan=False) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
