"""Read beta and the decay of every GDN layer and head with nnsight; plot them as a heatmap.

    python examples/nnsight_quickstart.py                       # the bundled toy model (offline)
    python examples/nnsight_quickstart.py --model PATH_OR_ID    # any supported checkpoint
    python examples/nnsight_quickstart.py --out heatmap.png --prompt "k1 v3 k2 v7 <sep> k2"

Per layer and value head it prints and plots the mean over tokens of beta (write strength,
[0, 1]; [0, 2] where negative eigenvalues are allowed) and of decay = exp(g) (g <= 0: 1 keeps
the state, 0 forgets it).
"""

from __future__ import annotations

import argparse

import torch

from gdn_intervene import nnsight as gnn

DEFAULT_PROMPT = "k1 v3 k2 v7 k5 v0 k9 v4 <sep> k2"


def load_model(path: str | None):
    """A patched nnsight model: `path` (hub id or directory), else the bundled toy model, else
    (no toy checkpoint in this checkout) a tiny random model with the toy vocabulary."""
    if path is not None:
        return gnn.load(path, dispatch=True)
    try:
        from gdn_intervene.toy import load_toy
    except ImportError:
        load_toy = None
    if load_toy is not None:
        model, tok = load_toy()
        return gnn.load(model, tokenizer=tok)
    from transformers import Qwen3_5ForCausalLM

    from gdn_intervene.toy import mqar, train

    print("no bundled toy checkpoint found: using a tiny RANDOM model (the numbers mean nothing)")
    torch.manual_seed(0)
    model = Qwen3_5ForCausalLM(train.build_config()).eval()
    with torch.no_grad():  # HF's init puts every decay near 0; spread them over the heads
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.linspace(-2.0, 1.0, p.numel()))
    return gnn.load(model, tokenizer=mqar.build_tokenizer()[1])


def read_beta_decay(lm, prompt: str) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """{layer: beta [T, HV]} and {layer: decay = exp(g) [T, HV]} for one prompt."""
    beta, decay = {}, {}
    with lm.trace(prompt):
        for layer, attn in gnn.layers(lm).items():  # layer order = execution order
            beta[layer] = attn.beta.output[0].detach().float().save()
            decay[layer] = attn.decay.output[0].detach().float().exp().save()
    return beta, decay


def plot(beta: dict, decay: dict, out: str) -> None:
    """Two heatmaps (GDN layer x value head) on ONE fixed 0-1 scale (beta up to 2 where negative
    eigenvalues are allowed), each cell labelled with its value."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = list(beta)
    grids = [
        (title, torch.stack([values[layer].mean(0) for layer in layers]).numpy())  # [layers, HV]
        for title, values in [
            ("mean beta\n(write strength)", beta),
            ("mean decay = exp(g)\n(1 keeps the state, 0 forgets)", decay),
        ]
    ]
    top = max(1.0, max(float(g.max()) for _, g in grids))
    HV = grids[0][1].shape[1]
    fig = Figure(figsize=(max(7.5, 3 + 1.3 * HV), 2.6 + 0.45 * len(layers)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, (title, grid) in zip(axes, grids):
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=top)
        for (i, h), v in np.ndenumerate(grid):
            ax.text(h, i, f"{v:.3f}", ha="center", va="center", fontsize=8, color="white" if v < 0.6 * top else "black")
        ax.set_title(title, fontsize=10)
        ax.set(
            xlabel="value head",
            ylabel="GDN layer",
            xticks=range(grid.shape[1]),
            yticks=range(len(layers)),
            yticklabels=layers,
        )
    fig.colorbar(im, ax=list(axes), shrink=0.9).set_label(f"mean over tokens (one scale, 0 to {top:g})")
    fig.savefig(out, dpi=160)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the bundled toy model)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--out", default="beta_decay_heatmap.png", help="PNG to write")
    args = ap.parse_args(argv)

    lm = load_model(args.model)
    beta, decay = read_beta_decay(lm, args.prompt)
    print(f"{'layer':>5} {'head':>4} {'beta mean':>9} {'decay mean':>10} {'decay min':>9}")
    for layer in beta:
        for h in range(beta[layer].shape[-1]):
            b, d = beta[layer][:, h], decay[layer][:, h]
            print(f"{layer:>5} {h:>4} {b.mean():9.3f} {d.mean():10.3f} {d.min():9.3f}")
    plot(beta, decay, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
