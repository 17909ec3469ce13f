"""Cost of the effective-attention, attribution and split-prefill tools at realistic GDN dims.

    python benchmarks/bench_analysis.py [--out out/analysis-cpu.json] [--repeats 5] [--threads 1]
                                        [--device cpu|cuda] [--skip-split]

Kernel inputs: 4 value heads (= key heads) of dim 128 (Qwen3-Next's head dim), batch 1, fp32.
Up to T=4096 they are captured from a random Qwen3.5 text model (no download; hidden 256,
layers [linear, full]); at T=65536 (and T=131072 on cuda) random: q, k, v ~ N(0, 1),
beta = sigmoid(N(0, 1)), g = -0.1 * softplus(N(0, 1)).
Old = `ops.effective_attention_solve` (one triangular solve over the whole sequence), new =
`ops.effective_attention` (the adjoint row scan), in the same run on the same inputs:
  * one row (the last query) at T=4096: old and new, ratio (goal >= 100x);
  * one row at T=65536: new only, with its peak memory (the old path would need a [T, T]
    system: 3 x 4 heads x T^2 x 4 bytes = 206 GB) (goal < 2 s, no T^2 allocation);
  * the full matrix at T=1024 (goal >= 4x) and T=4096: old and new;
  * end to end: effective_attention_for (T=1024, full M) and attribution_for (T=4096, one
    position, a token pair) including the model forward;
  * split prefill: a forward with k = 1, 2, 4, 8 state positions vs a plain forward, T=1024
    (interleaved runs; ratio = median of per-round ratios).
  * --device cuda adds the full matrix at T=4096 x 32 heads (goal <= 10 ms fp32) and one row
    at T=131072 (4 heads); times there are CUDA-synchronised wall times.
Old and new runs are interleaved round by round after a warm-up; medians of `repeats` runs
(the old path: 3 runs for one row at T=4096, 1 for the full matrix at T=4096, which takes tens
of seconds); ratio_cpu_per_round_median is the median of the per-round CPU-time ratios. CPU peak memory: the torch allocator's live bytes during the call above those live
before it (torch.profiler memory events, in time order); cuda: max_memory_allocated above the
bytes allocated before the call. Writes JSON with the device, dtype, thread count and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers as tr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_overhead import cpu_peak_bytes, cuda_peak_bytes  # noqa: E402

import gdn_intervene as gi  # noqa: E402
from gdn_intervene import analysis as an  # noqa: E402
from gdn_intervene import ops  # noqa: E402


def build_model(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = tr.Qwen3_5TextConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=4,
        linear_num_value_heads=4,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
    )
    return gi.patch(tr.Qwen3_5ForCausalLM(cfg).to(dtype).eval())


SYNC = lambda: None  # noqa: E731  (torch.cuda.synchronize with --device cuda)


def timed(fn) -> tuple:
    """(wall seconds, process CPU seconds) of one call."""
    SYNC()
    w, c = time.perf_counter(), time.process_time()
    fn()
    SYNC()
    return time.perf_counter() - w, time.process_time() - c


def median_time(fn, repeats: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    runs = [timed(fn) for _ in range(repeats)]
    wall, cpu = [r[0] for r in runs], [r[1] for r in runs]
    return {
        "median_s": statistics.median(wall),
        "min_s": min(wall),
        "cpu_median_s": statistics.median(cpu),
        "runs": repeats,
    }


def peak_bytes(fn, device: str) -> int:
    """Peak bytes allocated by torch during fn() above what was live before it."""
    return (cuda_peak_bytes if device == "cuda" else cpu_peak_bytes)(fn)


def random_inputs(T: int, H: int, device: str, seed: int = 0) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x = dict(
        q=r(1, T, H, 128),
        k=r(1, T, H, 128),
        beta=torch.sigmoid(r(1, T, H)),
        g=-0.1 * torch.nn.functional.softplus(r(1, T, H)),
    )
    return {k: v.to(device) for k, v in x.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def compare(
    name: str,
    x: dict,
    rows,
    repeats: int,
    res: dict,
    *,
    old: bool = True,
    old_repeats: int | None = None,
    cap=None,
    device: str = "cpu",
    memory: bool = False,
) -> None:
    """Time new (and old) on the same inputs; record ratio, agreement and reconstruction error."""
    kw = dict(beta=x["beta"], g=x["g"], rows=rows)
    new_fn = lambda: ops.effective_attention(x["q"], x["k"], **kw)  # noqa: E731
    old_fn = lambda: ops.effective_attention_solve(x["q"], x["k"], **kw)  # noqa: E731
    entry = {"T": x["k"].shape[1], "heads": x["beta"].shape[2], "rows": "all" if rows is None else len(rows)}
    n_old = (old_repeats or repeats) if old else 0
    new_fn()
    if n_old > 1:
        old_fn()  # warm-up
    runs_new, runs_old = [], []
    for i in range(max(repeats, n_old)):  # interleaved, so that load from other processes hits both alike
        if i < repeats:
            runs_new.append(timed(new_fn))
        if i < n_old:
            runs_old.append(timed(old_fn))

    def summary(runs):
        return {
            "median_s": statistics.median(r[0] for r in runs),
            "min_s": min(r[0] for r in runs),
            "cpu_median_s": statistics.median(r[1] for r in runs),
            "runs": len(runs),
        }

    entry["new"] = summary(runs_new)
    new = new_fn()
    if cap is not None:
        entry["new_reconstruction_rel_error"] = cap.reconstruction_error(new, rows=rows)
    if old:
        entry["old"] = summary(runs_old)
        entry["ratio_wall"] = entry["old"]["median_s"] / entry["new"]["median_s"]
        entry["ratio_cpu"] = entry["old"]["cpu_median_s"] / entry["new"]["cpu_median_s"]
        pairs = list(zip(runs_old, runs_new))
        entry["ratio_cpu_per_round_median"] = statistics.median(o[1] / n[1] for o, n in pairs)
        entry["new_vs_old_rel_diff"] = rel(new.matrix, old_fn().matrix)
    if memory:
        T = entry["T"]
        entry["new_peak_MiB"] = peak_bytes(new_fn, device) / 2**20
        entry["T2_fp32_matrix_MiB"] = T * T * 4 / 2**20
    del new
    res[name] = entry
    print(name, json.dumps(entry), flush=True)


def main() -> None:
    global SYNC
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out",
        default=str(Path(__file__).parents[1] / "out" / "analysis-cpu.json"),
        help="JSON path (untracked by default)",
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--skip-split", action="store_true", help="skip the split-prefill rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    if dev == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device")
        SYNC = torch.cuda.synchronize
    load_before = os.getloadavg()
    dtype = torch.float32
    model = build_model(dtype).to(dev)
    gen = torch.Generator().manual_seed(0)
    ids = lambda T: torch.randint(3, 1024, (1, T), generator=gen).to(dev)  # noqa: E731
    res: dict = {}

    def captured(T):
        cap = an.capture(model, ids(T))[0]
        return cap, dict(q=cap.q, k=cap.k, beta=cap.beta, g=cap.g)

    cap, x = captured(4096)
    compare("one_row_T4096", x, [4095], args.repeats, res, old_repeats=3, cap=cap, device=dev)
    compare("full_M_T4096", x, None, max(1, args.repeats // 2), res, old_repeats=1, cap=cap, device=dev)
    del cap, x
    cap, x = captured(1024)
    compare("full_M_T1024", x, None, 2 * args.repeats, res, cap=cap, device=dev)
    del cap, x
    x = random_inputs(65536, 4, dev)
    compare("one_row_T65536", x, [65535], args.repeats, res, old=False, device=dev, memory=True)
    del x
    if dev == "cuda":
        x = random_inputs(4096, 32, dev)
        compare("full_M_T4096_32_heads", x, None, 9, res, old_repeats=3, device=dev, memory=True)
        x = random_inputs(131072, 4, dev)
        compare("one_row_T131072", x, [131071], 9, res, old=False, device=dev, memory=True)
        del x

    x1024 = ids(1024)
    res["effective_attention_for_T1024_end_to_end"] = median_time(
        lambda: an.effective_attention_for(model, x1024), args.repeats, warmup=1
    )
    x4096 = ids(4096)
    res["attribution_for_T4096_one_position_end_to_end"] = median_time(
        lambda: an.attribution_for(model, x4096, positions=[4095], direction=(5, 7)),
        max(1, args.repeats // 2),
        warmup=1,
    )
    att = an.attribution_for(model, x4096, positions=[4095], direction=(5, 7))
    res["attribution_for_T4096_one_position_end_to_end"]["sum_rel_error"] = rel(att.total(), att.value)
    print("end to end", json.dumps({k: res[k] for k in res if "end_to_end" in k}), flush=True)

    if not args.skip_split:
        res["split_prefill"] = split_prefill(model, ids, args.repeats)

    out = {
        "device": dev if dev == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "note": "shared machine; other processes may have been running (see load average)",
        "dtype": str(dtype),
        "model": "Qwen3.5 text, hidden 256, layers [linear, full], GDN HK=HV=4, K=V=128, batch 1",
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": tr.__version__,
            "gdn_intervene": gi.__version__,
        },
        "kernel": "HF torch reference (no flash-linear-attention) unless transformers binds fla",
        "results": res,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


def split_prefill(model, ids, repeats: int) -> dict:
    """Split prefill vs plain forward, T=1024: runs interleaved round by round, so that load from
    other processes hits both alike; the ratio is the median of the per-round ratios."""
    T = 1024
    x = ids(T)
    configs = {0: None, **{k: [round((i + 1) * T / (k + 1)) for i in range(k)] for k in (1, 2, 4, 8)}}

    def forward(positions):
        if positions is None:
            return model(x).logits
        with an.state_at(model, positions):
            return model(x).logits

    rounds = 2 * repeats + 1
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
    return split


if __name__ == "__main__":
    main()
