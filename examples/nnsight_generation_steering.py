"""Steer generation with nnsight: scale beta (the write strength) of chosen GDN heads on
every forward of `generate`, and compare with the unsteered continuation.

    python examples/nnsight_generation_steering.py                          # bundled toy model
    python examples/nnsight_generation_steering.py --heads 0 1 --scale 0    # stop heads 0, 1 writing
    python examples/nnsight_generation_steering.py --model PATH_OR_ID --layer 4 --scale 2

beta scales each write into the recurrent state: S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - ...).
Scale 0 freezes what those heads store (the state only decays); scale > 1 over-writes. The edit
runs in the prefill (all prompt tokens) and in every decode step, and reaches later tokens
through the cached state.
"""

from __future__ import annotations

import argparse

import torch
from nnsight_quickstart import DEFAULT_PROMPT, load_model

from gdn_intervene import nnsight as gnn


def generate(lm, prompt: str, n: int, layer: int | None = None, heads=(), scale: float = 1.0):
    """(token ids [1, T + n], next-token logits [n, vocab]); beta[..., heads] *= scale at `layer`."""
    logits = []
    # min_new_tokens: a loop over exactly n forwards must not be cut short by an early EOS.
    with lm.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False) as tracer:
        for _step in tracer.iter[:n]:  # the prefill, then each decode step
            if layer is not None:
                beta = gnn.site(lm, layer, "beta").output  # [B, T, HV]; T = 1 when decoding
                beta[:, :, list(heads)] *= scale
            logits.append(lm.lm_head.output[0, -1].detach().float().save())
        ids = tracer.result.save()
    return ids, torch.stack(logits)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the bundled toy model)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--layer", type=int, default=None, help="GDN layer (default: the last one)")
    ap.add_argument("--heads", type=int, nargs="+", default=None, help="value heads (default: all)")
    ap.add_argument("--scale", type=float, default=0.0, help="beta multiplier (default 0: no writes)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args(argv)

    lm = load_model(args.model)
    layers = gnn.layers(lm)
    layer = list(layers)[-1] if args.layer is None else args.layer
    gnn.site(lm, layer, "beta")  # a ValueError naming the GDN layers if `layer` is not one
    heads = args.heads if args.heads is not None else list(range(layers[layer].num_v_heads))
    n = args.max_new_tokens

    base_ids, base_logits = generate(lm, args.prompt, n)
    ids, logits = generate(lm, args.prompt, n, layer, heads, args.scale)

    decode = lm.tokenizer.decode
    T = base_ids.shape[1] - n
    print(f"layer {layer}, heads {heads}: beta x {args.scale}")
    print(f"  prompt:   {args.prompt}")
    print(f"  baseline: {decode(base_ids[0, T:])}")
    print(f"  steered:  {decode(ids[0, T:])}")
    # Per step: how much probability the steered model still gives the baseline's token.
    p_base = base_logits.softmax(-1)
    p_steer = logits.softmax(-1)
    print(f"{'step':>4} {'baseline token':>14} {'p baseline':>10} {'p steered':>9} {'steered token':>13}")
    for t in range(n):
        tok = base_ids[0, T + t]
        print(f"{t:>4} {decode(tok):>14} {p_base[t, tok]:10.3f} {p_steer[t, tok]:9.3f} {decode(ids[0, T + t]):>13}")
    changed = (ids[0, T:] != base_ids[0, T:]).sum().item()
    print(f"{changed}/{n} generated tokens changed")


if __name__ == "__main__":
    main()
