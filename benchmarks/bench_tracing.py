"""Batched causal tracing vs the naive sweep (one forward per cell), on the bundled model.

    python benchmarks/bench_tracing.py [--out benchmarks/results/tracing-cpu.json]   # default out/tracing-cpu.json

The naive sweep is what one writes by hand: for every (site, GDN layer, position) one forward
of the corrupted prompt with that cell restored by a plain hook (for `state`, the prefill split
after that position). Both give the same scores (checked). Each side includes capturing the
clean values; the shared baselines (answers, clean/corrupt logit differences) are excluded.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

import gdn_intervene as gi
from gdn_intervene import state_at
from gdn_intervene.toy import load_toy
from gdn_intervene.toy.mqar import demo_prompts
from gdn_intervene.tracing import TRACE_SITES, causal_trace


def naive(model, clean, bad, answers, d_clean, d_bad) -> dict:
    """scores[site] [L, T], one forward per cell."""
    layers, T = list(gi.gdn_layers(model)), clean.shape[1]
    saved = {}
    with gi.intervene(
        model,
        {
            (L, s): (lambda x, key=(L, s): saved.setdefault(key, []).append(x.clone()))
            for L in layers
            for s in TRACE_SITES
        },
    ):
        with state_at(model, list(range(T - 1))):
            model(clean, use_cache=False)
    scores = {}
    for s in TRACE_SITES:
        score = torch.full((len(layers), T), float("nan"))
        for i, L in enumerate(layers):
            for p in range(T - 1 if s == "state" else T):
                if s == "state":
                    fired = [0]

                    def edit(S, p=p, L=L):
                        fired[0] += 1
                        return saved[(L, "state")][p].clone() if fired[0] == 1 else None

                    with gi.intervene(model, {(L, s): edit}), state_at(model, [p], [L]):
                        last = model(bad, use_cache=False).logits[0, -1]
                else:

                    def edit(x, p=p, L=L, s=s):
                        x = x.clone()
                        x[:, p] = saved[(L, s)][0][:, p]
                        return x

                    with gi.intervene(model, {(L, s): edit}):
                        last = model(bad, use_cache=False).logits[0, -1]
                d = float(last[answers[0]] - last[answers[1]])
                score[i, p] = (d - d_bad) / (d_clean - d_bad)
        scores[s] = score
    return scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides (default: all cores)"
    )
    ap.add_argument(
        "--out",
        default=str(Path(__file__).parents[1] / "out" / "tracing-cpu.json"),
        help="JSON path (untracked by default)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_toy()
    gi.patch(model)
    clean, bad, _ = demo_prompts(0)
    with torch.no_grad():
        ref = causal_trace(model, clean, bad, sites=())  # answers and baselines, shared by both sides
        answers, d_clean, d_bad = ref.answers, ref.clean_diff, ref.corrupt_diff

        def timed(fn):
            fn()
            times, out = [], None
            for _ in range(args.reps):
                t = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t)
            return statistics.median(times), out

        t_fixed, _ = timed(lambda: causal_trace(model, clean, bad, sites=(), answers=answers))
        t_batched, batched = timed(lambda: causal_trace(model, clean, bad, sites=TRACE_SITES, answers=answers))
        t_naive, scores = timed(lambda: naive(model, clean, bad, answers, d_clean, d_bad))
    t_batched -= t_fixed  # baselines: computed once by both, excluded from both
    diff = max(float(torch.nan_to_num(batched.scores[s] - scores[s]).abs().max()) for s in TRACE_SITES)
    result = {
        "device": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokens": clean.shape[1],
        "gdn_layers": len(gi.gdn_layers(model)),
        "sites": list(TRACE_SITES),
        "cells": sum(int((~torch.isnan(s)).sum()) for s in scores.values()),
        "batched_s": round(t_batched, 3),
        "naive_s": round(t_naive, 3),
        "speedup": round(t_naive / t_batched, 2),
        "max_score_difference": diff,
    }
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
