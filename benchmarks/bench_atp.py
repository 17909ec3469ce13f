#!/usr/bin/env python
"""Attribution patching (`tracing.attribution_patching`) against activation patching
(`tracing.causal_trace`): how well it ranks the cells, and what it costs at real model sizes.

    python benchmarks/bench_atp.py agreement            # the agreement table (a few minutes, CPU)
    python benchmarks/bench_atp.py sizes --T 128 512    # real dimensions (tens of minutes on 2 cores)

agreement: per prompt set and site, Pearson and Spearman correlation of AtP's estimates with
activation patching's scores over every cell both score, and the recall of activation
patching's top-10 cells (by |score|) in AtP's top 20 (`tracing.agreement`), averaged over the
set's prompt pairs. Sets: the bundled MQAR model with its key, value and query corruptions
(several seeds each), and random-weight Qwen3.5 and Kimi Linear models with two corrupted
positions per random prompt.

sizes: models with the GDN / KDA dimensions of the HF config classes' defaults (Qwen3.5: hidden
4096, 16 key / 32 value heads of 128; Kimi Linear: hidden 2304, 32 heads of 128; Qwen3-Next:
hidden 2048, 16 / 32 heads of 128), 4 layers (3 GDN / KDA, 1 full attention), a 32k vocabulary
instead of the real one (the unembedding is not what is measured) and, where the default MLP is
a mixture of hundreds of experts, 16 experts (Qwen3-Next) or dense MLPs (Kimi Linear): what does
not fit the machine is said in the output. Per T and dtype: one forward + backward of the
unpatched model (the baseline), attribution patching over all trace sites x GDN layers x
positions (wall time and allocator peak, as ratios to the baseline), and the time activation
patching would take for the same cells, measured on a batch of cells and extrapolated (said so).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_overhead import cpu_peak_bytes, environment  # noqa: E402

import gdn_intervene as gi  # noqa: E402
from gdn_intervene import tracing  # noqa: E402
from gdn_intervene.sites import TRACE_SITES  # noqa: E402

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


def agreement_table(pairs_per_set: int) -> list[dict]:
    from gdn_intervene.toy import load_toy, mqar

    toy, _ = load_toy()
    gi.patch(toy)
    sets = {
        f"MQAR toy, {kind} corrupted": [
            (c, x, None) for c, x, _ in (mqar.demo_prompts(s, kind) for s in range(pairs_per_set))
        ]
        for kind in ("key", "value", "query")
    }
    rows = []
    for name, pairs in sets.items():
        rows += _agree(toy, name, pairs)
    for kind, label in (("qwen3_5", "random-weight Qwen3.5"), ("kimi", "random-weight Kimi Linear")):
        model = gi.patch(_tiny(kind))
        rows += _agree(model, f"{label}, T = 24", _random_pairs(model, pairs_per_set, 24, 512, seed=1))
    return rows


def _agree(model, name, pairs) -> list[dict]:
    per = {}
    for clean, corrupt, answers in pairs:
        try:
            trace = tracing.causal_trace(model, clean, corrupt, answers=answers)
        except tracing.SameAnswerError:
            continue
        atp = tracing.attribution_patching(model, clean, corrupt, answers=trace.answers)
        for site, a in tracing.agreement(atp, trace).items():
            per.setdefault(site, []).append(a)
    rows = []
    for site, stats in per.items():
        mean = lambda xs: (
            float(torch.tensor([x for x in xs if x == x]).mean()) if any(x == x for x in xs) else float("nan")
        )
        rows.append(
            dict(
                set=name,
                site=site,
                pairs=len(stats),
                pearson=mean([s.pearson for s in stats]),
                spearman=mean([s.spearman for s in stats]),
                recall=mean([s.recall for s in stats]),
            )
        )
        print(
            f"{name:<34} {site:<11} pairs {len(stats)}  pearson {rows[-1]['pearson']:6.2f}  spearman "
            f"{rows[-1]['spearman']:6.2f}  top-10 recall in top 20 {rows[-1]['recall']:5.0%}",
            flush=True,
        )
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
                g = torch.Generator().manual_seed(T)
                clean = torch.randint(3, 32000, (1, T), generator=g)
                corrupt = clean.clone()
                corrupt[0, T // 4] = (clean[0, T // 4] + 1) % 32000
                answers = (5, 7)
                layers = tuple(gi.gdn_layers(model))
                cells = len(TRACE_SITES) * len(layers) * T
                unpatched = _time(lambda: _with_unpatched(model, lambda: _fwd_bwd(model, clean, answers)), reps)
                base_peak = cpu_peak_bytes(lambda: _with_unpatched(model, lambda: _fwd_bwd(model, clean, answers)))
                atp_time = _time(lambda: tracing.attribution_patching(model, clean, corrupt, answers=answers), reps)
                atp_peak = cpu_peak_bytes(lambda: tracing.attribution_patching(model, clean, corrupt, answers=answers))
                # activation patching: one forward of a batch of restored rows per group of cells
                batch = 8
                sample = [tracing.Cell("recurrence", layers[0], p) for p in range(T - batch, T)]
                source = tracing._capture(model, clean, ("recurrence",), (layers[0],), [])
                with torch.no_grad():
                    per_batch = _time(lambda: tracing._restored(model, corrupt, sample, source, T, answers), reps)
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
    for p in (a, s):
        p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/atp-<what>.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = (
        agreement_table(args.pairs) if args.what == "agreement" else sizes(args.models, args.T, args.dtypes, args.reps)
    )
    out = Path(args.out or Path(__file__).parent / "results" / f"atp-{args.what}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"environment": environment(torch.device("cpu"), torch.float32, torch.get_num_threads()), "rows": rows},
            indent=1,
            default=lambda x: None if isinstance(x, float) and math.isnan(x) else x,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
