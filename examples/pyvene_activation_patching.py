"""Activation patching with pyvene on a GDN component: a layers x positions sweep.

For each GDN layer and each position, patch the component's value from the clean run into
the corrupted run and record how much of the clean answer's logit comes back:
    recovery = (logit_patched - logit_corrupt) / (logit_clean - logit_corrupt)   (1 = fully restored)

    python examples/pyvene_activation_patching.py                        # offline: bundled toy model
    python examples/pyvene_activation_patching.py --component linear_attn_state --out state.png
    python examples/pyvene_activation_patching.py --model Qwen/Qwen3.5-0.8B --clean "..." --corrupt "..."

`linear_attn_state` has one value per call. By itself that is the state after the prompt,
which reaches the logits only through the cache (later calls), so a single forward would show
zero recovery; here each position p runs inside `gdn_intervene.state_at(model, [p])`, which
splits the layer's prefill after p, so the component is the state after token p and the rest
of the prompt reads the patched state (positions 0..T-2: the state after the last token is
read by no logit of this call). Offline, the bundled MQAR model and the demo prompt of
`gdn-intervene demo` are used (the queried key replaced in the context).

The figure's title and the printout name the answer token and the replacement(s) by their
decoded text (token ids in parentheses).
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from tqdm import tqdm

import gdn_intervene as gi
import gdn_intervene.pyvene as gp


def load(args):
    """(patched model, tokenizer, clean ids [1, T], corrupted ids [1, T])."""
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        model = gi.patch(AutoModelForCausalLM.from_pretrained(args.model).eval())
        clean, corrupt = (tok(s, return_tensors="pt").input_ids for s in (args.clean, args.corrupt))
        return model, tok, clean, corrupt
    # The bundled MQAR model: the queried pair's key in the context replaced by an absent key.
    from gdn_intervene.toy import load_toy
    from gdn_intervene.toy.mqar import demo_prompts

    model, tok = load_toy()
    clean, corrupt, _ = demo_prompts(args.seed, "key")
    return gi.patch(model), tok, clean, corrupt


def token_text(tok, i: int) -> str:
    """A token's text as the tokenizer decodes it (repr: quotes show spaces), e.g. 'v12' or ' Paris'."""
    return repr(tok.decode([int(i)]))


def plot(grid, layers, positions, tokens, corrupted, title, out):
    """Layers x positions heatmap, x ticks `pos:token` (corrupted positions in red)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.5 + 0.45 * len(positions), 2.2 + 0.45 * len(layers)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(grid.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    for i in range(len(layers)):
        for j in range(len(positions)):
            if abs(grid[i, j]) >= 0.05:
                ax.text(
                    j,
                    i,
                    f"{grid[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if abs(grid[i, j]) > 0.6 else "black",
                )
    ax.set_xticks(
        range(len(positions)),
        [f"{p}:{tokens[p]}" for p in positions],
        rotation=60,
        ha="right",
        rotation_mode="anchor",
        fontsize=8,
    )
    for j, p in enumerate(positions):
        if p in corrupted:
            ax.get_xticklabels()[j].set_color("#d62728")
    ax.set(
        yticks=range(len(layers)),
        yticklabels=[f"layer {L}" for L in layers],
        xlabel="position:token (red: corrupted)",
        title=title,
    )
    fig.colorbar(im, ax=ax).set_label("recovery: fraction of the clean answer's\nlogit gap restored", fontsize=8)
    fig.savefig(out, dpi=160)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a checkpoint (default: the bundled toy model, offline)")
    ap.add_argument("--clean", default="The capital of France is")
    ap.add_argument("--corrupt", default="The capital of Italy is")
    ap.add_argument("--component", default="linear_attn_recurrence_output", help="a gdn_intervene.pyvene component")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="pyvene_patching.png")
    args = ap.parse_args()

    import pyvene as pv

    gp.register()
    model, tok, clean, corrupt = load(args)
    if clean.shape != corrupt.shape:
        raise SystemExit(
            f"clean and corrupted prompts must have the same length: {clean.shape[1]} vs {corrupt.shape[1]}"
        )
    tokens = tok.convert_ids_to_tokens(clean[0].tolist())
    with torch.no_grad():
        lc, lx = model(input_ids=clean).logits[0, -1], model(input_ids=corrupt).logits[0, -1]
    answer = int(lc.argmax())
    span = float(lc[answer] - lx[answer]) or 1.0

    layers = list(gi.gdn_layers(model))
    state = gp.component(args.component).site.name == "state"
    positions = list(range(clean.shape[1] - 1 if state else clean.shape[1]))
    grid = torch.zeros(len(layers), len(positions))
    bar = tqdm(total=grid.numel(), desc=f"patching {args.component}")
    for i, layer in enumerate(layers):
        iv = pv.IntervenableModel([{"layer": layer, "component": args.component, "unit": "pos"}], model)
        for j, p in enumerate(positions):
            # the state: one value per call, the state after p inside state_at (pyvene position 0)
            split = gi.state_at(model, [p], layers=[layer]) if state else contextlib.nullcontext()
            with torch.no_grad(), split:
                _, out = iv({"input_ids": corrupt}, [{"input_ids": clean}], {"sources->base": 0 if state else p})
            grid[i, j] = (out.logits[0, -1, answer] - lx[answer]) / span
            bar.update()
    bar.close()

    differ = (clean[0] != corrupt[0]).nonzero().flatten().tolist()
    replaced = ", ".join(f"{token_text(tok, clean[0, p])} -> {token_text(tok, corrupt[0, p])} at {p}" for p in differ)
    answer_text = token_text(tok, answer)
    what = f"{args.component} after each position (state_at)" if state else args.component
    plot(
        grid,
        layers,
        positions,
        tokens,
        set(differ),
        f"pyvene: {what} restored, clean -> corrupted ({replaced})\nrecovery of logit({answer_text}), the clean answer",
        args.out,
    )
    best = int(grid.argmax())
    print(
        f"clean answer {answer_text} (token {answer}); corrupted: {replaced}; max recovery {grid.max():.3f} at "
        f"layer {layers[best // len(positions)]}, position {positions[best % len(positions)]}"
        f":{tokens[positions[best % len(positions)]]}; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
