"""The first-call self-check: passes on this release, refuses a forward that differs from the
decomposed one, can be skipped, runs once per class and is invisible to hooks."""

import copy

import pytest
import torch
from conftest import ids_for
from models import build, pick, present

import gdn_intervene as gi
from gdn_intervene import selfcheck

pytestmark = pytest.mark.compat


@pytest.fixture
def runs(monkeypatch):
    """Counts check runs per class; forgets earlier checks first (and after)."""
    selfcheck.reset()
    monkeypatch.delenv(selfcheck.ENV, raising=False)
    counts: dict[str, int] = {}
    real = selfcheck._run

    def counting(module, *a):
        counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
        return real(module, *a)

    monkeypatch.setattr(selfcheck, "_run", counting)
    yield counts
    selfcheck.reset()


def _gdn(model):
    return [m for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet")]


def _with_changed_hf_forward(model):
    """Simulates a release whose GDN forward differs from the decomposed one in the last bits."""
    base = type(_gdn(model)[0])

    class Changed(base):
        def forward(self, hidden_states, *args, **kwargs):
            return super().forward(hidden_states, *args, **kwargs) * (1 + 2**-20)

    Changed.__name__ = Changed.__qualname__ = "Changed" + base.__name__
    for m in _gdn(model):
        m.__class__ = Changed
    return model


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.mark.parametrize("name", present("qwen3_next", "qwen3_5", "olmo_hybrid"))
def test_passes_on_this_release_once_per_class(runs, name):
    ref = build(name)
    model = gi.patch(copy.deepcopy(ref))
    other = gi.patch(copy.deepcopy(ref))
    ids = ids_for(20)
    assert torch.equal(logits(model, ids), logits(ref, ids))
    logits(model, ids)
    logits(other, ids[:, :1])
    cls = type(gi.gdn_layers(model)[0]).__name__
    assert runs == {cls: 1}  # two layers, two models, three calls: one check


def test_refuses_a_forward_that_differs(runs):
    model = gi.patch(_with_changed_hf_forward(build(pick("qwen3_5"))))
    for _ in range(2):  # refused on the first call and on every later one
        with pytest.raises(
            gi.UnsupportedVersionError,
            match=r"self-check of HookableChanged\w+GatedDeltaNet on "
            r"transformers .*: the decomposed forward does not reproduce .*outputs differ",
        ) as e:
            logits(model, ids_for(12))
        assert isinstance(e.value, selfcheck.SelfCheckError) and selfcheck.ENV in str(e.value)
    assert sum(runs.values()) == 1


def test_refuses_a_final_state_that_differs(runs, monkeypatch):
    from gdn_intervene.modules import Tap

    real = Tap.forward
    # The decomposed forward's state site (HF's forward has none) now shifts the state.
    monkeypatch.setattr(Tap, "forward", lambda self, x: x + 1 if self.site_name == "state" else real(self, x))
    model = gi.patch(build(pick("qwen3_5")))
    with pytest.raises(selfcheck.SelfCheckError, match="final states differ") as e:
        logits(model, ids_for(12))
    assert "outputs differ" not in str(e.value)  # without a cache the state does not reach the output


def test_skip_switches(runs, monkeypatch):
    changed = _with_changed_hf_forward(build(pick("qwen3_5")))
    ref = copy.deepcopy(changed)
    model = gi.patch(copy.deepcopy(changed), selfcheck=False)
    logits(model, ids_for(12))  # not refused: the caller asked to skip
    assert runs == {}

    selfcheck.reset()
    monkeypatch.setenv(selfcheck.ENV, "1")
    model = gi.patch(copy.deepcopy(ref))
    logits(model, ids_for(12))
    assert runs == {}


def test_check_is_invisible_to_hooks(runs):
    model = gi.patch(build(pick("qwen3_5")))
    fired = []
    layers = gi.gdn_layers(model)
    handles = [
        gi.site_module(model, i, s).register_forward_hook(lambda m, a, o, s=s: fired.append(s))
        for i in layers
        for s in ("beta", "state", "out_proj")
    ]
    handles.append(layers[0].register_forward_pre_hook(lambda *a: fired.append("layer")))
    try:
        logits(model, ids_for(12))
    finally:
        for h in handles:
            h.remove()
    assert sum(runs.values()) == 1
    assert sorted(fired) == sorted(["layer"] + ["beta", "state", "out_proj"] * len(layers))


def test_not_run_on_meta_or_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert selfcheck._checkable(torch.zeros(1, 4, 8))
    assert not selfcheck._checkable(torch.empty(1, 4, 8, device="meta"))  # retried on the next call
    with FakeTensorMode() as mode:
        assert not selfcheck._checkable(mode.from_tensor(torch.zeros(1, 4, 8)))


def test_first_call_inside_an_nnsight_trace(runs):
    """The check runs inside nnsight's controller on a twin without it: the trace sees one call
    of each site per layer, with the values of a plain forward."""
    pytest.importorskip("nnsight")
    from test_nnsight import tokenizer

    from gdn_intervene import nnsight as gnn

    model = gi.patch(build(pick("qwen3_5")))
    lm = gnn.load(model, tokenizer=tokenizer())
    ids = ids_for(12)
    saved = {}
    with lm.trace(ids):
        for layer in gnn.layers(lm):
            saved[layer] = gnn.site(lm, layer, "beta").output.save()
        out = lm.output.logits.save()
    assert sum(runs.values()) == 1
    seen = {}
    with (
        torch.no_grad(),
        gi.intervene(model, {(l, "beta"): (lambda v, l=l: seen.__setitem__(l, v.clone())) for l in saved}),
    ):
        plain = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.equal(out, plain) and all(torch.equal(saved[l], seen[l]) for l in saved)
