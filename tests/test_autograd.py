"""Attribution patching must be exact: every site's gradient, in-place edits under autograd,
one and two nnsight invokes, for every family and every site of the registry.

References: the unpatched HF model with `retain_grad` on the kernel's arguments and results
(`reference.kernel_edit`), and, for every site, the gradient of a zero perturbation added to the
site's value (d loss / d eps at eps = 0 is d loss / d value, by a different mechanism than
reading the hooked tensor's `.grad`). Comparisons are `torch.equal` unless said otherwise.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ids_for
from models import ANY_GDN, MODELS
from reference import kernel_edit

import gdn_intervene as gi
from gdn_intervene.sites import SITE_NAMES, site

NAMES = list(MODELS)
L = 2  # the GDN layer after the full-attention layer
T = 10
KERNEL_ARGS = {"q": "q", "k": "k", "v": "v", "beta": "beta", "decay": "g"}


def loss_of(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().pow(2).mean()


def _edit_index(name: str):
    """Where the edits below touch a value: batch row 0, position 1 (the state: head 0)."""
    return (0, 1) if site(name).has_time else (0, 0)


def _run(model, ids, hooks=(), state_positions=None):
    """logits of `model` with forward hooks {(layer, site): hook} and optional state_at."""
    handles = [gi.site_module(model, layer, name).register_forward_hook(h) for (layer, name), h in hooks]
    try:
        if state_positions:
            with gi.state_at(model, state_positions, layers=[L]):
                return model(input_ids=ids, use_cache=False).logits
        return model(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def _splits(name):
    # Without a cache the final state reaches nothing; split the prefill so the state after
    # token 4 feeds the rest of the call.
    return [4] if name == "state" else None


# ---------------------------------------------------------------- gradients through every site


@pytest.mark.parametrize("sname", SITE_NAMES)
@pytest.mark.parametrize("name", NAMES)
def test_every_site_has_its_true_gradient(pair, name, sname):
    patched, ref = pair(name)
    ids = ids_for(T, B=2)
    seen = []

    def keep(m, a, out):
        seen.append(out)

    loss = loss_of(_run(patched, ids, [((L, sname), keep)], _splits(sname)))
    grads = torch.autograd.grad(loss, seen[0])[0]

    eps = []

    def perturb(m, a, out):
        eps.append(torch.zeros_like(out, requires_grad=True))
        return out + eps[-1]

    loss = loss_of(_run(patched, ids, [((L, sname), perturb)], _splits(sname)))
    expected = torch.autograd.grad(loss, eps[0])[0]
    assert grads.shape == seen[0].shape and bool(expected.abs().sum() > 0)
    assert torch.equal(grads, expected)
    if sname in KERNEL_ARGS:  # and the unpatched model's kernel argument has the same gradient
        got = {}

        def before(kw):
            for key in ("q", "k", "v", "g", "beta"):
                kw[key].retain_grad()
            got.update(kw)

        with kernel_edit(ref, L, before=before):
            loss_of(ref(input_ids=ids, use_cache=False).logits).backward()
        ref.zero_grad(set_to_none=True)
        hf = got[KERNEL_ARGS[sname]].grad
        if hf.shape != grads.shape:
            # before 5.23 q, k reach the kernel repeated to HV heads (each key head r times,
            # consecutively): the site's gradient is the sum over its r copies, as autograd sums them
            assert sname in ("q", "k") and hf.shape[2] % grads.shape[2] == 0, (sname, hf.shape, grads.shape)
            hf = hf.unflatten(2, (grads.shape[2], -1)).sum(3)
        assert torch.equal(grads, hf)


def test_recurrence_gradient_equals_the_unpatched_kernel_output_gradient(pair):
    for name in NAMES:
        patched, ref = pair(name)
        ids = ids_for(T, B=2)
        seen, got = [], {}
        loss = loss_of(_run(patched, ids, [((L, "recurrence"), lambda m, a, o: seen.append(o))]))
        mine = torch.autograd.grad(loss, seen[0])[0]

        def after(out):
            out[0].retain_grad()
            got["o"] = out[0]
            return out

        with kernel_edit(ref, L, after=after):
            loss_of(ref(input_ids=ids, use_cache=False).logits).backward()
        ref.zero_grad(set_to_none=True)
        assert torch.equal(mine, got["o"].grad), name


def test_no_listener_means_hf_gradients_bit_for_bit(pair):
    """With nobody listening, the backward is HF's: parameter gradients are torch.equal."""
    for name in NAMES:
        patched, ref = pair(name)
        ids = ids_for(T, B=2)
        grads = []
        for m in (patched, ref):
            loss_of(m(input_ids=ids, use_cache=False).logits).backward()
            grads.append([p.grad for p in m.parameters()])
            m.zero_grad(set_to_none=True)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(*grads)), name


# ---------------------------------------------------------------- in-place edits under autograd


@pytest.mark.parametrize("sname", SITE_NAMES)
@pytest.mark.parametrize("name", NAMES)
def test_in_place_edit_equals_out_of_place_under_autograd(pair, name, sname):
    patched, ref = pair(name)
    ids = ids_for(T, B=2)
    idx = _edit_index(sname)

    def in_place(m, a, out):
        out[idx] *= 0.5  # autograd on: parameters require grad

    def out_of_place(m, a, out):
        out = out.clone()
        out[idx] *= 0.5
        return out

    results = []
    for hook in (in_place, out_of_place):
        logits = _run(patched, ids, [((L, sname), hook)], _splits(sname))
        loss_of(logits).backward()
        results.append((logits.detach(), [p.grad.clone() for p in patched.parameters() if p.grad is not None]))
        patched.zero_grad(set_to_none=True)
    (l1, g1), (l2, g2) = results
    assert torch.equal(l1, l2) and len(g1) == len(g2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    with torch.no_grad():
        plain = _run(patched, ids, state_positions=_splits(sname))
    assert not torch.equal(l1, plain)  # the edit had an effect


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("name", NAMES)
def test_an_in_place_edit_changes_no_other_sites_value(pair, name, grad):
    """q, k, v are slices of the conv output, the pre-conv values slices of a projection: an
    in-place edit of one must not reach another's value (nor the conv output already read)."""
    patched, ref = pair(name)
    ids = ids_for(T, B=2)
    watched = ["q_pre_conv", "k_pre_conv", "v_pre_conv", "conv", "q", "k", "v"]
    with torch.set_grad_enabled(grad):
        with gi.capture(patched, sites=watched, layers=[L]) as before:
            patched(input_ids=ids, use_cache=False)
        pre, post = watched[:3], watched[4:]
        for edited in pre + post:
            # what an edit of `edited` must leave alone: its siblings, and everything before it
            unaffected = [s for s in (pre if edited in pre else pre + ["conv"] + post) if s != edited]
            with gi.capture(patched, sites=watched, layers=[L], clone=False) as after:
                _run(patched, ids, [((L, edited), lambda m, a, out: out.zero_())])
            assert not torch.equal(after[L, edited][0], before[L, edited][0])
            for other in unaffected:
                assert torch.equal(after[L, other][0], before[L, other][0]), (edited, other)


def test_readme_in_place_edits_run_under_autograd(pair):
    """The README's nnsight-style edits, as plain hooks, with parameters requiring grad."""
    patched, _ = pair(ANY_GDN)
    ids = ids_for(T, B=2)

    def k3(m, a, out):
        out[:, 3] = 0

    def beta(m, a, out):
        out[:, 5, 1] = 0

    logits = _run(patched, ids, [((L, "k"), k3), ((L, "beta"), beta), ((L, "q_pre_conv"), k3)])
    loss_of(logits).backward()
    assert all(p.grad is not None for p in gi.site_module(patched, L, "norm").parameters())
    patched.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_a_listener_changes_no_number(pair, name, dtype):
    """A hook that only reads a site (so the site hands it its own copy) leaves the logits HF's,
    bit for bit, with and without autograd: the copy keeps the view's exact layout."""
    from conftest import left_pad_mask

    patched, ref = pair(name, dtype=dtype)
    ids, mask = ids_for(17), left_pad_mask(3, 17)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
    for sname in SITE_NAMES:
        for grad in (False, True):
            h = gi.site_module(patched, L, sname).register_forward_hook(lambda *a: None)
            try:
                with torch.set_grad_enabled(grad):
                    got = patched(input_ids=ids, attention_mask=mask).logits
            finally:
                h.remove()
            assert torch.equal(got, want), (sname, grad)
