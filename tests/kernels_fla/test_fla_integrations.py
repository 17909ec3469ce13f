"""nnsight and pyvene edits on fla's kernels, against `reference.kernel_edit` on the UNPATCHED
model (HF's own forward, fla's kernels, the same edit on the kernel's arguments or results):
`torch.equal`.

Families: Qwen3.5 (GDN) and Kimi Linear (KDA). One row of T = 7, the edited layer the GDN layer
after the full-attention one, position P = 3, value head 1. Each framework wraps its own patched
copy (nnsight and pyvene wrap modules; the lane's shared pairs stay untouched).
"""

from kernels_fla import fla_lane

fla_lane.require()

import copy  # noqa: E402
import functools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from models import present  # noqa: E402
from reference import kernel_edit  # noqa: E402

import gdn_intervene as gi  # noqa: E402

ids_for, logits, new_cache, view = fla_lane.helpers()
NAMES = present("qwen3_5", "kimi_linear")
T, P, H = 7, 3, 1


def _layer(model) -> int:
    return max(gi.gdn_layers(model))


def _hf_logits(ref, ids, **kw):
    with torch.no_grad():  # nnsight passes an all-ones mask with token ids; so does the reference
        return ref(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)


# ---------------------------------------------------------------- nnsight


@functools.cache
def _nnsight(name):
    pytest.importorskip("nnsight")
    from gdn_intervene import nnsight as gnn

    _, ref = fla_lane.pair(name)
    model = gi.patch(copy.deepcopy(ref))
    lm = gnn.load(model)
    layer = _layer(model)
    path = next(n for n, m in model.named_modules() if m is gi.gdn_layers(model)[layer])
    return lm, ref, layer, path


def _envoy(lm, path):
    node = lm
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


@pytest.mark.parametrize("name", NAMES)
def test_nnsight_in_place_and_replacing_edits(name):
    """beta zeroed in place at (P, H); decay replaced by 2 g (decay squared) from P on; the
    recurrence output read back equals HF's kernel result under the same edits."""
    lm, ref, layer, path = _nnsight(name)
    x = ids_for(T, B=1)
    with torch.no_grad(), fla_lane.fla_calls() as calls:
        with lm.trace(x):
            attn = _envoy(lm, path)
            attn.beta.output[:, P, H] = 0
            g = attn.decay.output
            attn.decay.output = torch.cat([g[:, :P], 2 * g[:, P:]], 1)
            o = attn.recurrence.output.save()
            edited = lm.output.logits.save()
    assert sum(calls.values()) > 0

    hf = {}

    def before(kw):
        kw["beta"] = kw["beta"].clone()
        kw["beta"][:, P, H] = 0
        kw["g"] = torch.cat([kw["g"][:, :P], 2 * kw["g"][:, P:]], 1)

    with kernel_edit(ref, layer, before=before, after=lambda res: hf.update(o=res[0]) or res):
        want = _hf_logits(ref, x).logits
    assert torch.equal(edited, want)
    assert torch.equal(o, hf["o"])
    plain = _hf_logits(ref, x).logits
    assert torch.equal(edited[:, :P], plain[:, :P]) and not torch.equal(edited[:, P:], plain[:, P:])


# ---------------------------------------------------------------- pyvene

COMPONENT = {
    "beta": "head_linear_attn_beta",
    "recurrence": "head_linear_attn_recurrence_output",
    "state": "head_linear_attn_state",
}
EDIT = {  # where HF has the value: kernel argument (before) or result (after), and the index
    "beta": ("before", lambda kw: kw["beta"], (slice(None), P, H)),
    "recurrence": ("after", lambda out: out[0], (slice(None), P, H)),
    "state": ("after", lambda out: out[1], (slice(None), H)),
}


def _pyvene_reference(ref, layer, site, base, src):
    """Run `src`, keep the kernel's value of `site`; rerun `base` with head H (at position P)
    of it swapped in. -> (logits, recurrent state in the cache)."""
    when, get, index = EDIT[site]
    kept = {}

    def keep(x):
        kept["v"] = get(x).clone()
        return x

    with kernel_edit(ref, layer, **{when: keep}):
        _hf_logits(ref, src)

    def swap(x):
        x = x.clone()
        x[index] = kept["v"][index]
        return x

    if site == "beta":
        edit = {"before": lambda kw: kw.__setitem__("beta", swap(kw["beta"]))}
    elif site == "recurrence":
        edit = {"after": lambda out: (swap(out[0]), out[1])}
    else:
        edit = {"after": lambda out: (out[0], swap(out[1]))}
    with kernel_edit(ref, layer, **edit):
        out = _hf_logits(ref, base, use_cache=True)
    return out.logits, view(out.past_key_values).get_recurrent_state(layer)


@pytest.mark.parametrize("site", list(COMPONENT))
@pytest.mark.parametrize("name", NAMES)
def test_pyvene_head_swap(name, site):
    pv = pytest.importorskip("pyvene")
    import gdn_intervene.pyvene as gp

    gp.register()
    _, ref = fla_lane.pair(name)
    model = gi.patch(copy.deepcopy(ref))
    layer = _layer(model)
    base, src = ids_for(T, B=1, seed=1), ids_for(T, B=1, seed=2)
    want_logits, want_state = _pyvene_reference(ref, layer, site, base, src)
    iv = pv.IntervenableModel([{"layer": layer, "component": COMPONENT[site], "unit": "h.pos"}], model)
    loc = [[[H]], [[0 if site == "state" else P]]]  # one state per call: position 0
    with torch.no_grad(), fla_lane.fla_calls() as calls:
        _, out = iv({"input_ids": base, "attention_mask": torch.ones_like(base)}, [{"input_ids": src, "attention_mask": torch.ones_like(src)}],
                    {"sources->base": ([loc], [loc])})  # fmt: skip
    assert sum(calls.values()) > 0
    assert torch.equal(out.logits, want_logits)
    assert torch.equal(view(out.past_key_values).get_recurrent_state(layer), want_state)
    clean = _hf_logits(ref, base, use_cache=True)
    unchanged = torch.equal(view(clean.past_key_values).get_recurrent_state(layer), want_state)
    assert not (unchanged and torch.equal(clean.logits, want_logits)), "the swap changes nothing"
