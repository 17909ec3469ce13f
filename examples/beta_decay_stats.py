"""Patch a GDN model and print per-layer, per-head statistics of beta and the decay.

python examples/beta_decay_stats.py                 # the bundled toy model (offline)
python examples/beta_decay_stats.py --model PATH    # any supported checkpoint
"""

from __future__ import annotations

import argparse

import torch

import gdn_intervene as gi


def load(path: str | None):
    if path is None:
        from gdn_intervene.toy import load_toy

        return load_toy()
    from transformers import AutoTokenizer

    return gi.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint path or hub id (default: bundled toy model)")
    ap.add_argument("--prompt", default=None, help="text to run (default: a toy MQAR prompt)")
    args = ap.parse_args(argv)

    model, tok = load(args.model)
    gi.patch(model)
    if args.prompt is None:  # an MQAR prompt: 8 key-value pairs, then a queried key
        from gdn_intervene.toy.mqar import demo_prompts

        ids = demo_prompts(seed=0).clean
    else:
        ids = tok(args.prompt, return_tensors="pt").input_ids

    saved: dict[tuple[int, str], torch.Tensor] = {}
    save = {
        (layer, s): (lambda x, key=(layer, s): saved.__setitem__(key, x.detach().float()))
        for layer in gi.gdn_layers(model)
        for s in ("beta", "decay")
    }
    with torch.no_grad(), gi.intervene(model, save):
        model(ids)

    print(f"{ids.shape[1]} tokens; beta in [0, 1] (x2 with negative eigenvalues); decay = exp(g), g <= 0")
    print(f"{'layer':>5} {'head':>4} {'beta mean':>9} {'beta max':>8} {'decay mean':>10} {'decay min':>9}")
    for layer in gi.gdn_layers(model):
        beta, decay = saved[(layer, "beta")][0], saved[(layer, "decay")][0].exp()  # [T, HV]
        for h in range(beta.shape[-1]):
            print(
                f"{layer:>5} {h:>4} {beta[:, h].mean():9.3f} {beta[:, h].max():8.3f} "
                f"{decay[:, h].mean():10.3f} {decay[:, h].min():9.3f}"
            )


if __name__ == "__main__":
    main()
