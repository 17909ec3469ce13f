"""With nobody listening, the patched model IS the unpatched one on fla's kernels, bit for bit
(`torch.equal`), for every family whose HF forward routes to fla (every GDN and KDA family).

Shapes, chosen for the interpreter (each interpreted kernel program costs milliseconds):
- a cached prefill of T = 65 tokens, one row left-padded by two tokens: it crosses fla's 64-token
  chunk edge (the second chunk holds one token), with the padding inside the first chunk; its
  parameter gradients go through fla's chunk backward kernels. One row: the interpreter's cost
  grows with B; batches of 2 run in test_fla_sites.py;
- two decode steps on that cache (fla's fused recurrent kernel);
- a call of 4 tokens on a cache that keeps N = 2 intermediate states (transformers 5.25's
  `activate_past_recording`): fla's chunk kernel on 2 tokens, then 2 recurrent steps; then
  `crop(-1)` and a call from the rolled-back cache;
- assisted generation (a second tiny model of the family as the assistant; a 4-token prompt, 3
  new tokens): the verify forwards keep states as above.
Every logit, every cache field (conv and recurrent states, the layer's token count, the kept
history) and every parameter gradient is compared, and fla's entry points are counted, so a
silent fall-back to HF's torch kernels fails the test.
"""

from kernels_fla import fla_lane

fla_lane.require()

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from models import KDA, MODELS, build  # noqa: E402
from reference import cache_tensors  # noqa: E402

import gdn_intervene as gi  # noqa: E402

ids_for, logits, new_cache, view = fla_lane.helpers()
NAMES = list(MODELS)
T = 65


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b)
    )


def _entries(name):
    kind = "kda" if name in KDA else "gated_delta_rule"
    return f"chunk_{kind}_fwd", f"chunk_{kind}_bwd", f"fused_recurrent_{kind}_fwd"


def _forward(model, ids, mask, cache):
    kw = {"cache" if "cache" in type(model).forward.__code__.co_varnames else "past_key_values": cache}
    return model(input_ids=ids, attention_mask=mask, use_cache=True, **kw).logits


@pytest.mark.parametrize("name", NAMES)
def test_prefill_decode_kept_states_and_gradients_bitwise(name):
    patched, ref = fla_lane.pair(name)
    n_layers = len(gi.gdn_layers(patched))
    chunk, chunk_bwd, recurrent = _entries(name)
    ids = ids_for(T, B=1)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    got = {}
    for key, model in (("p", patched), ("r", ref)):
        calls = []
        cache = new_cache(model)
        with fla_lane.fla_calls() as c:
            out = _forward(model, ids, mask, cache)
            out.float().pow(2).mean().backward()
        calls.append(dict(c))
        grads = [p.grad for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        steps, fields = [out.detach()], [cache_tensors(cache)]
        step, step_mask = out[:, -1:].argmax(-1), mask
        with torch.no_grad(), fla_lane.fla_calls() as c:
            for _ in range(2):
                step_mask = torch.cat([step_mask, torch.ones_like(step)], 1)
                steps.append(_forward(model, step, step_mask, cache))
                fields.append(cache_tensors(cache))
                step = steps[-1][:, -1:].argmax(-1)
        calls.append(dict(c))
        cache.activate_past_recording(recurrent_states_to_keep=2)
        draft = ids_for(4, B=1, seed=1)
        with torch.no_grad(), fla_lane.fla_calls() as c:
            step_mask = torch.cat([step_mask, torch.ones_like(draft)], 1)
            steps.append(_forward(model, draft, step_mask, cache))
            fields.append(cache_tensors(cache))
            cache.crop(-1)
            fields.append(cache_tensors(cache))
            steps.append(_forward(model, draft[:, :1], step_mask[:, :-3], cache))
            fields.append(cache_tensors(cache))
        calls.append(dict(c))
        got[key] = steps, fields, grads, calls
    (sp, fp, gp, cp), (sr, fr, gr, cr) = got["p"], got["r"]
    assert (
        cp
        == cr
        == [
            {chunk: n_layers, chunk_bwd: n_layers},
            {recurrent: 2 * n_layers},
            {chunk: n_layers, recurrent: 3 * n_layers},  # the kept call: chunk on 2 tokens + 2 steps; then 1 step
        ]
    ), (cp, cr)
    for i, (a, b) in enumerate(zip(sp, sr)):
        assert torch.equal(a, b), f"logits of call {i}"
    for i, (a, b) in enumerate(zip(fp, fr)):
        assert _same(a, b), f"cache after call {i}"
    assert sum(g is not None for g in gp) > 0
    for (n, _), a, b in zip(patched.named_parameters(), gp, gr):
        assert (a is None and b is None) or torch.equal(a, b), f"gradient of {n}"


@pytest.mark.parametrize("name", NAMES)
def test_assisted_generation_bitwise(name):
    """Patched target and assistant generate the unpatched pair's tokens and logits; the
    target's verify forwards keep states (fla's chunk kernel, then recurrent steps)."""
    target, _ = fla_lane.pair(name)
    ref_t = fla_lane.pair(name)[1]
    assistant = build(name, seed=1)
    ref_a = copy.deepcopy(assistant)
    gi.patch(assistant)
    ids = ids_for(4, B=1)
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    chunk, _, recurrent = _entries(name)
    with torch.no_grad():
        with fla_lane.fla_calls() as calls:
            mine = target.generate(ids, assistant_model=assistant, **kw)
        want = ref_t.generate(ids, assistant_model=ref_a, **kw)
    assert torch.equal(mine.sequences, want.sequences)
    assert len(mine.logits) == len(want.logits) and all(torch.equal(a, b) for a, b in zip(mine.logits, want.logits))
    assert calls[chunk] > 0 and calls[recurrent] > 0, calls
