#!/usr/bin/env python
"""Cost of the first-call self-check (gdn_intervene.selfcheck) on the small benchmark model.

The check runs once per patched class (one class in this model), on the first call: HF's
forward and the decomposed forward on one row of `selfcheck.TOKENS` tokens. Reported: the
check alone (median of `--reps` runs, process CPU time), and the first call of a fresh patched
model with the check against one without it, at prefill lengths T, for scale.

    python benchmarks/bench_selfcheck.py --out benchmarks/results/selfcheck-cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_overhead import VOCAB, qwen3_5_model  # noqa: E402

import gdn_intervene as gi  # noqa: E402
from gdn_intervene import selfcheck  # noqa: E402


def cpu_ms(fn) -> float:
    t = time.process_time()
    fn()
    return (time.process_time() - t) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--T", default="128,1024")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = qwen3_5_model(4, torch.float32, torch.device("cpu"))
    model = gi.patch(copy.deepcopy(base))
    layer = gi.gdn_layer(model, 0)
    x = torch.randn(1, 1024, base.config.hidden_size)
    for _ in range(3):  # warm-up
        layer.self_check(x)
    check = sorted(cpu_ms(lambda: layer.self_check(x)) for _ in range(args.reps))
    rows = {"check_ms_median": statistics.median(check), "check_ms_min": check[0], "first_call": []}
    for T in [int(t) for t in args.T.split(",")]:
        ids = torch.randint(3, VOCAB, (1, T))
        with torch.no_grad():
            model(ids)  # warm
            fwd = statistics.median(cpu_ms(lambda: model(ids)) for _ in range(max(3, args.reps // 3)))
        rows["first_call"].append({"T": T, "forward_ms": fwd, "check_over_forward": rows["check_ms_median"] / fwd})
    rows["env"] = {
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "threads": args.threads,
        "tokens": selfcheck.TOKENS,
        "model": "qwen3_5_model(4): D 512, 3 GDN layers",
    }
    text = json.dumps(rows, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
