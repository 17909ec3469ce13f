"""Activation checkpointing (`model.gradient_checkpointing_enable()`): a recomputation in backward
replays what the forward's sites produced and runs no hook (`gdn_intervene.replay`).

References are the same model without checkpointing, the same edit, the same inputs: every
parameter gradient must be bitwise equal (the recomputation is the same CPU ops on the same
values), whether backward runs inside the edit's block or after it has closed.
"""

import copy
import warnings

import pytest
import torch
from conftest import ids_for
from models import ANY_GDN, MODELS, build

import gdn_intervene as gi
from gdn_intervene import tracing

NAMES = list(MODELS)


def _checkpointing(model, reentrant: bool):
    """Turn transformers' gradient checkpointing on (train mode: it runs only there)."""
    kwargs = {"use_reentrant": reentrant}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # 5.25 renames it activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model.train()


def _pair(name):
    """(checkpointed, plain): two copies of one tiny model in train mode, the first checkpointed."""
    plain = build(name).train()
    for m in plain.modules():  # no randomness in train mode: dropout off
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ckpt = gi.patch(copy.deepcopy(plain))
    gi.patch(plain)
    return _checkpointing(ckpt, reentrant=False), plain


def _loss(model, ids):
    return model(input_ids=ids, use_cache=False).logits.float().pow(2).mean()


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a, b):
    ga, gb = _grads(a), _grads(b)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n


# every kind of site: ours (identity), the conv, HF's own module, the state (with a split)
EDITS = {
    "beta": lambda b: b * 0.5,
    "conv": lambda x: x * 1.5,
    "norm": lambda x: x.mul_(2.0),  # in place
    "v": lambda v: v.flip(1),
    "state": lambda S: S * 0,
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("site", list(EDITS))
def test_an_edit_is_exact_after_its_block_has_closed(name, site):
    """The defect this guards: backward after the block recomputed the layers without the edit
    (parameter gradients off by up to 2.4x, no warning)."""
    ckpt, plain = _pair(name)
    layer = min(gi.gdn_layers(plain))
    ids = ids_for(9, B=2)
    split = gi.state_at if site == "state" else None
    losses = []
    for model in (ckpt, plain):
        with gi.intervene(model, {(layer, site): EDITS[site]}):
            if split:
                with split(model, [4], [layer]):
                    loss = _loss(model, ids)
            else:
                loss = _loss(model, ids)
        loss.backward()  # after the block: the hooks are gone
        losses.append(loss.detach())
    assert torch.equal(*losses)
    _assert_same_grads(ckpt, plain)
    unedited = copy.deepcopy(plain)
    unedited.zero_grad(set_to_none=True)
    _loss(unedited, ids).backward()
    assert any(not torch.equal(g, _grads(unedited)[n]) for n, g in _grads(plain).items())  # the edit had an effect


@pytest.mark.parametrize("name", [ANY_GDN])
def test_two_backward_passes_replay_the_same_values(name):
    ckpt, plain = _pair(name)
    layer = min(gi.gdn_layers(plain))
    ids = ids_for(9, B=2)
    for model in (ckpt, plain):
        with gi.intervene(model, {(layer, "beta"): lambda b: b * 0.25}):
            loss = _loss(model, ids)
        loss.backward(retain_graph=True)
        loss.backward()
    _assert_same_grads(ckpt, plain)


@pytest.mark.parametrize("name", NAMES)
def test_a_stateful_callback_runs_once_and_a_capture_records_once(name):
    """README's `zero_first` with `state_at`, backward inside the block: the recomputation calls
    no callback (before: CheckpointError), and a capture holds one value per forward firing."""
    ckpt, plain = _pair(name)
    layer = min(gi.gdn_layers(plain))
    ids = ids_for(9, B=2)
    records = []
    for model in (ckpt, plain):
        calls = []

        def zero_first(S, calls=calls):
            calls.append(1)
            return S * 0 if len(calls) == 1 else None

        with gi.capture(model, sites=["state", "beta"], layers=[layer]) as cache, gi.state_at(model, [3], [layer]):
            with gi.intervene(model, {(layer, "state"): zero_first}):
                _loss(model, ids).backward()
        records.append((len(calls), [len(cache[layer, s]) for s in ("state", "beta")], cache[layer, "state"]))
    (n_ckpt, lens_ckpt, states_ckpt), (n_plain, lens_plain, states_plain) = records
    assert n_ckpt == n_plain == 2 and lens_ckpt == lens_plain == [2, 1]
    assert all(torch.equal(a, b) for a, b in zip(states_ckpt, states_plain))
    _assert_same_grads(ckpt, plain)


@pytest.mark.parametrize("name", [ANY_GDN, "kimi_linear"])
def test_reentrant_checkpointing_refuses_an_edit_and_records_a_capture_once(name):
    if name not in MODELS:
        pytest.skip(f"{name} is not in this transformers release")
    _, plain = _pair(name)
    ckpt = _checkpointing(copy.deepcopy(plain), reentrant=True)
    layer = min(gi.gdn_layers(plain))
    ids = ids_for(9, B=2)
    hooks = lambda: [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in ckpt.modules()]  # noqa: E731
    before = hooks()  # transformers' own (enable_input_require_grads)
    with pytest.raises(gi.CheckpointEditError, match=r"use_reentrant.*False"):
        with gi.intervene(ckpt, {(layer, "beta"): lambda b: b * 0.5}):
            _loss(ckpt, ids)
    assert hooks() == before  # none of ours left behind
    with pytest.raises(gi.CheckpointEditError, match=r"capture\(detach=False\)"):
        with gi.capture(ckpt, sites=["beta"], detach=False):
            _loss(ckpt, ids)
    seen = []
    for model in (ckpt, plain):
        model.zero_grad(set_to_none=True)
        with gi.capture(model, sites=["beta", "state"], layers=[layer]) as cache:
            _loss(model, ids).backward()  # the recomputation inside backward records nothing
        seen.append(cache)
    for s in ("beta", "state"):
        assert len(seen[0][layer, s]) == len(seen[1][layer, s]) == 1
        assert torch.equal(seen[0][layer, s][0], seen[1][layer, s][0])


@pytest.mark.parametrize("reentrant", [False, True])
def test_attribution_patching_in_train_mode_under_checkpointing(reentrant):
    """AtP on a checkpointed model in train mode equals AtP without checkpointing (before,
    reentrant checkpointing raised a bare autograd error)."""
    _, plain = _pair(ANY_GDN)
    ckpt = _checkpointing(copy.deepcopy(plain), reentrant=reentrant)
    clean = ids_for(8, B=1, seed=3)
    bad = clean.clone()
    bad[0, 2] = (bad[0, 2] + 5) % 90 + 3
    answers = (5, 9)
    a = tracing.attribution_patching(ckpt, clean, bad, answers=answers)
    b = tracing.attribution_patching(plain, clean, bad, answers=answers)
    for n in a.scores:
        assert torch.equal(a.scores[n].nan_to_num(), b.scores[n].nan_to_num()), n
    assert all(
        getattr(m, "gradient_checkpointing", True) for m in ckpt.modules() if hasattr(m, "gradient_checkpointing")
    )
