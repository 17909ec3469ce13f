"""Regression tests: each failure the differential suite (tests/test_differential.py) found,
reduced to its failing inputs. The docstring says what was wrong and what the reference is."""

import copy

import pytest
import torch
from conftest import ids_for, no_hooks
from models import MODELS, build
from reference import hf_gdn

import gdn_intervene as gi


@pytest.mark.skipif("qwen3_next" not in MODELS, reason="this release has no Qwen3-Next")
def test_pyvene_patch_of_a_strided_gate_keeps_hf_bits():
    """pyvene's adapter handed pyvene a contiguous copy of a site's value and returned that copy
    as the new value. Qwen3-Next's `gate` with HV = HK is a strided slice of the fused
    projection (HF's norm receives it so), and the contiguous replacement made the gated norm
    and the output projection round differently: logits 6e-8 off HF's with the same gate values
    (VanillaIntervention at position 0 of `linear_attn_gate`). The adapter now writes pyvene's
    edit back into the value in place, in its own layout. Reference: the unpatched model, the
    source prompt's gate written in place at position 0 of the gate its norm receives."""
    pv = pytest.importorskip("pyvene")
    import gdn_intervene.pyvene as gp

    gp.register()
    ref = build("qwen3_next", hv_ratio=1)
    patched = gi.patch(copy.deepcopy(ref))
    base, source = ids_for(2, B=1, seed=1), ids_for(2, B=1, seed=2)
    norm = hf_gdn(ref, 0).norm
    kept = {}

    def keep(m, args):
        kept["z"] = args[1].reshape(1, 2, -1, args[1].shape[-1]).clone()

    def put(m, args):
        z = args[1].view(1, 2, -1, args[1].shape[-1])  # HF's own layout: a view of the strided slice
        z[:, 0] = kept["z"][:, 0]

    with torch.no_grad():
        for hook, ids in ((keep, source), (put, base)):
            h = norm.register_forward_pre_hook(hook)
            try:
                want = ref(input_ids=ids).logits
            finally:
                h.remove()
    iv = pv.IntervenableModel([{"layer": 0, "component": "linear_attn_gate", "unit": "pos"}], patched)
    with torch.no_grad():
        _, got = iv({"input_ids": base}, [{"input_ids": source}], {"sources->base": ([[[0]]], [[[0]]])})
    assert torch.equal(got.logits, want)
    assert no_hooks(patched)
