"""Command line: `gdn-intervene {demo,trace,attention,doctor}` (also `python -m gdn_intervene`).

This module parses arguments and calls the library; torch, transformers and the rest of the
package are imported inside the command functions, so `--help` stays fast. Library functions
raise exceptions; `main` alone turns a usage or input error into one line `error: ...` on
stderr and exit status 2, checked before the model runs where the input allows.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from .checkpoints import CheckpointError, check_name  # these import no torch: --help stays fast
from .sites import SITE_NAMES, TRACE_SITES
from .toy import CORRUPTIONS

DTYPES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """A bad command line or input; `main` prints it as `error: ...` and returns 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message and exits; we want one line
        raise UsageError(f"{message} (see {self.prog} --help)")


# ------------------------------------------------------------------ argument types (no torch)


def _sites(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"no site names in {text!r}; sites are: {', '.join(SITE_NAMES)}")
    bad = [n for n in names if n not in SITE_NAMES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown site(s) {', '.join(map(repr, bad))}; sites are: {', '.join(SITE_NAMES)}"
        )
    return names


def _ints(text: str) -> list[int]:
    parts = [s.strip() for s in text.split(",")]
    try:
        values = [int(s) for s in parts]
    except ValueError:
        bad = next(s for s in parts if not s.lstrip("-").isdigit())
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 3,4; {bad!r} in {text!r} is not one"
        ) from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"positions and indices must be >= 0; got {text!r}")
    return values


def _nonnegative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0; got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0; got {text!r}")
    return value


def _positive(text: str) -> int:
    value = _nonnegative(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}")
    return value


def _tokens(text: str) -> tuple[str, str]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"expected two tokens A,B; got {text!r}")
    if parts[0] == parts[1]:
        raise argparse.ArgumentTypeError(_SAME_ANSWERS.format(text=text, token=parts[0]))
    return parts[0], parts[1]


_SAME_ANSWERS = (
    "expected two different tokens A,B; got {text!r}, the token {token!r} twice (logit(A) - logit(B) "
    "would be 0 everywhere)"
)


# ------------------------------------------------------------------ checks before any work


def _prompt_text(text: str | None, option: str = "--prompt") -> None:
    """Refuse an empty (or all-whitespace) prompt before the model loads."""
    if text is not None and not text.strip():
        raise UsageError(f"{option} is empty; expected text with at least one token (got {text!r})")


def _prompt_ids(tok, text: str, device, option: str = "--prompt"):
    """The token ids [1, T] of a prompt (special tokens added); refuse text that gives no token of
    its own (only what the tokenizer adds, such as <bos>)."""
    if not tok(text, add_special_tokens=False).input_ids:
        raise UsageError(
            f"{option} {text!r} gives no token (only the tokenizer's own special tokens); expected text "
            "with at least one token"
        )
    return tok(text, return_tensors="pt").input_ids.to(device)


def _attribution_args(tok, args, T: int):
    """(position, answer ids or None) of `attention --attribution`, checked against the prompt's T
    tokens and the vocabulary before any forward: None answers mean the model's top two."""
    position = T - 1 if args.position is None else args.position
    if not 0 <= position < T:
        raise UsageError(f"--position {position}: the prompt has {T} tokens; expected a position in 0..{T - 1}")
    if args.answers is None:
        return position, None
    answers = tuple(_token_id(tok, t, option="--answers") for t in args.answers)
    if answers[0] == answers[1]:
        raise UsageError(
            f"--answers {','.join(args.answers)}: both are the token {_labels(tok, answers[:1])[0]!r}; "
            "expected two different tokens A,B (logit(A) - logit(B) would be 0 everywhere)"
        )
    return position, answers


def _out_dir(path: str) -> Path:
    """Create `path` (parents too) and prove a file can be written there."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".gdn-write-test-"):
            pass
    except OSError as e:
        raise UsageError(f"--out {path}: cannot create or write there ({e.strerror or e})") from None
    return out


def _html_wanted(flag) -> bool:
    """--html: True (asked, needs plotly), False, or None (the demo: when plotly is installed)."""
    import importlib.util

    have = importlib.util.find_spec("plotly") is not None
    if flag and not have:
        raise UsageError('--html needs plotly: pip install "gdn_intervene[all]" (or pip install plotly)')
    if flag is None and not have:
        print('note: plotly is not installed, so no report.html (pip install "gdn_intervene[all]")', file=sys.stderr)
    return bool(have if flag is None else flag)


def _device(name: str):
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here; use --device cpu")
    return dev


def _load(model: str | None, device, dtype: str):
    """(patched model in eval mode on `device`, tokenizer, name)."""
    from .checkpoints import load

    try:
        return load(model, dtype=dtype, device=device)
    except CheckpointError as e:
        raise UsageError(str(e)) from None


def _token_id(tok, token: str | None, option: str = "--replacement") -> int:
    """The id of a token given on the command line; refuse one the tokenizer does not know."""
    unk = tok.unk_token_id
    if token is None:
        if unk is None:
            raise UsageError("--corrupt-positions needs --replacement TOKEN: this tokenizer has no unknown token")
        return unk
    i = tok.convert_tokens_to_ids(token)
    if i is None or (i == unk and token != tok.unk_token):
        raise UsageError(
            f"{option} {token!r} is not a token of this tokenizer (it maps to the unknown token); "
            f"use a token from its vocabulary, e.g. {tok.convert_ids_to_tokens(min(5, len(tok) - 1))!r}"
        )
    return i


def _same_answer_hint(command: str) -> str:
    if command == "demo":
        return "try another corruption: --corrupt value or --corrupt query, or another --seed"
    return "try another corruption: corrupt a token the answer depends on (--corrupt-positions / --replacement or --corrupt)"


# ------------------------------------------------------------------ commands


def _labels(tok, ids) -> list[str]:
    return tok.convert_ids_to_tokens([int(i) for i in ids])


def _attribution(model, tok, ids, answers: tuple[int, int], position: int):
    """Direct logit-difference attribution of logit(a) - logit(b) at `position`: (Attribution,
    json record, printed lines, what it attributes)."""
    from .analysis import attribution_for

    att = attribution_for(model, ids, positions=[position], direction=answers)
    a, b = _labels(tok, answers)
    what = f"logit({a}) - logit({b})"
    tokens = _labels(tok, ids[0])
    per_source = att.contributions[0, :, :, 0].sum(1)  # [L, T], summed over heads
    record = {"of": what, "position": position, "layers": list(att.layers),
              "direct_effect": [round(float(v), 6) for v in att.value[0, :, 0]],
              "per_source": [[round(float(v), 6) for v in row] for row in per_source],
              "peak": {str(L): int(per_source[i].argmax()) for i, L in enumerate(att.layers)}}  # fmt: skip
    lines = [f"attribution of {what} at {position}:{tokens[position]}: " + "; ".join(
        f"layer {L} direct effect {float(att.value[0, i, 0]):.2f}, peak at {int(per_source[i].argmax())}:"
        f"{tokens[int(per_source[i].argmax())]}" for i, L in enumerate(att.layers))]  # fmt: skip
    return att, record, lines, what


def _trace_and_write(model, tok, clean, bad, *, sites, out: Path, html: bool, progress: bool, record: dict,
                     command: str, attention_ids=None, attribution: bool = False, method: str = "patching",
                     verify: int = 0, compare: bool = False, atp: dict | None = None) -> list[Path]:  # fmt: skip
    """Trace (activation patching, or `method="atp"` attribution patching with `verify` top cells
    re-checked) and write its files (`outputs.write`); `compare`: also attribution patching of
    the same cells beside the trace (the demo); `attribution`: also the direct logit attribution
    of the clean run's answer against the corrupted run's, at the last position."""
    from . import outputs
    from .tracing import SameAnswerError, ZeroSpanError, agreement, attribution_patching, causal_trace

    tokens = _labels(tok, clean[0])
    try:
        if method == "atp":
            result = attribution_patching(model, clean, bad, sites=sites, tokens=tokens, verify=verify, **(atp or {}))
        else:
            result = causal_trace(model, clean, bad, sites=sites, tokens=tokens, progress=progress)
    except SameAnswerError as e:
        raise UsageError(
            f"the clean and corrupted prompts have the same answer {_labels(tok, [e.answer])[0]!r}: the "
            f"corruption does not change the prediction, so nothing can be restored; "
            f"{_same_answer_hint(command)}"
        ) from None
    except ZeroSpanError as e:
        raise UsageError(f"{e}; {_same_answer_hint(command)}") from None
    answers = _labels(tok, result.answers)
    corrupted = _labels(tok, bad[0, list(result.corrupted_positions)])
    record = {**record, "corruption": {**record.get("corruption", {}), "positions": list(result.corrupted_positions),
                                       "tokens": corrupted},
              "answer_tokens": {"clean": answers[0], "corrupt": answers[1]}}  # fmt: skip
    att, what, lines = None, "", []
    if attribution:
        att, record["attribution"], lines, what = _attribution(model, tok, clean, result.answers, clean.shape[1] - 1)
    atp = (
        attribution_patching(model, clean, bad, sites=sites, tokens=tokens, answers=result.answers) if compare else None
    )
    attention = None
    if html and attention_ids is not None:
        from .analysis import effective_attention_for

        attention = effective_attention_for(model, attention_ids, check=True)
    files = outputs.write(out, result, atp=atp, attribution=att, attribution_of=what, attention=attention,
                          answer_labels=answers, corrupt_tokens=dict(zip(result.corrupted_positions, corrupted)),
                          record=record, html=html, title=f"gdn-intervene {command}: {record.get('model', '')}")  # fmt: skip
    print(result.summary(answers))
    if atp is not None:
        al = agreement(atp, result)["all"]
        print(
            f"attribution patching of the same {al.cells} cells (atp.png): r {al.pearson:.2f}, rho {al.spearman:.2f} "
            f"against the trace; top-10 recall in its top 20: {al.recall:.0%} (atp_scatter.png)"
        )
    for line in lines:
        print(line)
    return files


def cmd_demo(args) -> None:
    html = _html_wanted(args.html)
    out = _out_dir(args.out)
    import gdn_intervene as gi

    from .toy import load_toy, mqar

    model, tok = load_toy()
    gi.patch(model)
    clean, bad, info = mqar.demo_prompts(args.seed, args.corrupt)
    record = {
        "model": "bundled MQAR toy",
        "seed": args.seed,
        **info,
        "corruption": {
            "kind": args.corrupt,
            "clean_prompt": " ".join(_labels(tok, clean[0])),
            "corrupt_prompt": " ".join(_labels(tok, bad[0])),
        },
    }
    files = _trace_and_write(
        model,
        tok,
        clean,
        bad,
        sites=args.sites,
        out=out,
        html=html,
        progress=not args.no_progress,
        record=record,
        command="demo",
        attention_ids=clean,
        attribution=True,
        compare=True,
    )
    print(
        f"queried key at position {info['key_position']}, its value at {info['value_position']}; "
        f"wrote {', '.join(map(str, files))}"
    )


def cmd_trace(args) -> None:
    atp_only = [o for o, v in (("--verify", args.verify), ("--steps", args.steps), ("--path", args.path)) if v]
    if atp_only and args.method != "atp":
        raise UsageError(f"{', '.join(atp_only)} go{'es' if len(atp_only) == 1 else ''} with --method atp (attribution "
                         "patching's integration and the re-check of its top cells by activation patching)")  # fmt: skip
    _prompt_text(args.prompt)
    _prompt_text(args.corrupt, "--corrupt")
    html = _html_wanted(args.html)
    out = _out_dir(args.out)
    device = _device(args.device)
    model, tok, name = _load(args.model, device, args.dtype)
    clean = _prompt_ids(tok, args.prompt, device)
    T = clean.shape[1]
    if args.corrupt is not None:
        bad = _prompt_ids(tok, args.corrupt, device, "--corrupt")
        if bad.shape != clean.shape:
            raise UsageError(
                f"the prompt has {T} tokens and --corrupt has {bad.shape[1]}; causal tracing needs equal "
                "token lengths (or use --corrupt-positions)"
            )
        corruption = {"kind": "prompt", "corrupt_prompt": args.corrupt}
    else:
        positions = args.corrupt_positions
        if any(p >= T for p in positions):
            raise UsageError(
                f"--corrupt-positions {','.join(map(str, positions))}: the prompt has {T} tokens "
                f"(positions 0..{T - 1}, <bos> included where the tokenizer adds it)"
            )
        rid = _token_id(tok, args.replacement)
        bad = clean.clone()
        bad[0, positions] = rid
        corruption = {"kind": "positions", "replacement": tok.convert_ids_to_tokens(rid)}
    if args.attention_report and not html:
        raise UsageError("--attention-report goes with --html")
    record = {
        "model": name,
        "prompt": args.prompt,
        "dtype": args.dtype,
        "device": str(device),
        "corruption": corruption,
        "method": args.method,
    }
    files = _trace_and_write(
        model,
        tok,
        clean,
        bad,
        sites=args.sites,
        out=out,
        html=html,
        progress=not args.no_progress,
        record=record,
        command="trace",
        attention_ids=clean if args.attention_report else None,
        method=args.method,
        verify=args.verify,
        atp={k: v for k, v in (("steps", args.steps), ("path", args.path)) if v is not None},
    )
    print(f"wrote {', '.join(map(str, files))}")


def cmd_attention(args) -> None:
    _prompt_text(args.prompt)
    if not args.attribution and (
        given := [o for o, v in (("--position", args.position), ("--answers", args.answers)) if v is not None]
    ):
        raise UsageError(f"{' and '.join(given)} go{'es' if len(given) == 1 else ''} with --attribution")
    html = _html_wanted(args.html)
    out = _out_dir(args.out)
    device = _device(args.device)
    model, tok, name = _load(args.model, device, args.dtype)
    from . import plot
    from .analysis import effective_attention_for

    ids, HV = _attention_inputs(args, model, tok, device)
    if args.attribution:  # checked before any forward and before any figure is written
        position, answers = _attribution_args(tok, args, ids.shape[1])
    tokens = plot.position_labels(_labels(tok, ids[0]))
    att = effective_attention_for(model, ids, layers=args.layers, heads=args.heads, check=True)
    files = []
    heads = args.heads if args.heads is not None else list(range(HV))
    for layer, a in att.items():
        files.append(out / f"attention_layer{layer}.png")
        plot.effective_attention_grid(a, head_labels=heads, tokens=tokens, path=files[-1],
                                      title=f"{name}: GDN layer {layer}, exact effective attention M")  # fmt: skip
        print(f"layer {layer}: heads {','.join(map(str, heads))}; |M v - o| / |o| = {a.error:.1e}")
    attribution, what = None, ""
    if args.attribution:
        attribution, what = _attention_attribution(model, tok, ids, answers, position, out / "attribution.png")
        files.append(out / "attribution.png")
    if html:
        from . import report

        mats = {layer: (a.matrix[0], heads) for layer, a in att.items()}
        files.append(report.write_html(out / "report.html", attention=mats, attribution=attribution,
                                       attribution_of=what, tokens=_labels(tok, ids[0]),
                                       title=f"gdn-intervene attention: {name}"))  # fmt: skip
    print(f"wrote {', '.join(map(str, files))}")


def _attention_inputs(args, model, tok, device):
    """(ids [1, T], value heads HV) of `attention`, --layers and --heads checked against the model
    (one-line errors, before any forward)."""
    import gdn_intervene as gi

    if args.prompt is None:
        from .toy import mqar

        if args.model is not None:
            raise UsageError("--prompt is required with --model (the default prompt is for the bundled toy model)")
        ids = mqar.demo_prompts(0).clean.to(device)
    else:
        ids = _prompt_ids(tok, args.prompt, device)
    gdn = list(gi.gdn_layers(model))
    if args.layers is not None and (bad := [L for L in args.layers if L not in gdn]):
        raise UsageError(
            f"--layers {','.join(map(str, bad))}: not GDN layers; the GDN layers are {', '.join(map(str, gdn))}"
        )
    HV = next(iter(gi.gdn_layers(model).values())).gdn_heads[1]
    if args.heads is not None and (bad := [h for h in args.heads if h >= HV]):
        raise UsageError(f"--heads {','.join(map(str, bad))}: the layers have {HV} value heads (0..{HV - 1})")
    return ids, HV


def _attention_attribution(model, tok, ids, answers, position: int, path):
    """`attention --attribution`: the attribution of the answers' logit difference at `position`
    (default answers: the model's top two there), drawn to `path`; (Attribution, what it is of)."""
    import torch

    from . import plot

    if answers is None:
        with torch.no_grad():
            answers = tuple(int(i) for i in model(input_ids=ids).logits[0, position].topk(2).indices)
    attribution, _, lines, what = _attribution(model, tok, ids, answers, position)
    plot.attribution_heatmap(attribution, tokens=_labels(tok, ids[0]), what=what, path=path)
    print(*lines, sep="\n")
    return attribution, what


def cmd_doctor(args) -> None:
    if args.model is not None:  # the checks of _load, without loading
        try:
            check_name(args.model)
        except CheckpointError as e:
            raise UsageError(str(e)) from None
    from .doctor import report

    print(report(args.model), end="")


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="gdn-intervene",
        description="Interventions on Gated DeltaNet layers of HF hybrid models: causal tracing over the GDN sites "
        "and exact effective attention. Run `gdn-intervene demo` first.",
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="{demo,trace,attention,doctor}")
    _demo_parser(sub)
    _trace_parser(sub)
    _attention_parser(sub)
    _doctor_parser(sub)
    return ap


def _out_arg(p, default: str, what: str) -> None:
    p.add_argument("--out", default=default, metavar="DIR", help=f"output directory for {what}; created if missing, "
                   "checked before the model runs (default: %(default)s)")  # fmt: skip


def _sites_arg(p) -> None:
    p.add_argument("--sites", type=_sites, default=TRACE_SITES, metavar="S1,S2",
                   help=f"comma-separated GDN sites to restore (default: {','.join(TRACE_SITES)}); valid: "
                   f"{', '.join(SITE_NAMES)}")  # fmt: skip


def _model_args(p) -> None:
    p.add_argument(
        "--model",
        default=None,
        metavar="PATH_OR_ID",
        help="checkpoint directory or hub id (owner/name) (default: the bundled MQAR toy model)",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="weights and compute dtype, also for the bundled model (default: %(default)s)")  # fmt: skip


def _demo_parser(sub) -> None:
    d = sub.add_parser(
        "demo",
        help="causal tracing of the bundled MQAR model (offline)",
        description="Causal tracing of the bundled MQAR model: restore each GDN site of the clean run at "
        "each (layer, position) of the corrupted run and measure the fraction of the clean-vs-corrupt "
        "logit difference that comes back; attribution patching of the same cells beside it.",
    )
    _out_arg(d, "gdn_demo", "trace.json, trace.png, atp.png, atp_scatter.png, attribution.png and report.html")
    d.add_argument(
        "--seed", type=int, default=0, help="which 8 key-value pairs and which queried key (default: %(default)s)"
    )
    d.add_argument(
        "--corrupt",
        default="key",
        choices=CORRUPTIONS,
        help="what the corrupted prompt replaces: the queried pair's key in the context (key), its value "
        "(value), or the final query by another context key (query) (default: %(default)s)",
    )
    _sites_arg(d)
    d.add_argument(
        "--html",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write the interactive report.html (default: yes when plotly is installed)",
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bar")  # fmt: skip


_METHOD_HELP = (
    "patching: activation patching, one forward per group of cells, exact (default; right for small models and "
    "short prompts, its cost grows with sites x layers x positions); atp: attribution patching, every cell "
    "estimated from a few forwards and backwards (--steps points of a path from the corrupted to the clean run, "
    "each one forward + backward), for big models and long prompts: rank with it, then confirm its top cells by "
    "patching with --verify (default: %(default)s)"
)


def _trace_parser(sub) -> None:
    from .tracing.paths import ACTIVATIONS, DEFAULT_PATH, DEFAULT_STEPS, INPUTS

    t = sub.add_parser(
        "trace",
        help="causal tracing on any supported checkpoint",
        description="Causal tracing on any supported checkpoint: a clean prompt and either a corrupted "
        "prompt of the same token length or positions to overwrite.",
    )
    t.add_argument("--prompt", required=True, help="the clean prompt (text; the tokenizer's special tokens are added)")
    g = t.add_mutually_exclusive_group(required=True)
    g.add_argument("--corrupt", metavar="TEXT", help="the corrupted prompt (same token length as --prompt)")
    g.add_argument(
        "--corrupt-positions",
        type=_ints,
        metavar="P1,P2",
        help="comma-separated token positions of --prompt to overwrite with --replacement (0 = first token)",
    )
    t.add_argument(
        "--replacement",
        default=None,
        metavar="TOKEN",
        help="vocabulary token written at --corrupt-positions (default: the tokenizer's unknown token)",
    )
    _model_args(t)
    _sites_arg(t)
    _out_arg(t, "gdn_trace", "trace.json, trace.png (and report.html)")
    t.add_argument("--method", default="patching", choices=("patching", "atp"), help=_METHOD_HELP)
    t.add_argument(
        "--steps",
        type=_positive,
        default=None,
        metavar="K",
        help=f"with --method atp: integrated-gradient points (1: first order, cheapest, wrong where effects "
        f"saturate; default: {DEFAULT_STEPS}); the cost is about K forwards and backwards",
    )
    t.add_argument(
        "--path",
        default=None,
        choices=(INPUTS, ACTIVATIONS),
        help=f"with --method atp: what is interpolated, the residual entering the first layer (inputs: one "
        f"run per step for every cell) or each site's own value (activations: one row per site, layer and "
        f"step; better ranks for small effects) (default: {DEFAULT_PATH})",
    )
    t.add_argument(
        "--verify",
        type=_nonnegative,
        default=0,
        metavar="K",
        help="with --method atp: re-run activation patching on the K cells of largest |estimate| and report "
        "both (default: %(default)s)",
    )
    t.add_argument("--html", action="store_true", help="also write the interactive report.html")
    t.add_argument(
        "--attention-report",
        action="store_true",
        help="with --html: add the effective attention of the clean prompt to the report",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")  # fmt: skip


def _attention_parser(sub) -> None:
    a = sub.add_parser(
        "attention",
        help="exact effective-attention heatmaps (o = M v)",
        description="Exact effective attention M of GDN layers (o = M v, o the delta-rule output): one "
        "PNG per layer with the chosen heads on one colour scale.",
    )
    a.add_argument(
        "--prompt", default=None, help="text to run (default: the demo's clean MQAR prompt; required with --model)"
    )
    a.add_argument(
        "--layers",
        type=_ints,
        default=None,
        metavar="L1,L2",
        help="comma-separated GDN layer indices (default: all GDN layers)",
    )
    a.add_argument(
        "--heads", type=_ints, default=None, metavar="H1,H2", help="comma-separated value heads (default: all)"
    )
    _model_args(a)
    _out_arg(a, "gdn_attention", "attention_layer<L>.png (and attribution.png, report.html)")
    a.add_argument(
        "--attribution",
        action="store_true",
        help="also attribute logit(A) - logit(B) at --position to (layer, head, source position): "
        "attribution.png, and a view in report.html",
    )
    a.add_argument(
        "--position", type=int, default=None, help="query position for --attribution (default: the last token)"
    )
    a.add_argument(
        "--answers",
        type=_tokens,
        default=None,
        metavar="A,B",
        help="the two tokens whose logit difference --attribution splits (default: the model's top two "
        "predictions at --position)",
    )
    a.add_argument("--html", action="store_true", help="also write the interactive report.html (head picker, token hover)")  # fmt: skip


def _doctor_parser(sub) -> None:
    dr = sub.add_parser(
        "doctor",
        help="versions, kernel routes and self-check, to paste into bug reports",
        description="Print the installed versions against the tested ranges, which implementation each "
        "GDN layer's kernels run (torch, fla, causal-conv1d or a hub kernel), and the first-call "
        "self-check result, for a model loaded on CPU.",
    )
    dr.add_argument("--model", default=None, metavar="PATH_OR_ID",
                    help="checkpoint directory or hub id (owner/name) (default: the bundled MQAR toy model)")  # fmt: skip


_FALLBACK = "is falling back to its reference PyTorch implementation"


@contextlib.contextmanager
def _quiet(args):
    """Inside a command: on a CPU, drop transformers' "... is falling back to its reference PyTorch
    implementation ... much slower" lines (flash-linear-attention and causal-conv1d run on GPUs
    only, so the torch kernels are the path on a CPU, chosen, not a fallback); for the bundled toy
    (574 KB) also its "Loading weights" bar. A library user still sees both (docs/install.md says
    why); on a GPU the lines stay, since there they mean a missing package."""
    import logging

    on_cpu = str(getattr(args, "device", "cpu")).startswith("cpu")
    toy = args.command == "demo" or getattr(args, "model", "") is None
    if not (on_cpu or toy):
        yield
        return
    from transformers.utils import logging as hf_logging

    drop = logging.Filter()
    drop.filter = lambda record: _FALLBACK not in record.getMessage()
    kernels = logging.getLogger("transformers.integrations.hub_kernels")
    bar = hf_logging.is_progress_bar_enabled()
    if on_cpu:
        kernels.addFilter(drop)
    if toy:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        kernels.removeFilter(drop)
        if toy and bar:
            hf_logging.enable_progress_bar()


COMMANDS = {"demo": cmd_demo, "trace": cmd_trace, "attention": cmd_attention, "doctor": cmd_doctor}


def main(argv=None) -> int:
    """Run a command; 0 on success, 2 (after one line `error: ...` on stderr) on bad input."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "demo" or getattr(args, "model", "") is None:  # the bundled toy: refused before any work
            from .toy import unloadable

            if (why := unloadable()) is not None:
                raise UsageError(why)
        with _quiet(args):
            COMMANDS[args.command](args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, ImportError) as e:  # library errors: bad input, files, missing extras
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
