"""Listened, edited and split sites on fla's kernels, each against an fla-path reference that
shares no code with gdn_intervene: the UNPATCHED model running HF's own forward, with the same
edit applied where HF has the value (`reference.kernel_edit` on the kernel's arguments and
results, hooks on HF's own norm / output modules, `fla_lane.kernel_around` for splits).
Comparisons are `torch.equal`: both sides run fla's kernels on the same arguments.

Which edit, and why its reference is exact (batch row 0, position P, value head 0):
- q, k, v: negated (l2norm(-x) = -l2norm(x) exactly); the kernel argument negated there.
- *_pre_conv: channel (head 0, dim 0) zeroed at every position and row. The conv has no bias and
  SiLU(0) = 0, so the kernel's q / k / v are zero in that channel: the reference zeroes them.
- conv: the first value channel at P zeroed: the kernel's v[0, P, 0, 0] = 0.
- beta_logit 0 -> beta 0.5 (sigmoid(0), exact; families without negative eigenvalues);
  beta 0; decay_logit -1e4 -> g = -exp(A_log) softplus(-1e4 + ...) = -0.0 (softplus underflows;
  the bounded KDA gate: lower_bound sigmoid(-inf-ish) = -0.0); decay 0: the kernel's g 0.
- recurrence negated; the kernel's o negated. state halved (head 0), with a cache: the next
  decode step (fla's recurrent kernel) starts from the halved state; the kernel's S halved.
- gate, norm, out_proj: zeroed; HF's own norm module's gate argument, its output, and the output
  projection's output zeroed by hooks on the unpatched model.
Every edit is made in place (a forward hook that writes into the site's output) and out of place
(`gi.intervene` returning a new tensor); both must equal the reference, and the reference must
differ from the unedited model (no vacuous pass).

Shapes: edits on one row of T = 6 (one chunk; each interpreted kernel program costs ms, and the
cross product is 16 sites x 2 ways x 2 families); the listened run on every family with batch 2;
splits of T = 10 after positions 1 and 6 (segments of 2, 5 and 3 tokens, each from the previous
one's state; test_fla_parity.py crosses the 64-token chunk edge). Families: Qwen3.5 (GDN, GQA in the kernel) and Kimi
Linear (KDA, per-channel decay) for the edits; every family for the listened run.
"""

from kernels_fla import fla_lane

fla_lane.require()

import contextlib  # noqa: E402
import functools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from models import MODELS, present  # noqa: E402
from reference import kernel_edit  # noqa: E402

import gdn_intervene as gi  # noqa: E402

ids_for, logits, new_cache, view = fla_lane.helpers()
NAMES = list(MODELS)
EDITED = present("qwen3_5", "kimi_linear")
SITE_NAMES = [s.name for s in gi.SITES]
T, P = 6, 3
HF_ARG = {"q": "q", "k": "k", "v": "v", "beta": "beta", "decay": "g"}


def _last_layer(model) -> int:
    return max(gi.gdn_layers(model))  # the GDN layer after the full-attention layer


# ---------------------------------------------------------------- listened


@pytest.mark.parametrize("name", NAMES)
def test_every_site_listened_equals_hf_kernel_arguments(name):
    """Every site of every layer recorded, in a cached prefill: logits bitwise; the recorded q, k, v, beta, decay are
    the arguments HF's forward gave fla's kernel, recurrence and state its results."""
    patched, ref = fla_lane.pair(name)
    ids = ids_for(T, B=2)
    with torch.no_grad(), gi.capture(patched) as seen, fla_lane.fla_calls() as calls:
        out = logits(patched, ids, cache=new_cache(patched), use_cache=True)
    assert sum(calls.values()) == len(gi.gdn_layers(patched)), calls
    assert {len(v) for _, v in seen.items()} == {1} and len(seen.items()) == len(SITE_NAMES) * len(
        gi.gdn_layers(patched)
    )
    hf = {layer: {} for layer in gi.gdn_layers(patched)}
    with contextlib.ExitStack() as stack:  # both layers' kernel calls recorded in one forward
        for layer, rec in hf.items():
            stack.enter_context(
                kernel_edit(
                    ref, layer, before=rec.update, after=lambda res, rec=rec: rec.update(o=res[0], S=res[1]) or res
                )
            )
        assert torch.equal(out, logits(ref, ids, cache=new_cache(ref), use_cache=True))
    for layer, rec in hf.items():
        for site, arg in (*HF_ARG.items(), ("recurrence", "o"), ("state", "S")):
            got, want = seen[layer, site][0], rec[arg]
            assert got.shape == want.shape and torch.equal(got, want), (layer, site)


# ---------------------------------------------------------------- edited


def _at(x: torch.Tensor, site: str):
    """The index an edit of `site` touches (see the module docstring)."""
    if site.endswith("_pre_conv"):
        return (Ellipsis, 0, 0)
    if site == "state":
        return (0, 0)
    if site == "out_proj":
        return (0, P)
    return (0, P, 0)


def _edit_value(site: str, x: torch.Tensor) -> torch.Tensor:
    """The new value at `_at(site)`, from the current one."""
    i = _at(x, site)
    if site in ("q", "k", "v", "recurrence"):
        return -x[i]
    if site == "state":
        return x[i] * 0.5
    if site == "decay_logit":
        return torch.full_like(x[i], -1e4)
    return torch.zeros_like(x[i])


@functools.cache
def _conv_index(patched, layer):
    """conv site: the first value channel (after HK*K query and HK*K key channels), at P."""
    with torch.no_grad(), gi.capture(patched, sites=["q"], layers=[layer]) as seen:
        logits(patched, ids_for(2, B=1))
    HK, K = seen[layer, "q"][0].shape[2:]
    return (0, P, 2 * HK * K)


def _patched_run(patched, layer, site, how, cache=None):
    """Logits of the patched model with the edit made in place (a forward hook) or out of place."""
    ids = ids_for(T, B=1)
    conv_at = _conv_index(patched, layer) if site == "conv" else None

    def in_place(module, args, out):
        i = conv_at or _at(out, site)
        out[i] = _edit_value(site, out) if conv_at is None else 0

    def out_of_place(x):
        x = x.clone()
        in_place(None, None, x)
        return x

    with torch.no_grad():
        if how == "in place":
            h = gi.site_module(patched, layer, site).register_forward_hook(in_place)
            try:
                return _run(patched, ids, cache)
            finally:
                h.remove()
        with gi.intervene(patched, {(layer, site): out_of_place}):
            return _run(patched, ids, cache)


def _run(model, ids, cache):
    """Prefill logits; with a cache, also one decode step's (the state reaches only that)."""
    if cache is None:
        return logits(model, ids)
    first = logits(model, ids, cache=cache, use_cache=True)
    return torch.cat([first, logits(model, ids_for(1, B=1, seed=3), cache=cache, use_cache=True)], 1)


def _hf_module(patched, ref, layer, site):
    """HF's own module of an HF-owned site (norm / o_norm, out_proj / o_proj) in the unpatched model."""
    target = gi.site_module(patched, layer, site)
    mod = gi.gdn_layers(patched)[layer]
    name = next(n for n, m in mod.named_children() if m is target)
    return getattr(fla_lane.hf_layer(ref, layer), name)


def _reference_run(patched, ref, layer, site, cache=None):
    """The unpatched model with the same edit where HF has the value."""
    ids = ids_for(T, B=1)

    def edit(x, index_site=site):  # a clone of x with the edit applied at the site's index
        x = x.clone()
        x[_at(x, index_site)] = _edit_value(index_site, x)
        return x

    def set_at(x, index, value):
        x = x.clone()
        x[index] = value
        return x

    def as4d(x):  # HF's norm works on [B*T*HV, V] (GDN) or [B, T, HV, V] (KDA): view as [B, T, HV, V]
        return x.reshape(1, T, -1, x.shape[-1])

    hooks = []
    if site in HF_ARG:
        arg = HF_ARG[site]
        ctx = kernel_edit(ref, layer, before=lambda kw: kw.__setitem__(arg, edit(kw[arg])))
    elif site.endswith("_pre_conv"):
        arg = site[0]
        ctx = kernel_edit(ref, layer, before=lambda kw: kw.__setitem__(arg, set_at(kw[arg], (Ellipsis, 0, 0), 0)))
    elif site == "conv":
        ctx = kernel_edit(ref, layer, before=lambda kw: kw.__setitem__("v", set_at(kw["v"], (0, P, 0, 0), 0)))
    elif site == "beta_logit":
        ctx = kernel_edit(ref, layer, before=lambda kw: kw.__setitem__("beta", set_at(kw["beta"], (0, P, 0), 0.5)))
    elif site == "decay_logit":
        ctx = kernel_edit(ref, layer, before=lambda kw: kw.__setitem__("g", set_at(kw["g"], (0, P, 0), 0.0)))
    elif site == "recurrence":
        ctx = kernel_edit(ref, layer, after=lambda res: (edit(res[0]), res[1]))
    elif site == "state":
        ctx = kernel_edit(ref, layer, after=lambda res: (res[0], edit(res[1])))
    else:
        ctx = kernel_edit(ref, layer)  # no kernel edit; hooks on HF's modules
        norm = _hf_module(patched, ref, layer, "norm")
        if site == "gate":
            hooks.append(norm.register_forward_pre_hook(
                lambda m, args: (args[0], edit(as4d(args[1])).reshape(args[1].shape), *args[2:])
            ))  # fmt: skip
        elif site == "norm":
            hooks.append(norm.register_forward_hook(lambda m, args, out: edit(as4d(out)).reshape(out.shape)))
        else:
            hooks.append(
                _hf_module(patched, ref, layer, "out_proj").register_forward_hook(lambda m, args, out: edit(out))
            )
    try:
        with ctx, torch.no_grad():
            return _run(ref, ids, cache)
    finally:
        for h in hooks:
            h.remove()


@functools.cache
def _unedited(name: str, cached: bool) -> torch.Tensor:
    _, ref = fla_lane.pair(name)
    with torch.no_grad():
        return _run(ref, ids_for(T, B=1), new_cache(ref) if cached else None)


@pytest.mark.parametrize("site", SITE_NAMES)
@pytest.mark.parametrize("name", EDITED)
def test_every_site_edited_in_place_and_out_of_place(name, site):
    patched, ref = fla_lane.pair(name)
    layer = _last_layer(patched)
    cache = (lambda m: new_cache(m)) if site == "state" else (lambda m: None)
    with fla_lane.fla_calls() as calls:
        want = _reference_run(patched, ref, layer, site, cache(ref))
        plain = _unedited(name, site == "state")
        in_place = _patched_run(patched, layer, site, "in place", cache(patched))
        out_of_place = _patched_run(patched, layer, site, "out of place", cache(patched))
    assert calls, "fla was not called"
    assert not torch.equal(want, plain), "the edit changes nothing: the test would mean nothing"
    assert torch.equal(in_place, want), "in place"
    assert torch.equal(out_of_place, want), "out of place"


# ---------------------------------------------------------------- split, with an edited state


@pytest.mark.parametrize("name", EDITED)
def test_state_at_split_and_edited_state(name):
    """`gi.state_at` splits layer L's prefill after positions 1 and 6 (T = 10) and the state
    after position 1 is halved (head 0) in place. Reference: the unpatched model whose chunk
    call of layer L is replaced by three chunk calls of fla's kernel on the same slices, the
    first segment's final state halved before it starts the second."""
    patched, ref = fla_lane.pair(name)
    layer, positions, Tn = _last_layer(patched), (1, 6), 10
    ids = ids_for(Tn, B=1)
    fired = []

    def halve_first(S):
        fired.append(tuple(S.shape))
        if len(fired) == 1:
            S[0, 0] *= 0.5

    with (
        torch.no_grad(),
        gi.state_at(patched, list(positions), layers=[layer]),
        gi.intervene(patched, {(layer, "state"): halve_first}),
    ):
        got = logits(patched, ids)
    assert len(fired) == 3  # after 1, after 6, the final state

    def split(kernel, q, k, v, *, g, beta, initial_state=None, **kw):
        bounds = [0, *(p + 1 for p in positions), q.shape[1]]
        outs, S = [], initial_state
        for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            o, S = kernel(q[:, s:e], k[:, s:e], v[:, s:e], g=g[:, s:e], beta=beta[:, s:e], initial_state=S,
                          **dict(kw, output_final_state=True))  # fmt: skip
            if i == 0:
                S = S.clone()
                S[0, 0] *= 0.5
            outs.append(o)
        return torch.cat(outs, 1), S

    with torch.no_grad(), fla_lane.kernel_around(ref, layer, split), fla_lane.fla_calls() as calls:
        want = logits(ref, ids)
    assert calls[next(c for c in calls if c.startswith("chunk_"))] == 3 + 1  # three segments + the other layer
    assert torch.equal(got, want)
    assert not torch.equal(want[:, 2:], logits(ref, ids)[:, 2:])


# ---------------------------------------------------------------- in place under autograd


@pytest.mark.parametrize("name", EDITED)
def test_in_place_edits_under_autograd_through_fla_backward(name):
    """q, beta and decay of layer L edited in place in one forward with autograd on, then
    backward through fla's chunk backward: the loss equals the out-of-place edit's and the
    reference's (bitwise), every parameter gradient equals the out-of-place edit's (the same
    listeners, the same layouts: bitwise), and the reference's to 1e-6 relative (a listened
    site hands its gradient upstream in another layout, which can change the last bits of
    gradients summed over positions; README, "Gradients")."""
    patched, ref = fla_lane.pair(name)
    layer = _last_layer(patched)
    ids = ids_for(T, B=1)
    sites = ("q", "beta", "decay")

    def apply(x, site):
        x[_at(x, site)] = _edit_value(site, x)

    def loss_and_grads(model, run):
        loss = run().float().pow(2).mean()
        with fla_lane.fla_calls() as calls:
            loss.backward()
        assert any(c.endswith("_bwd") for c in calls), calls
        grads = {n: p.grad for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    def hooked():
        hs = [gi.site_module(patched, layer, s).register_forward_hook(lambda m, a, o, s=s: apply(o, s)) for s in sites]
        try:
            return logits_with_grad(patched, ids)
        finally:
            for h in hs:
                h.remove()

    def replaced():
        def make(s):
            def f(x):
                x = x.clone()
                apply(x, s)
                return x

            return f

        with gi.intervene(patched, {(layer, s): make(s) for s in sites}):
            return logits_with_grad(patched, ids)

    def before(kw):
        for s in sites:
            kw[HF_ARG[s]] = kw[HF_ARG[s]].clone()
            apply(kw[HF_ARG[s]], s)

    def reference():
        with kernel_edit(ref, layer, before=before):
            return logits_with_grad(ref, ids)

    loss_i, grads_i = loss_and_grads(patched, hooked)
    loss_o, grads_o = loss_and_grads(patched, replaced)
    loss_r, grads_r = loss_and_grads(ref, reference)
    assert torch.equal(loss_i, loss_o) and torch.equal(loss_i, loss_r)
    assert grads_i.keys() == grads_r.keys()
    for n in grads_i:
        a, b, r = grads_i[n], grads_o[n], grads_r[n]
        assert (a is None) == (b is None) == (r is None), n
        if a is not None:
            assert torch.equal(a, b), n
            assert (a.double() - r.double()).norm() <= 1e-6 * r.double().norm() + 1e-12, n


def logits_with_grad(model, ids):
    return model(input_ids=ids, use_cache=False).logits
