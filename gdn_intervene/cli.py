"""Command line: `gdn-intervene {demo,trace,attention}` (also `python -m gdn_intervene`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .patch import from_pretrained, patch
from .sites import SITE_NAMES
from .tracing import TRACE_SITES, TraceResult, causal_trace

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sites(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [n for n in names if n not in SITE_NAMES]
    if bad:
        raise SystemExit(f"error: unknown site(s) {bad}; sites are: {', '.join(SITE_NAMES)}")
    return names


def _plot_trace(result: TraceResult, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, score in result.scores.items():
        fig, ax = plt.subplots(figsize=(max(6, 0.32 * len(result.tokens)), 1.2 + 0.5 * len(result.layers)))
        im = ax.imshow(score.numpy(), aspect="auto", cmap="Purples", vmin=0, vmax=1)
        ax.set_xticks(range(len(result.tokens)), result.tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(len(result.layers)), [f"layer {L}" for L in result.layers])
        ax.set_title(f"restoring linear_attn.{name} of the clean run (1 = recall restored)")
        fig.colorbar(im, ax=ax, fraction=0.03)
        fig.tight_layout()
        paths.append(out / f"trace_{name}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    # all sites in one picture, for the README
    n, width = len(result.scores), max(6, 0.32 * len(result.tokens))
    fig, axes = plt.subplots(n, 1, figsize=(width, 0.9 + 0.32 * n * len(result.layers)), sharex=True,
                             squeeze=False, layout="constrained")
    for ax, (name, score) in zip(axes[:, 0], result.scores.items()):
        im = ax.imshow(score.numpy(), aspect="auto", cmap="Purples", vmin=0, vmax=1)
        ax.set_yticks(range(len(result.layers)), [f"{name}, layer {L}" for L in result.layers], fontsize=7)
    axes[-1, 0].set_xticks(range(len(result.tokens)), result.tokens, rotation=90, fontsize=7)
    fig.suptitle("restoring one GDN site of the clean run at (layer, position): recall restored (1) or not (0)", fontsize=9)
    fig.colorbar(im, ax=axes[:, 0].tolist(), fraction=0.02, pad=0.01)
    paths.append(out / "trace.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def _summary(result: TraceResult, tok) -> str:
    lines = [f"clean answer {tok(result.answers[0])!r}, corrupted answer {tok(result.answers[1])!r}; "
             f"logit diff clean {result.clean_diff:.2f}, corrupted {result.corrupt_diff:.2f}",
             f"{'site':<11} {'best layer':>10} {'position':>8} {'token':>8} {'score':>6}"]
    for name in result.sites:
        L, p, s = result.best(name)
        lines.append(f"{name:<11} {L:>10} {p:>8} {result.tokens[p]:>8} {s:6.2f}")
    return "\n".join(lines)


def _write(result: TraceResult, out: Path, extra: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "trace.json").write_text(json.dumps({**extra, **result.to_json()}, indent=1))
    return [out / "trace.json", *_plot_trace(result, out)]


def demo_prompts(seed: int = 0, corrupt: str = "key"):
    """(clean ids [1, T], corrupted ids [1, T], info) for the bundled MQAR model.

    corrupt="key": the queried pair's key in the context is replaced by a key absent from
    the context; "value": its value by an absent value; "query": the final query by another
    context key."""
    from .toy import mqar

    g = torch.Generator().manual_seed(seed)
    pairs = mqar.sample_pairs(8, generator=g)
    qi = int(torch.randint(len(pairs), (1,), generator=g))
    key, value = pairs[qi]
    clean = mqar.prompt(pairs, key)
    ids = clean.input_ids.clone()
    kpos, vpos = 1 + 2 * qi, 2 + 2 * qi
    if corrupt == "key":
        ids[0, kpos] = mqar.key_id(next(k for k in range(mqar.NUM_KEYS) if k not in dict(pairs)))
    elif corrupt == "value":
        used = {v for _, v in pairs}
        ids[0, vpos] = mqar.value_id(next(v for v in range(mqar.NUM_VALUES) if v not in used))
    elif corrupt == "query":
        ids = mqar.corrupt(pairs, key, generator=g).input_ids
    else:
        raise SystemExit(f"error: --corrupt must be key, value or query, got {corrupt!r}")
    return clean.input_ids, ids, {"key_position": kpos, "value_position": vpos, "query_position": ids.shape[1] - 1,
                                  "corrupt": corrupt}


def run_demo(out: Path, *, seed: int = 0, corrupt: str = "key", sites=TRACE_SITES, progress: bool = True) -> TraceResult:
    from .toy import load_toy

    model, tokenizer = load_toy()
    patch(model)
    clean, bad, info = demo_prompts(seed, corrupt)
    tokens = tokenizer.convert_ids_to_tokens(clean[0].tolist())
    result = causal_trace(model, clean, bad, sites=sites, tokens=tokens, progress=progress)
    files = _write(result, out, {"model": "bundled MQAR toy", **info})
    print(_summary(result, lambda i: tokenizer.convert_ids_to_tokens(i)))
    print(f"key at position {info['key_position']}, value at {info['value_position']}; wrote {', '.join(map(str, files))}")
    return result


def _load(path: str | None, device: str, dtype: str):
    if path is None:
        from .toy import load_toy

        model, tok = load_toy()
        return patch(model).to(device), tok
    from transformers import AutoTokenizer

    model = from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def run_trace(args) -> TraceResult:
    model, tok = _load(args.model, args.device, args.dtype)
    clean = tok(args.prompt, return_tensors="pt").input_ids.to(args.device)
    if args.corrupt is not None:
        bad = tok(args.corrupt, return_tensors="pt").input_ids.to(args.device)
        if bad.shape != clean.shape:
            raise SystemExit(
                f"error: the prompt has {clean.shape[1]} tokens and --corrupt has {bad.shape[1]}; causal tracing "
                "needs equal token lengths (or use --corrupt-positions)"
            )
    else:
        positions = [int(p) for p in args.corrupt_positions.split(",")]
        if any(not 0 <= p < clean.shape[1] for p in positions):
            raise SystemExit(f"error: --corrupt-positions {positions} out of range for {clean.shape[1]} tokens")
        bad = clean.clone()
        bad[0, positions] = tok.convert_tokens_to_ids(args.replacement) if args.replacement else (tok.unk_token_id or 0)
    tokens = tok.convert_ids_to_tokens(clean[0].tolist())
    result = causal_trace(model, clean, bad, sites=args.sites, tokens=tokens, progress=not args.no_progress)
    files = _write(result, Path(args.out), {"model": args.model or "bundled MQAR toy", "prompt": args.prompt})
    print(_summary(result, lambda i: tok.convert_ids_to_tokens(i)))
    print(f"wrote {', '.join(map(str, files))}")
    return result


def run_attention(args) -> None:
    from .analysis import effective_attention_for
    from .plot import effective_attention_heatmap

    model, tok = _load(args.model, args.device, args.dtype)
    if args.prompt is None:
        clean, _, _ = demo_prompts(0)
        ids = clean.to(args.device)
    else:
        ids = tok(args.prompt, return_tensors="pt").input_ids.to(args.device)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    heads = [int(x) for x in args.heads.split(",")] if args.heads else None
    tokens = tok.convert_ids_to_tokens(ids[0].tolist())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for layer, att in effective_attention_for(model, ids, layers=layers, heads=heads, check=True).items():
        for h in range(att.matrix.shape[1]):
            head = heads[h] if heads else h
            path = out / f"attention_layer{layer}_head{head}.png"
            effective_attention_heatmap(att.matrix.cpu(), head=h, tokens=tokens, title=f"layer {layer} head {head}: exact M", path=str(path))
            print(f"layer {layer} head {head}: |Mv - o|/|o| = {att.error:.1e}; wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gdn-intervene", description="Interventions on Gated DeltaNet layers.")
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="causal tracing of the bundled MQAR model (offline, ~10 s on a CPU)")
    d.add_argument("--out", default="gdn_demo", help="output directory for trace.json and PNGs")
    d.add_argument("--seed", type=int, default=0, help="which key-value pairs and query to use")
    d.add_argument("--corrupt", default="key", choices=["key", "value", "query"], help="what the corrupted prompt replaces")
    d.add_argument("--sites", type=_sites, default=TRACE_SITES, help=f"comma-separated (default {','.join(TRACE_SITES)})")
    d.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("trace", help="causal tracing on any supported checkpoint")
    t.add_argument("--model", default=None, help="checkpoint path or hub id (default: bundled toy model)")
    t.add_argument("--prompt", required=True)
    g = t.add_mutually_exclusive_group(required=True)
    g.add_argument("--corrupt", help="corrupted prompt (same token length)")
    g.add_argument("--corrupt-positions", help="comma-separated token positions to replace")
    t.add_argument("--replacement", default=None, help="token used by --corrupt-positions (default: unk)")
    t.add_argument("--sites", type=_sites, default=TRACE_SITES)
    t.add_argument("--device", default="cpu")
    t.add_argument("--dtype", default="float32", choices=list(DTYPES))
    t.add_argument("--out", default="gdn_trace")
    t.add_argument("--no-progress", action="store_true")

    a = sub.add_parser("attention", help="exact effective-attention heatmaps")
    a.add_argument("--model", default=None, help="checkpoint path or hub id (default: bundled toy model)")
    a.add_argument("--prompt", default=None, help="default: a demo MQAR prompt")
    a.add_argument("--layers", default=None, help="comma-separated GDN layer indices (default all)")
    a.add_argument("--heads", default=None, help="comma-separated value heads (default all)")
    a.add_argument("--device", default="cpu")
    a.add_argument("--dtype", default="float32", choices=list(DTYPES))
    a.add_argument("--out", default="gdn_attention")

    args = ap.parse_args(argv)
    if args.command == "demo":
        run_demo(Path(args.out), seed=args.seed, corrupt=args.corrupt, sites=args.sites, progress=not args.no_progress)
    elif args.command == "trace":
        run_trace(args)
    else:
        run_attention(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
