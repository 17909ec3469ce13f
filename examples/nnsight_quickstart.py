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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(beta)
    fig, axes = plt.subplots(1, 2, figsize=(10, 1.5 + 0.4 * len(layers)), squeeze=False)
    for ax, (title, values) in zip(axes[0], [("mean beta", beta), ("mean decay = exp(g)", decay)]):
        grid = torch.stack([values[layer].mean(0) for layer in layers]).numpy()  # [layers, HV]
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set(title=title, xlabel="value head", ylabel="GDN layer", xticks=range(grid.shape[1]),
               yticks=range(len(layers)), yticklabels=layers)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


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
