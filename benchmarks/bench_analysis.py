"""Cost of the effective-attention and split-prefill tools on a small model with realistic GDN dims.

    python benchmarks/bench_analysis.py [--out bench_analysis.json] [--repeats 5]

Model: a random Qwen3.5 text model (no download), hidden 256, layers [linear, full], one GDN
layer with 4 key and 4 value heads of dim 128 (Qwen3-Next's head dim). Batch 1, fp32.
Reports (median of `repeats` runs after 2 warm-ups, seconds):
  * full M, T=1024, all 4 heads (ops.effective_attention on the captured kernel inputs), and
    effective_attention_for end to end (forward + capture + M);
  * rows-only M, one query (the last), T=4096;
  * split prefill: a forward with k = 1, 2, 4, 8 state positions vs a plain forward, T=1024
    (interleaved runs; ratio = median of per-round ratios).
Writes JSON with the device, dtype, thread count and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import transformers as tr

import gdn_intervene as gi
from gdn_intervene import analysis as an
from gdn_intervene import ops


def build_model(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = tr.Qwen3_5TextConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=4, linear_num_value_heads=4, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_conv_kernel_dim=4,
    )
    return gi.patch(tr.Qwen3_5ForCausalLM(cfg).to(dtype).eval())


def timed(fn) -> tuple:
    """(wall seconds, process CPU seconds) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def median_time(fn, repeats: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    runs = [timed(fn) for _ in range(repeats)]
    wall, cpu = [r[0] for r in runs], [r[1] for r in runs]
    return {"median_s": statistics.median(wall), "min_s": min(wall), "cpu_median_s": statistics.median(cpu), "runs": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_analysis.json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    dtype = torch.float32
    model = build_model(dtype)
    gen = torch.Generator().manual_seed(0)
    ids = lambda T: torch.randint(3, 1024, (1, T), generator=gen)  # noqa: E731
    res: dict = {}

    # full M, T=1024, all heads
    x = ids(1024)
    cap = an.capture(model, x)[0]
    res["full_M_T1024_all_heads"] = median_time(lambda: cap.effective_attention(), args.repeats)
    res["full_M_T1024_all_heads"]["reconstruction_rel_error"] = cap.reconstruction_error(cap.effective_attention())
    res["effective_attention_for_T1024_end_to_end"] = median_time(
        lambda: an.effective_attention_for(model, x), args.repeats, warmup=1
    )

    # rows-only, one query, T=4096
    x = ids(4096)
    cap = an.capture(model, x)[0]
    rows = [4095]
    res["rows_only_M_T4096_one_query"] = median_time(lambda: cap.effective_attention(rows=rows), args.repeats, warmup=1)
    ea = cap.effective_attention(rows=rows)
    res["rows_only_M_T4096_one_query"]["reconstruction_rel_error"] = cap.reconstruction_error(ea, rows=rows)
    del cap, ea

    # split prefill vs plain forward, T=1024: runs interleaved round by round, so that load from
    # other processes hits both alike; the ratio is the median of the per-round ratios
    T = 1024
    x = ids(T)
    configs = {0: None, **{k: [round((i + 1) * T / (k + 1)) for i in range(k)] for k in (1, 2, 4, 8)}}

    def forward(positions):
        if positions is None:
            return model(x).logits
        with an.state_at(model, positions):
            return model(x).logits

    rounds = 2 * args.repeats + 1
    times: dict = {k: [] for k in configs}
    with torch.no_grad():
        base = forward(None)
        for round_ in range(rounds):
            for k, positions in configs.items():
                t = timed(lambda: forward(positions))
                if round_:  # round 0 is the warm-up
                    times[k].append(t)
        med = lambda k, i: statistics.median(t[i] for t in times[k])  # noqa: E731
        split = {"T": T, "runs": rounds - 1, "plain_forward": {"median_s": med(0, 0), "cpu_median_s": med(0, 1)}}
        for k, positions in configs.items():
            if k:
                logits = forward(positions)
                split[f"k={k}"] = {
                    "positions": positions,
                    "median_s": med(k, 0),
                    "cpu_median_s": med(k, 1),
                    "ratio_to_plain": statistics.median(a[0] / b[0] for a, b in zip(times[k], times[0])),
                    "cpu_ratio_to_plain": statistics.median(a[1] / b[1] for a, b in zip(times[k], times[0])),
                    "logits_rel_diff": ((logits - base).norm() / base.norm()).item(),
                }
    res["split_prefill"] = split

    out = {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "note": "shared 2-core machine; other processes were running (see load average)",
        "dtype": str(dtype),
        "model": "Qwen3.5 text, hidden 256, layers [linear, full], GDN HK=HV=4, K=V=128, batch 1",
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": tr.__version__,
            "gdn_intervene": gi.__version__,
        },
        "kernel": "HF torch reference (no flash-linear-attention)",
        "results": res,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
