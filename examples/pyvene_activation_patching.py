"""Activation patching with pyvene on a GDN component: a layers x positions sweep.

For each GDN layer and each position, patch the component's value from the clean run into
the corrupted run and record how much of the clean answer's logit comes back:
    recovery = (logit_patched - logit_corrupt) / (logit_clean - logit_corrupt)   (1 = fully restored)

    python examples/pyvene_activation_patching.py                        # offline: bundled toy model
    python examples/pyvene_activation_patching.py --component linear_attn_state --out state.png
    python examples/pyvene_activation_patching.py --model Qwen/Qwen3.5-0.8B --clean "..." --corrupt "..."

`linear_attn_state` has one position per call (the state after the prompt), so its sweep has
one column; it reaches the logits only through the cache, i.e. in later calls (generation),
so a single forward shows zero recovery. Offline, the bundled MQAR model and the demo prompt
of `gdn-intervene demo` are used (the queried key replaced in the context).
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

import gdn_intervene as gi
import gdn_intervene.pyvene as gp


def load(args):
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        model = gi.patch(AutoModelForCausalLM.from_pretrained(args.model).eval())
        clean, corrupt = (tok(s, return_tensors="pt").input_ids for s in (args.clean, args.corrupt))
        return model, clean, corrupt
    # The bundled MQAR model: the queried pair's key in the context replaced by an absent key.
    from gdn_intervene.cli import demo_prompts
    from gdn_intervene.toy import load_toy

    model, _ = load_toy()
    clean, corrupt, _ = demo_prompts(args.seed, corrupt="key")
    return gi.patch(model), clean, corrupt


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
    model, clean, corrupt = load(args)
    if clean.shape != corrupt.shape:
        raise SystemExit(f"clean and corrupted prompts must have the same length: {clean.shape[1]} vs {corrupt.shape[1]}")
    with torch.no_grad():
        lc, lx = model(input_ids=clean).logits[0, -1], model(input_ids=corrupt).logits[0, -1]
    answer = int(lc.argmax())
    span = float(lc[answer] - lx[answer]) or 1.0

    layers = list(gi.gdn_layers(model))
    positions = [0] if gp.component(args.component).site.name == "state" else list(range(clean.shape[1]))
    grid = torch.zeros(len(layers), len(positions))
    bar = tqdm(total=grid.numel(), desc=f"patching {args.component}")
    for i, layer in enumerate(layers):
        iv = pv.IntervenableModel([{"layer": layer, "component": args.component, "unit": "pos"}], model)
        for j, p in enumerate(positions):
            with torch.no_grad():
                _, out = iv({"input_ids": corrupt}, [{"input_ids": clean}], {"sources->base": p})
            grid[i, j] = (out.logits[0, -1, answer] - lx[answer]) / span
            bar.update()
    bar.close()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.45 * len(positions), 1 + 0.5 * len(layers)))
    im = ax.imshow(grid.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set(xticks=range(len(positions)), xticklabels=positions, yticks=range(len(layers)), yticklabels=layers,
           xlabel="position", ylabel="GDN layer", title=f"{args.component}: clean -> corrupted, logit recovery")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"answer token {answer}; max recovery {grid.max():.3f} at layer {layers[int(grid.argmax()) // len(positions)]}, "
          f"position {positions[int(grid.argmax()) % len(positions)]}; wrote {args.out}")


if __name__ == "__main__":
    main()
