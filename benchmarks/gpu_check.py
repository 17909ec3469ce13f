#!/usr/bin/env python
"""One-shot check of the fused-kernel path on a CUDA machine: everything into one JSON.

    python benchmarks/gpu_check.py --out gpu_check.json            # CUDA, fla (+ causal-conv1d): < 8 min
    python benchmarks/gpu_check.py --dry-run --out /tmp/dry.json   # CPU, tiny sizes: the plumbing only

On a CUDA machine with flash-linear-attention (fla) installed, transformers 5.25 routes the GDN
and KDA delta rule to fla's Triton kernels (and the causal conv to causal-conv1d, if installed).
This script measures, patched (gdn_intervene) against unpatched (HF) on that path:

  environment  versions, device, and `gdn_intervene.doctor.report` of one model (the routes)
  parity       every family of tests/models.py (tiny random models): a 70-token prefill (two
               64-token chunks) of batch 2 with left padding, fp32 and bf16 (dry run: fp32), with its cache;
               two decode steps; parameter gradients of the fp32 prefill: all `torch.equal`
  prefill      real GDN / KDA dimensions (`bench_atp.real_model`: the HF config classes'
               defaults, 3 GDN / KDA layers + 1 attention), bf16, T = 512, 2048, 8192:
               patched / unpatched forward time (interleaved rounds, medians of per-round
               ratios, `bench_overhead.Bench`), outputs compared bitwise
  decode       one cached decode step after a 512-token prefill, same models
  capture      `gi.capture` of every site of every GDN layer around the forward, T = 2048:
               time and peak memory against the plain patched forward; logits bitwise
  nnsight      an nnsight trace saving `beta` and `recurrence` of every layer of the patched
               model against nnsight `.source` on the unpatched one (as `bench_overhead`), T = 2048
  atp          `gdn_intervene.tracing.attribution_patching` at T = 2048 against one forward +
               backward of the unpatched model: time and peak memory
  attention    `gdn_intervene.analysis.effective_attention_for`, first GDN layer, all heads, at
               T = 4096: time, peak memory and the reconstruction error of the recurrence output
  memory       peak CUDA memory of the prefill at each T, patched / unpatched

A section that fails records its error and the rest go on; sections that would start after the
time budget (`--budget-s`, default 420 s) are recorded as skipped. The JSON is strict (no NaN or
infinity: `json.dumps(..., allow_nan=False)`; non-finite numbers are written as null).
`--dry-run` runs every section on the CPU with tiny models and sizes (T = 16 / 32 / 64), without
fla: what the tests run (tests/gpu/test_gpu_check.py) to keep the script working.

Offline GPU machine (no network; DESIGN.md section 8: Python 3.12, torch 2.11 with CUDA 13,
triton, an older transformers). Here, with network, from the checkout:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \\
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \\
      -d .whl transformers==5.25.0 "kernels>=0.19" fla-core==0.6.0 flash-linear-attention==0.6.0 \\
      nnsight==0.8.1 pydantic pydantic-core typing-inspection annotated-types greenlet zstandard \\
      huggingface-hub safetensors tokenizers pyyaml tqdm
    python3 -m pip download --no-deps --no-binary=:all: -d .whl causal-conv1d  # a source build (nvcc)
    python3 -m pip wheel --no-deps -w .whl .                                   # gdn_intervene itself

Copy the checkout (with .whl/) to the GPU machine, then there:

    python3 -m pip install -q --no-index --no-deps --target .pylib .whl/*.whl
    export PYTHONPATH=$PWD/.pylib:$PWD
    # optional, minutes of nvcc; without it the conv runs HF's torch path and the JSON says so:
    python3 -m pip install --no-index --no-deps --no-build-isolation --target .pylib .whl/causal_conv1d-*.tar.gz
    python3 benchmarks/gpu_check.py --out gpu_check.json

The JSON's `environment.routes` shows which kernels ran (fla / causal-conv1d / torch).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata as md
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # tests/models.py: the tiny models of every family

from bench_atp import real_model  # noqa: E402
from bench_overhead import (  # noqa: E402
    Bench,
    cpu_peak_bytes,
    cuda_peak_bytes,
    nnsight_site_trace,
    nnsight_source_trace,
    nothing,
    plain_and_captured,
    twins,
)

import gdn_intervene as gi  # noqa: E402

PACKAGES = ("torch", "transformers", "kernels", "fla-core", "flash-linear-attention", "causal-conv1d", "triton",
            "nnsight", "pyvene", "gdn_intervene")  # fmt: skip
REAL = ("qwen3_5", "qwen3_next", "kimi_linear")  # bench_atp.real_model kinds


class Settings:
    def __init__(self, dry_run: bool, device: torch.device, budget_s: float, reps: int):
        self.dry_run, self.device, self.budget_s, self.reps = dry_run, device, budget_s, reps
        self.dtype = torch.float32 if dry_run else torch.bfloat16
        self.prefill_Ts = [16, 32] if dry_run else [512, 2048, 8192]
        self.decode_prefill = 16 if dry_run else 512
        self.capture_T = 32 if dry_run else 2048
        self.atp_T = 32 if dry_run else 2048
        self.attention_T = 64 if dry_run else 4096
        self.parity_T = 10 if dry_run else 70
        self.real = ("qwen3_5", "kimi_linear") if dry_run else REAL
        self.start = time.perf_counter()

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak(device, call) -> int:
    return cuda_peak_bytes(call) if device.type == "cuda" else cpu_peak_bytes(call)


def _model(kind: str, s: Settings):
    """Real dimensions on CUDA; the tiny model of the family in a dry run."""
    if s.dry_run:
        from models import build

        return build(kind, dtype=s.dtype)
    return real_model(kind, s.dtype).to(s.device)


def _ids(model, T: int, device, seed: int = 0, B: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(3, vocab, (B, T), generator=g).to(device)


def _time(bench: Bench, variants: dict) -> tuple[dict, dict]:
    times = bench.interleave({k: (nothing, f) for k, f in variants.items()})
    names = list(variants)
    return bench.summary(times, names[0], names[1])


# ------------------------------------------------------------------ sections


def environment(s: Settings) -> dict:
    versions = {}
    for pkg in PACKAGES:
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    from models import build

    from gdn_intervene import doctor

    model = gi.patch(build("qwen3_5").to(s.device))
    kda = gi.patch(build("kimi_linear").to(s.device))
    return {
        "device": torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else (platform.processor() or "cpu"),
        "device_type": s.device.type,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "versions": versions,
        "dry_run": s.dry_run,
        "routes": {"qwen3_5": doctor.report(model), "kimi_linear": doctor.report(kda)},
    }


def _fields(cache) -> list[torch.Tensor]:
    out = []
    for layer in getattr(cache, "layers", []):
        for name in ("conv_states", "recurrent_states"):
            d = getattr(layer, name, None)
            if isinstance(d, dict):
                out += [v for v in d.values() if isinstance(v, torch.Tensor)]
    return out


def parity(s: Settings) -> list[dict]:
    """Every family (tests/models.py) on the fused path: prefill (fp32, bf16), two decode steps,
    gradients (fp32); patched against unpatched, bitwise."""
    from models import MODELS, build
    from transformers import DynamicCache

    rows = []
    for name in MODELS:
        for dtype in (torch.float32,) if s.dry_run else (torch.float32, torch.bfloat16):
            ref = build(name, dtype=dtype).to(s.device)
            patched = gi.patch(copy.deepcopy(ref))
            ids = _ids(ref, s.parity_T, s.device, seed=1, B=2)
            mask = torch.ones_like(ids)
            mask[1, :3] = 0
            got = {}
            for key, model in (("p", patched), ("r", ref)):
                cache = DynamicCache(config=model.config.get_text_config())
                out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).logits
                grads = []
                if dtype == torch.float32:
                    out.float().pow(2).mean().backward()
                    grads = [p.grad for p in model.parameters()]
                    model.zero_grad(set_to_none=True)
                steps, fields, step, m = [out.detach()], [_fields(cache)], out[:, -1:].argmax(-1), mask
                with torch.no_grad():
                    for _ in range(2):
                        m = torch.cat([m, torch.ones_like(step)], 1)
                        steps.append(model(input_ids=step, attention_mask=m, cache=cache, use_cache=True).logits)
                        fields.append(_fields(cache))
                        step = steps[-1][:, -1:].argmax(-1)
                got[key] = steps, fields, grads
            (sp, fp, gp), (sr, fr, gr) = got["p"], got["r"]
            row = {
                "family": name,
                "dtype": str(dtype).removeprefix("torch."),
                "T": s.parity_T,
                "prefill_equal": torch.equal(sp[0], sr[0]),
                "decode_equal": all(torch.equal(a, b) for a, b in zip(sp[1:], sr[1:])),
                "cache_equal": all(
                    len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)) for a, b in zip(fp, fr)
                ),
                "max_abs_logit_diff": max(float((a.float() - b.float()).abs().max()) for a, b in zip(sp, sr)),
            }
            if gp:
                row["grads_equal"] = all((a is None and b is None) or torch.equal(a, b) for a, b in zip(gp, gr))
            row["bitwise"] = all(v for k, v in row.items() if k.endswith("_equal"))
            rows.append(row)
            del ref, patched, got
    return rows


def prefill_and_memory(s: Settings, bench: Bench) -> tuple[list[dict], list[dict]]:
    rows, mem = [], []
    for kind in s.real:
        unpatched, patched = twins(_model(kind, s))
        for T in s.prefill_Ts:
            ids = _ids(unpatched, T, s.device, seed=T)
            calls = {
                m: (lambda model=model: model(input_ids=ids, use_cache=False).logits)
                for m, model in (("patched", patched), ("unpatched", unpatched))
            }
            with torch.no_grad():
                equal = torch.equal(calls["patched"](), calls["unpatched"]())
                ratio, med = _time(bench, calls)
                peaks = {k: _peak(s.device, c) for k, c in calls.items()}
            rows.append({"model": kind, "T": T, "ratio": ratio, "median_ms": med, "bitwise_equal": equal})
            mem.append({"model": kind, "T": T, "peak_MiB": {k: round(v / 2**20, 1) for k, v in peaks.items()},
                        "ratio": round(peaks["patched"] / max(peaks["unpatched"], 1), 4)})  # fmt: skip
        del unpatched, patched
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, mem


def decode(s: Settings, bench: Bench) -> list[dict]:
    from transformers import DynamicCache

    rows = []
    for kind in s.real:
        unpatched, patched = twins(_model(kind, s))
        ids, nxt = _ids(unpatched, s.decode_prefill, s.device, seed=2), _ids(unpatched, 1, s.device, seed=3)
        with torch.no_grad():
            cache0 = DynamicCache(config=unpatched.config)
            unpatched(input_ids=ids, cache=cache0, use_cache=True)
            caches = {}

            def variant(key, model):
                def setup():
                    caches[key] = copy.deepcopy(cache0)

                def step():
                    return model(input_ids=nxt, cache=caches[key], use_cache=True).logits

                return setup, step

            variants = {k: variant(k, m) for k, m in (("patched", patched), ("unpatched", unpatched))}
            seen = {}
            for key, (setup, step) in variants.items():
                setup()
                seen[key] = [step(), *_fields(caches[key])]
            equal = all(torch.equal(a, b) for a, b in zip(seen["patched"], seen["unpatched"]))
            times = bench.interleave(variants)
        ratio, med = bench.summary(times, "patched", "unpatched")
        rows.append(
            {"model": kind, "prefill": s.decode_prefill, "ratio": ratio, "median_ms": med, "bitwise_equal": equal}
        )
    return rows


def capture(s: Settings, bench: Bench) -> list[dict]:
    rows = []
    for kind in s.real[:1]:
        model = gi.patch(_model(kind, s))
        ids = _ids(model, s.capture_T, s.device, seed=4)

        plain, captured = plain_and_captured(model, ids)

        with torch.no_grad():
            logits, cache = captured()
            equal = torch.equal(logits, plain())
            fired = sum(len(v) for _, v in cache.items())
            held = sum(t.numel() * t.element_size() for _, v in cache.items() for t in v)
            del logits, cache
            ratio, med = _time(bench, {"captured": captured, "plain": plain})
            peaks = {"captured": _peak(s.device, captured), "plain": _peak(s.device, plain)}
        rows.append({"model": kind, "T": s.capture_T, "values_captured": fired, "captured_MiB": round(held / 2**20, 1),
                     "ratio": ratio, "median_ms": med, "bitwise_equal": equal,
                     "peak_MiB": {k: round(v / 2**20, 1) for k, v in peaks.items()}})  # fmt: skip
    return rows


def nnsight_vs_source(s: Settings, bench: Bench) -> list[dict]:
    """nnsight over the patched model saving `beta` and `recurrence` of every GDN layer, against
    nnsight `.source` over the unpatched one saving `b_sigmoid_0` and the chunk kernel's output
    (`bench_overhead.case_nnsight`'s measure, with the model's own vocabulary)."""
    from nnsight import NNsight

    unpatched, patched = twins(_model("qwen3_5", s))
    n_src, n_pat = NNsight(unpatched), NNsight(patched)
    layers = [i for i, t in enumerate(unpatched.config.layer_types) if t == "linear_attention"]
    ids = _ids(unpatched, s.capture_T, s.device, seed=3)

    source_trace = lambda: nnsight_source_trace(n_src, ids, layers)
    site_trace = lambda: nnsight_site_trace(n_pat, ids, layers)

    with torch.no_grad():
        (a, la), (b, lb) = source_trace(), site_trace()
        equal = (
            len(a) == len(b) == 2 * len(layers) and all(torch.equal(x, y) for x, y in zip(a, b)) and torch.equal(la, lb)
        )
        del a, b, la, lb
        ratio, med = _time(bench, {"sites_patched": site_trace, "source_unpatched": source_trace})
    return [{"model": "qwen3_5", "T": s.capture_T, "ratio": ratio, "median_ms": med, "bitwise_equal": equal,
             "note": "patched + nnsight .output of beta and recurrence / unpatched + nnsight .source"}]  # fmt: skip


def atp(s: Settings) -> list[dict]:
    from gdn_intervene import tracing  # lazily: the module may be a package with the same name exported

    rows = []
    for kind in s.real[:1]:
        model = gi.patch(_model(kind, s))
        clean = _ids(model, s.atp_T, s.device, seed=5)
        corrupt = clean.clone()
        corrupt[0, s.atp_T // 4] = (clean[0, s.atp_T // 4] + 1) % model.config.get_text_config().vocab_size
        answers = (5, 7)

        def fwd_bwd():  # the unpatched model's forward + backward of the same metric
            gi.unpatch(model)
            try:
                model.zero_grad(set_to_none=True)
                last = model(input_ids=clean, use_cache=False).logits[:, -1].float()
                (last[0, answers[0]] - last[0, answers[1]]).backward()
                model.zero_grad(set_to_none=True)
            finally:
                gi.patch(model, selfcheck=False)

        def run_atp():
            return tracing.attribution_patching(model, clean, corrupt, answers=answers)

        t_base = _median_s(s, fwd_bwd)
        t_atp = _median_s(s, run_atp)
        p_base, p_atp = _peak(s.device, fwd_bwd), _peak(s.device, run_atp)
        res = run_atp()
        finite = _finite_scores(res)
        rows.append({"model": kind, "T": s.atp_T, "fwd_bwd_s": t_base, "atp_s": t_atp, "atp_over_fwd_bwd": t_atp / t_base,
                     "peak_fwd_bwd_MiB": round(p_base / 2**20, 1), "peak_atp_MiB": round(p_atp / 2**20, 1),
                     "scores_finite": finite})  # fmt: skip
    return rows


def _finite_scores(result) -> bool | None:
    """Whether every score the result holds (one TraceResult, or a list of them) is finite where defined."""
    results = result if isinstance(result, list) else [result]
    for r in results:
        for name in ("scores", "estimates"):
            v = getattr(r, name, None)
            if isinstance(v, dict):
                vals = [x for t in v.values() for x in (t.flatten().tolist() if isinstance(t, torch.Tensor) else [t])]
                return all(math.isfinite(x) for x in vals if x is not None and not math.isnan(x))
    return None


def _median_s(s: Settings, fn) -> float:
    fn()
    ts = []
    for _ in range(max(3, s.reps // 3)):
        _sync(s.device)
        t = time.perf_counter()
        fn()
        _sync(s.device)
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def attention(s: Settings) -> list[dict]:
    from gdn_intervene import analysis as an

    rows = []
    for kind in s.real[:1]:
        model = gi.patch(_model(kind, s))
        ids = _ids(model, s.attention_T, s.device, seed=6)
        layer = next(iter(gi.gdn_layers(model)))

        def run():
            with torch.no_grad():
                return an.effective_attention_for(model, ids, layers=[layer], check=True)

        t = _median_s(s, run)
        peak = _peak(s.device, run)
        res = run()[layer]
        rows.append({"model": kind, "T": s.attention_T, "layer": layer, "seconds": t, "peak_MiB": round(peak / 2**20, 1),
                     "matrix_shape": list(res.matrix.shape), "reconstruction_error": res.error})  # fmt: skip
        del res
    return rows


# ------------------------------------------------------------------ driver


def _clean(x):
    """Strict JSON: non-finite floats -> None, tensors and tuples -> lists, other objects -> str."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _clean(x.tolist())
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check.json", help="the JSON to write (default gpu_check.json)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models and sizes, no fla: the plumbing only")
    ap.add_argument(
        "--budget-s", type=float, default=420.0, help="no section starts after this many seconds (default 420)"
    )
    ap.add_argument("--reps", type=int, default=9, help="timed rounds per timing (default 9; dry run 3)")
    ap.add_argument("--sections", default="parity,prefill,decode,capture,nnsight,atp,attention",
                    help="comma-separated subset (memory comes with prefill)")  # fmt: skip
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --dry-run on a CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    s = Settings(args.dry_run, device, args.budget_s, 3 if args.dry_run else args.reps)
    torch.manual_seed(0)
    if args.dry_run:
        torch.set_num_threads(1)
    bench = Bench(device, warmup=1 if args.dry_run else 2, reps=s.reps, clock="wall" if device.type == "cuda" else "cpu",
                  budget_s=0.0 if args.dry_run else 5.0)  # fmt: skip
    result: dict = {"settings": {"dry_run": s.dry_run, "dtype": str(s.dtype).removeprefix("torch."), "budget_s": s.budget_s,
                                 "reps": s.reps, "prefill_T": s.prefill_Ts, "decode_prefill": s.decode_prefill,
                                 "capture_T": s.capture_T, "atp_T": s.atp_T, "attention_T": s.attention_T,
                                 "parity_T": s.parity_T, "real_models": list(s.real)},
                    "errors": {}, "skipped": [], "seconds": {}}  # fmt: skip
    wanted = args.sections.split(",")
    sections = [
        ("environment", lambda: environment(s)),
        ("parity", lambda: parity(s)),
        ("prefill", lambda: prefill_and_memory(s, bench)),
        ("decode", lambda: decode(s, bench)),
        ("capture", lambda: capture(s, bench)),
        ("nnsight", lambda: nnsight_vs_source(s, bench)),
        ("atp", lambda: atp(s)),
        ("attention", lambda: attention(s)),
    ]
    for name, run in sections:
        if name != "environment" and name not in wanted:
            continue
        if s.left() <= 0:
            result["skipped"].append(name)
            continue
        t = time.perf_counter()
        try:
            out = run()
            if name == "prefill":
                result["prefill"], result["memory"] = out
            else:
                result[name] = out
        except Exception as e:  # one section's failure must not lose the others
            result["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
        finally:
            result["seconds"][name] = round(time.perf_counter() - t, 2)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"{name}: {result['seconds'][name]} s{' (error)' if name in result['errors'] else ''}", flush=True)
    result["parity_all_bitwise"] = all(r["bitwise"] for r in result["parity"]) if result.get("parity") else None
    result["total_s"] = round(time.perf_counter() - s.start, 1)
    text = json.dumps(_clean(result), indent=1, allow_nan=False)
    Path(args.out).write_text(text + "\n")
    print(f"wrote {args.out}: {result['total_s']} s, parity bitwise {result['parity_all_bitwise']}, "
          f"errors {sorted(result['errors']) or 'none'}, skipped {result['skipped'] or 'none'}")  # fmt: skip
    return 0 if result["parity_all_bitwise"] is not False and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
