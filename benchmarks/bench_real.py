#!/usr/bin/env python
"""The overhead, capture and effective-attention rows at real model dimensions.

    python benchmarks/bench_real.py                                   # all three models, fp32
    python benchmarks/bench_real.py --models qwen3_5 --T 512 2048 --dtypes float32 bfloat16

Models: `bench_atp.real_model` (the GDN / KDA dimensions of the HF config classes' defaults, 4
layers: 3 GDN / KDA + 1 full attention, a 32k vocabulary, 16 experts for Qwen3-Next and dense
MLPs for Kimi Linear; what does not fit 24 GiB on 2 cores). Per model and dtype, with the
timing and memory tools of `bench_overhead` (interleaved rounds, CPU-time ratios, median of
per-round ratios; torch allocator peaks):

  prefill      patched / unpatched forward, no cache, each T; outputs compared bitwise
  decode       one cached decode step after a 512-token prefill; logits, recurrent and conv
               states of every GDN layer compared bitwise
  memory       allocator peak of the prefill at the largest T, patched / unpatched
  capture_all  `gi.capture` of every site of every GDN layer (cloned, detached) around the
               patched model's forward / the same forward without it, at the largest T: time
               and peak memory; the logits inside the capture compared bitwise
  one_row_M    `ops.effective_attention`, the last query row of the first GDN layer, all value
  full_M       heads, on its captured q, k, beta, g, and that layer's full M, at T = 512 and
               the largest T; against the one triangular solve (`ops.effective_attention_solve`,
               1 run) at T = 512 only (O(T^3), and per key channel O(T^2 K) exponentials for
               KDA: minutes at T = 2048 on 2 cores); reconstruction error of the `recurrence`
               site from M

Writes out/real-<dtypes>.json (untracked; --out to choose), rewritten after each model;
benchmarks/results/ holds the runs BENCHMARKS.md reports.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_analysis  # noqa: E402
from bench_atp import real_model  # noqa: E402
from bench_overhead import (  # noqa: E402
    VOCAB,
    Bench,
    _row,
    case_decode,
    case_memory,
    case_prefill,
    cpu_peak_bytes,
    describe,
    environment,
    nothing,
    plain_and_captured,
    twins,
)

import gdn_intervene as gi  # noqa: E402
from gdn_intervene import analysis as an  # noqa: E402

NAMES = {
    "qwen3_5": "prefill_model",
    "qwen3_next": "prefill_model",
    "kimi_linear": "kda_prefill",
}  # bench_overhead's goals


def case_capture_all(bench: Bench, model, Ts, schedule) -> list[dict]:
    """gi.capture of every site of every GDN layer around the patched forward / the plain patched forward."""
    rows = []
    for T in Ts:
        torch.manual_seed(4)
        ids = torch.randint(3, VOCAB, (1, T))

        plain, captured = plain_and_captured(model, ids)

        with torch.no_grad():
            logits, cache = captured()
            equal = torch.equal(logits, plain())
            held = sum(v.numel() * v.element_size() for _, vals in cache.items() for v in vals)
            fired = sum(len(vals) for _, vals in cache.items())
            del logits, cache
            peaks = {"plain": cpu_peak_bytes(plain), "capture_all": cpu_peak_bytes(captured)}
            times = bench.interleave({"plain": (nothing, plain), "capture_all": (nothing, captured)}, *schedule(T))
        r, med = bench.summary(times, "capture_all", "plain")
        mib = {k: round(v / 2**20, 1) for k, v in peaks.items()}
        rows.append(
            _row(
                "capture_all",
                {"T": T},
                r,
                med,
                equal,
                None,
                note="every site of every GDN layer, cloned and detached / the same forward without capture",
                extra={"peak_MiB": mib, "captured_MiB": round(held / 2**20, 1), "values_captured": fired},
            )
        )
    return rows


def case_effective_attention(model, Ts: list[int], repeats: int, old_up_to: int = 512) -> list[dict]:
    """One row (the last) and the full M at each T, first GDN layer, all value heads; the
    reference solve too up to `old_up_to`."""
    layer = next(iter(gi.gdn_layers(model)))
    res: dict = {}
    for T in Ts:
        torch.manual_seed(5)
        cap = an.capture(model, torch.randint(3, VOCAB, (1, T)), layers=[layer])[layer]
        x = dict(q=cap.q, k=cap.k, beta=cap.beta, g=cap.g)
        old = T <= old_up_to
        bench_analysis.compare(f"one_row_T{T}", x, [T - 1], repeats, res, old=old, old_repeats=1, cap=cap, memory=True)
        bench_analysis.compare(
            f"full_M_T{T}", x, None, max(1, repeats // 2), res, old=old, old_repeats=1, cap=cap, memory=True
        )
        del cap, x
    return [dict(case=name, layer=layer, **entry) for name, entry in res.items()]


def run(kind: str, dtype, Ts: list[int], reps: int, cases: set[str]) -> list[dict]:
    model = real_model(kind, dtype)
    pair = twins(model)
    bench = Bench(torch.device("cpu"), warmup=1, reps=reps, clock="cpu", budget_s=0.0)

    def schedule(T):  # a long prefill takes tens of seconds on 2 cores: fewer rounds there
        return (1, reps) if T <= 512 else (1, max(2, reps // 2))

    rows: list[dict] = []
    if "prefill" in cases:
        rows += case_prefill(bench, NAMES[kind], pair, Ts, dtype, schedule)
    if "decode" in cases:
        rows += case_decode(bench, pair, prefill=512, name="kda_decode" if kind == "kimi_linear" else "decode")
    if "memory" in cases:
        rows += case_memory(bench, {NAMES[kind]: pair}, [max(Ts)], dtype, passes=1)
    if "capture_all" in cases:
        rows += case_capture_all(bench, pair[1], [max(Ts)], schedule)
    if "M" in cases:
        rows += case_effective_attention(pair[1], sorted({512, max(Ts)}), repeats=3)
    for row in rows:
        row.update(model=kind, dtype=str(dtype).removeprefix("torch."), model_info=describe(model))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["qwen3_5", "kimi_linear", "qwen3_next"], choices=list(NAMES))
    ap.add_argument("--T", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=4, help="timed rounds per row up to T = 512, half that above")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="prefill,decode,memory,capture_all,M")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = set(args.cases.split(","))
    t0 = time.perf_counter()
    out = Path(args.out or Path(__file__).parents[1] / "out" / f"real-{'-'.join(args.dtypes)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for kind in args.models:
        for d in args.dtypes:
            rows += run(kind, getattr(torch, d), sorted(args.T), args.reps, cases)
            out.write_text(
                json.dumps(
                    {
                        "environment": environment(torch.device("cpu"), ",".join(args.dtypes), args.threads),
                        "wall_s": round(time.perf_counter() - t0, 1),
                        "rows": rows,
                    },
                    indent=1,
                    default=str,
                )
            )
            print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
