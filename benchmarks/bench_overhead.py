#!/usr/bin/env python
"""Overhead of gdn_intervene's decomposed forward against the unpatched HF model.

Patched and unpatched run the same weights on the same inputs: the patched model is a deep copy
of the unpatched one, patched once before timing. (Patching and unpatching one object between
runs would be "the same object", but the first call after a class swap is ~4% slower on a
decode step, an artefact that is not overhead of the patched forward.) Runs are interleaved
(A B, B A, A B, ...: the order alternates per round so neither side always runs second, with
warm caches) after warm-up, and every number reported is a median of per-round ratios
patched / unpatched. Before timing, each case checks that both sides give bit-identical
outputs (torch.equal) on the path it measures and records the result. Clock: process CPU
time on cpu (a shared machine's waits for a core are not overhead; wall ratios are kept in the
JSON too), wall time with torch.cuda.synchronize() on cuda.

Cases (B = 1 throughout):
  prefill_layer  one Qwen3NextGatedDeltaNet at Qwen3-Next dimensions (D 2048, HK 16, HV 32,
                 K = V = 128), T in {128, 1024, 4096} (+16384 on cuda)
  prefill_model  a small Qwen3.5 model (4 layers: 3 GDN + 1 attention), same T
  decode         one cached decode step of an 8-layer Qwen3.5 model (6 GDN), after a prefill
  kda_prefill    a small Kimi Linear model (Kimi Delta Attention: per-channel decay; 4 layers:
                 3 KDA + 1 MLA attention, dense MLPs), T in {128, 1024} (+4096 on cuda)
  kda_decode     one cached decode step of an 8-layer Kimi Linear model (6 KDA), after a prefill
  nnsight        an nnsight trace saving `beta` and `recurrence` of every GDN layer of the
                 patched model, against an nnsight `.source` trace of the unpatched model
                 saving `b_sigmoid_0` and `torch_chunk_gated_delta_rule_0`'s output (the way
                 to reach the same values without this package), and against a plain forward
  memory         peak memory of prefill (nothing saved): CPU = peak of the torch allocator's
                 live bytes during the call (torch.profiler memory events), cuda =
                 torch.cuda.max_memory_allocated; both above what was live before the call

    python benchmarks/bench_overhead.py --quick                       # CPU, a few minutes
    python benchmarks/bench_overhead.py --device cuda --out gpu.json  # fla kernels if installed

Writes out/overhead-<device>.json (untracked) unless --out says otherwise; benchmarks/results/
holds the runs BENCHMARKS.md reports.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.metadata as md
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers as tr  # noqa: E402

import gdn_intervene as gi  # noqa: E402

# Goals: median ratio patched / baseline must not exceed these.
GOALS = {
    "prefill_layer": 1.02,  # T >= 1024 only
    "prefill_model": 1.02,  # T >= 1024 only
    "decode": 1.05,
    "kda_prefill": 1.02,  # T >= 1024 only
    "kda_decode": 1.05,
    "nnsight": 1.00,  # against the .source trace of the unpatched model
    "memory": 1.05,
}
VOCAB = 8192


# ----------------------------------------------------------------------------- models


def qwen3_next_layer(dtype, device):
    """One Qwen3NextGatedDeltaNet at Qwen3-Next-80B dimensions."""
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    cfg = tr.Qwen3NextConfig(
        hidden_size=2048,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        num_hidden_layers=1,
        layer_types=["linear_attention"],
    )
    torch.manual_seed(0)
    return Qwen3NextGatedDeltaNet(cfg, layer_idx=0).to(device, dtype).eval()


def qwen3_5_model(n_layers: int, dtype, device):
    """A small Qwen3.5 text model: D 512, GDN HK 4 / HV 8 heads of 128, one attention layer
    in every four (the last of each group, as in Qwen3.5)."""
    types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n_layers)]
    cfg = tr.Qwen3_5TextConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=n_layers,
        layer_types=types,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=128,
        linear_num_key_heads=4,
        linear_num_value_heads=8,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return tr.Qwen3_5ForCausalLM(cfg).to(device, dtype).eval()


def kimi_linear_model(n_layers: int, dtype, device):
    """A small Kimi Linear model: D 512, KDA 4 heads of 128 (per-channel decay), MLA attention
    in every fourth layer (the last of each group), dense MLPs."""
    types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n_layers)]
    cfg = tr.KimiLinearConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        intermediate_size=1408,
        moe_intermediate_size=256,
        num_hidden_layers=n_layers,
        layer_types=types,
        mlp_layer_types=["dense"] * n_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=128,
        qk_rope_head_dim=64,
        qk_nope_head_dim=64,
        v_head_dim=128,
        linear_num_heads=4,
        linear_head_dim=128,
        linear_conv_kernel_dim=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return tr.KimiLinearForCausalLM(cfg).to(device, dtype).eval()


def describe(model) -> dict:
    c = model.config
    out = {"class": type(model).__name__, "params": sum(p.numel() for p in model.parameters())}
    for k in (
        "hidden_size",
        "num_hidden_layers",
        "linear_num_key_heads",
        "linear_num_value_heads",
        "linear_key_head_dim",
        "linear_value_head_dim",
        "linear_num_heads",
        "linear_head_dim",
        "vocab_size",
    ):
        if hasattr(c, k):
            out[k] = getattr(c, k)
    out["gdn_layers"] = sum(t == "linear_attention" for t in c.layer_types)
    return out


# ----------------------------------------------------------------------------- timing


class Bench:
    """Interleaved timing. Each run records wall time and process CPU time; `clock` says
    which one the ratios use: CPU time on a (shared) CPU, wall time with synchronize on cuda."""

    def __init__(self, device: torch.device, warmup: int, reps: int, clock: str, budget_s: float):
        self.device, self.warmup, self.reps, self.clock, self.budget_s = device, warmup, reps, clock, budget_s

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, setup: Callable[[], None], call: Callable[[], object]) -> tuple[float, float]:
        setup()
        self.sync()
        w0, c0 = time.perf_counter(), time.process_time()
        call()
        self.sync()
        return time.perf_counter() - w0, time.process_time() - c0

    def interleave(
        self, variants: dict[str, tuple[Callable, Callable]], warmup: int | None = None, reps: int | None = None
    ) -> dict:
        """variants: name -> (untimed setup, timed call). Round r runs every variant once, in
        an order rotated by r (A B, B A, ...), so none always runs first or last. At least
        `reps` rounds after `warmup`; cheap cases get more, up to `budget_s` of timed calls
        (estimated from the last warm-up round), at most 200.
        Returns {"wall": {name: [s, ...]}, "cpu": {name: [s, ...]}}."""
        names = list(variants)
        warmup = self.warmup if warmup is None else warmup
        reps = reps or self.reps
        times = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
        r = 0
        while r < warmup + reps:
            last = 0.0
            for n in names[r % len(names) :] + names[: r % len(names)]:
                wall, cpu = self.timed(*variants[n])
                last += wall
                if r >= warmup:
                    times["wall"][n].append(wall)
                    times["cpu"][n].append(cpu)
            if r == warmup - 1:
                reps = max(reps, min(200, int(self.budget_s / max(last, 1e-9))))
            r += 1
        return times

    def summary(self, times: dict, num: str, den: str) -> tuple[dict, dict]:
        """(ratio stats on `clock`, medians in ms on both clocks); the other clock's median
        ratio is kept as ratio["other_clock_median"]."""
        r = ratio_stats(times[self.clock], num, den)
        other = "wall" if self.clock == "cpu" else "cpu"
        r["clock"] = self.clock
        r[f"{other}_median"] = ratio_stats(times[other], num, den)["median"]
        med = {c: {n: round(statistics.median(ts) * 1e3, 3) for n, ts in times[c].items()} for c in ("wall", "cpu")}
        return r, med


def ratio_stats(times: dict[str, list[float]], num: str, den: str) -> dict:
    """Median and quartiles of the per-round ratios times[num][i] / times[den][i]."""
    rs = sorted(a / b for a, b in zip(times[num], times[den]))
    q = statistics.quantiles(rs, n=4, method="inclusive") if len(rs) >= 2 else [rs[0]] * 3
    return {"median": round(statistics.median(rs), 4), "q1": round(q[0], 4), "q3": round(q[2], 4), "n": len(rs)}


def twins(model):
    """(unpatched model, patched deep copy): same weights, patched once."""
    return model, gi.patch(copy.deepcopy(model))


def nothing():
    return None


# ----------------------------------------------------------------------------- cases


def case_prefill(bench: Bench, name: str, models, Ts, dtype, schedule) -> list[dict]:
    rows = []
    for T in Ts:
        call = {key: prefill_call(name, m, T, bench.device, dtype) for key, m in zip(("unpatched", "patched"), models)}
        with torch.no_grad():
            equal = torch.equal(call["unpatched"](), call["patched"]())
            times = bench.interleave({k: (nothing, c) for k, c in call.items()}, *schedule(T))
        r, med = bench.summary(times, "patched", "unpatched")
        rows.append(_row(name, {"T": T}, r, med, equal, GOALS[name] if T >= 1024 else None))
    return rows


def prefill_call(name: str, model, T: int, device, dtype) -> Callable[[], torch.Tensor]:
    """A prefill of B=1, T tokens (seeded: both sides get the same input), no cache."""
    torch.manual_seed(1)
    if name == "prefill_layer":
        x = torch.randn(1, T, model.hidden_size, device=device, dtype=dtype)
        return lambda: model(x)
    ids = torch.randint(3, VOCAB, (1, T), device=device)
    return lambda: model(input_ids=ids, use_cache=False).logits


def case_decode(bench: Bench, models, prefill: int, name: str = "decode") -> list[dict]:
    """One cached decode step after a `prefill`-token prefill; every timed step starts from
    its own copy (untimed) of the same prefilled cache."""
    ref = models[0]
    torch.manual_seed(2)
    ids = torch.randint(3, VOCAB, (1, prefill), device=bench.device)
    nxt = torch.randint(3, VOCAB, (1, 1), device=bench.device)
    gdn = [i for i, t in enumerate(ref.config.layer_types) if t == "linear_attention"]
    with torch.no_grad():
        cache0 = tr.DynamicCache(config=ref.config)
        ref(input_ids=ids, cache=cache0, use_cache=True)
        caches = {}

        def variant(key, model):
            def setup():
                caches[key] = copy.deepcopy(cache0)

            def step():
                return model(input_ids=nxt, cache=caches[key], use_cache=True).logits

            return setup, step

        variants = {key: variant(key, m) for key, m in zip(("unpatched", "patched"), models)}
        seen = {}
        for key, (setup, step) in variants.items():
            setup()
            c = caches[key]
            seen[key] = [step()] + [c.get_recurrent_state(i) for i in gdn] + [c.get_conv_state(i) for i in gdn]
        equal = all(torch.equal(a, b) for a, b in zip(seen["unpatched"], seen["patched"]))
        del seen
        times = bench.interleave(variants)
    r, med = bench.summary(times, "patched", "unpatched")
    return [
        _row(
            name,
            {"prefill": prefill, "model": describe(ref)},
            r,
            med,
            equal,
            GOALS[name],
            note="logits, recurrent and conv states of every GDN layer compared",
        )
    ]


def case_nnsight(bench: Bench, models, Ts) -> list[dict]:
    """Patched + nnsight (.output of two site modules per GDN layer) vs unpatched + nnsight
    `.source` (b_sigmoid_0, torch_chunk_gated_delta_rule_0) vs the plain forward."""
    from nnsight import NNsight

    # nnsight installs its controllers on every module for good (each site then counts as
    # listened): wrap copies, so that later cases measure the plain models.
    model, patched = (copy.deepcopy(m) for m in models)
    n_src, n_pat = NNsight(model), NNsight(patched)
    layers = [i for i, t in enumerate(model.config.layer_types) if t == "linear_attention"]
    rows = []
    for T in Ts:
        torch.manual_seed(3)
        ids = torch.randint(3, VOCAB, (1, T), device=bench.device)

        source_trace = lambda: nnsight_source_trace(n_src, ids, layers)
        site_trace = lambda: nnsight_site_trace(n_pat, ids, layers)

        def native():
            return model(input_ids=ids, use_cache=False).logits

        with torch.no_grad():
            (s_src, l_src), (s_pat, l_pat), l_nat = source_trace(), site_trace(), native()
            equal = (
                len(s_src) == len(s_pat) == 2 * len(layers)
                and all(torch.equal(a, b) for a, b in zip(s_src, s_pat))
                and torch.equal(l_src, l_pat)
                and torch.equal(l_pat, l_nat)
            )
            del s_src, s_pat, l_src, l_pat, l_nat
            times = bench.interleave(
                {
                    "source_unpatched": (nothing, source_trace),
                    "sites_patched": (nothing, site_trace),
                    "native": (nothing, native),
                }
            )
        params = {"T": T, "model": describe(model), "saved_per_gdn_layer": 2}
        for case, num, den, goal, note in (
            ("nnsight", "sites_patched", "source_unpatched", GOALS["nnsight"], "patched + sites / unpatched + .source"),
            ("nnsight_vs_native", "sites_patched", "native", None, "patched + sites / plain forward, no nnsight"),
            ("source_vs_native", "source_unpatched", "native", None, "unpatched + .source / plain forward, no nnsight"),
        ):
            r, med = bench.summary(times, num, den)
            rows.append(_row(case, params, r, med, equal, goal, note=note))
    return rows


def cpu_peak_bytes(call: Callable[[], object]) -> int:
    """Peak of the torch CPU allocator's live bytes during call(), above the bytes live
    before it (allocation/free events of torch.profiler, in time order; deterministic)."""
    import torch.profiler as tp

    with tp.profile(activities=[tp.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = call()
        del out
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    ]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(call: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = call()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - base


def case_memory(bench: Bench, pairs: dict, Ts, dtype, passes: int) -> list[dict]:
    peak_of = cuda_peak_bytes if bench.device.type == "cuda" else cpu_peak_bytes
    rows = []
    for name, models in pairs.items():
        for T in Ts:
            calls = {
                key: prefill_call(name, m, T, bench.device, dtype) for key, m in zip(("unpatched", "patched"), models)
            }
            peaks = {"unpatched": [], "patched": []}
            with torch.no_grad():
                for _ in range(passes):  # a second pass shows that the measure is stable
                    for key, call in calls.items():
                        peaks[key].append(peak_of(call))
            u, p = peaks["unpatched"][-1], peaks["patched"][-1]
            r = {
                "median": round(p / u, 4),
                "q1": round(p / u, 4),
                "q3": round(p / u, 4),
                "n": passes,
                "clock": "allocator peak, bytes",
            }
            mib = {"unpatched": round(u / 2**20, 1), "patched": round(p / 2**20, 1)}
            rows.append(
                _row(
                    "memory",
                    {"of": name, "T": T},
                    r,
                    {"peak_MiB": mib},
                    None,
                    GOALS["memory"],
                    note="peak above the bytes live before the call",
                    extra={"peak_bytes_all_passes": peaks},
                )
            )
    return rows


def _row(case, params, r, med_ms, equal, goal, note="", extra=None) -> dict:
    row = {
        "case": case,
        **params,
        "ratio": r,
        "median_ms": med_ms,
        "bitwise_equal": equal,
        "goal": goal,
        "met": None if goal is None else r["median"] <= goal,
        "note": note,
    }
    row.update(extra or {})
    tag = "" if goal is None else ("  ok" if row["met"] else f"  MISSED (goal <= {goal})")
    label = " ".join(f"{k}={v}" for k, v in params.items() if k in ("T", "of", "prefill"))
    shown = med_ms.get(r.get("clock"), med_ms)
    print(
        f"{case:18s} {label:22s} ratio {r['median']:.4f} [{r['q1']:.3f}, {r['q3']:.3f}] n={r['n']} "
        f"{r.get('clock', '')}  {shown}  equal={equal}{tag}",
        flush=True,
    )
    return row


# ----------------------------------------------------------------------------- environment


def environment(device: torch.device, dtype, threads: int) -> dict:
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = platform.processor() or "cpu"
        with contextlib.suppress(OSError):
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    dev_name = line.split(":", 1)[1].strip()
                    break
    versions = {}
    for pkg in (
        "torch",
        "transformers",
        "nnsight",
        "gdn_intervene",
        "flash-linear-attention",
        "fla-core",
        "causal-conv1d",
        "triton",
    ):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    versions.setdefault("gdn_intervene", gi.__version__)  # also when run from a checkout on PYTHONPATH
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

    kernels = {
        n: f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', type(f).__name__)}"
        for n in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn")
        for f in [vars(hf)[n]]
    }
    return {
        "device": dev_name,
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "python": platform.python_version(),
        "versions": versions,
        "kernels_bound_in_hf": kernels,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", choices=["fp32", "bf16"], help="default: fp32 on cpu, bf16 on cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on cpu (default 1)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="fewer rounds (T=4096: 1 warm-up + 3), nnsight at T=128 only, one memory pass",
    )
    ap.add_argument("--reps", type=int, help="timed rounds per case (default 9, quick 7)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--budget",
        type=float,
        help="seconds of timed calls per row beyond the minimum rounds: cheap "
        "cases run more rounds (default 30, quick 10)",
    )
    ap.add_argument("--cases", default="prefill_layer,prefill_model,decode,nnsight,memory,kda_prefill,kda_decode")
    ap.add_argument("--out", default=None, help="JSON path (default out/overhead-<device>.json, untracked)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.set_num_threads(args.threads)
    reps = args.reps or (7 if args.quick else 9)
    Ts = [128, 1024, 4096] + ([16384] if device.type == "cuda" else [])
    cases = args.cases.split(",")
    # CPU time on a CPU: the machine may be shared, and waiting for a core is not overhead.
    budget = args.budget if args.budget is not None else (10.0 if args.quick else 30.0)
    bench = Bench(device, args.warmup, reps, clock="wall" if device.type == "cuda" else "cpu", budget_s=budget)
    # A T=4096 prefill takes seconds on one CPU thread: quick mode gives it fewer rounds.
    long_ok = device.type == "cuda" or not args.quick
    schedule = lambda T: (args.warmup, reps) if T < 4096 or long_ok else (1, 3)  # noqa: E731
    env = environment(device, dtype, args.threads)
    print(json.dumps(env, indent=1), flush=True)

    rows: list[dict] = []
    t0 = time.perf_counter()
    gdn_cases = {"prefill_layer", "prefill_model", "decode", "nnsight", "memory"}
    layer = twins(qwen3_next_layer(dtype, device)) if gdn_cases & set(cases) else None
    small = twins(qwen3_5_model(4, dtype, device)) if gdn_cases & set(cases) else None
    if "prefill_layer" in cases:
        rows += case_prefill(bench, "prefill_layer", layer, Ts, dtype, schedule)
    if "prefill_model" in cases:
        rows += case_prefill(bench, "prefill_model", small, Ts, dtype, schedule)
    if "decode" in cases:
        rows += case_decode(bench, twins(qwen3_5_model(8, dtype, device)), prefill=128)
    if "nnsight" in cases:
        rows += case_nnsight(bench, small, [128] if args.quick else [128, 1024])
    if "memory" in cases:
        mem_Ts = [1024, 4096] + ([16384] if device.type == "cuda" else [])
        pairs = {"prefill_layer": layer, "prefill_model": small}
        rows += case_memory(bench, pairs, mem_Ts, dtype, passes=1 if args.quick else 2)
    if "kda_prefill" in cases:
        kda_Ts = [128, 1024] + ([4096] if device.type == "cuda" else [])
        rows += case_prefill(bench, "kda_prefill", twins(kimi_linear_model(4, dtype, device)), kda_Ts, dtype, schedule)
    if "kda_decode" in cases:
        rows += case_decode(bench, twins(kimi_linear_model(8, dtype, device)), prefill=128, name="kda_decode")
    wall = time.perf_counter() - t0

    result = {
        "environment": env,
        "settings": {
            "quick": args.quick,
            "warmup": args.warmup,
            "min_reps": reps,
            "budget_s": budget,
            "batch": 1,
            "clock": bench.clock,
            "order": "interleaved, rotated per round (A B, B A, ...); ratio = median of per-round ratios",
            "layer": layer
            and {
                "class": type(layer[0]).__name__,
                "hidden_size": 2048,
                "linear_num_key_heads": 16,
                "linear_num_value_heads": 32,
                "head_dim": 128,
            },
            "small_model": small and describe(small[0]),
        },
        "wall_s": round(wall, 1),
        "rows": rows,
        "all_bitwise_equal": all(r["bitwise_equal"] is not False for r in rows),
        "goals_met": all(r["met"] is not False for r in rows),
    }
    out = Path(args.out or Path(__file__).parents[1] / "out" / f"overhead-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(
        f"wall {wall:.0f} s; all bitwise equal: {result['all_bitwise_equal']}; goals met: {result['goals_met']}; wrote {out}"
    )
    return 0


def plain_and_captured(model, ids):
    """(plain, captured): a forward, and the same forward inside `gi.capture` of every site
    (returns (logits, cache)): the capture benchmark's two sides."""

    def plain():
        return model(input_ids=ids, use_cache=False).logits

    def captured():
        with gi.capture(model) as cache:
            logits = model(input_ids=ids, use_cache=False).logits
        return logits, cache

    return plain, captured


def nnsight_source_trace(n_src, ids, layers):
    """beta and the delta-rule output of each GDN layer read through nnsight's `.source` of the
    unpatched model (the only way to reach them there), and the logits: ([values], logits)."""
    saved = []
    with n_src.trace(ids, use_cache=False):
        for i in layers:
            src = n_src.model.layers[i].linear_attn.source
            saved.append(src.b_sigmoid_0.output.save())
            saved.append(src.torch_chunk_gated_delta_rule_0.output[0].save())
        logits = n_src.output.logits.save()
    return saved, logits


def nnsight_site_trace(n_pat, ids, layers):
    """The same values read from the patched model's `beta` and `recurrence` sites."""
    saved = []
    with n_pat.trace(ids, use_cache=False):
        for i in layers:
            attn = n_pat.model.layers[i].linear_attn
            saved.append(attn.beta.output.save())
            saved.append(attn.recurrence.output.save())
        logits = n_pat.output.logits.save()
    return saved, logits


if __name__ == "__main__":
    sys.exit(main())
