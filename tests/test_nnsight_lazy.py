"""nnsight models built lazily (`gdn_intervene.nnsight.load(path)`: meta-device placeholders
until the first trace): `gi.capture`, `gi.intervene` and `gi.state_at` load the real weights
first, so they act as on the eager model. And `load(model)` of an in-memory model without a
tokenizer: token ids work, text says a tokenizer is missing."""

import copy

import pytest
import torch

pytest.importorskip("nnsight")

from conftest import ids_for  # noqa: E402
from models import ANY_GDN, build, present  # noqa: E402
from test_nnsight import tokenizer  # noqa: E402

import gdn_intervene as gi  # noqa: E402
from gdn_intervene import nnsight as gnn  # noqa: E402

NAMES = present("qwen3_5", "kimi_linear") or [ANY_GDN]


def _lazy(name, path):
    """(a lazy nnsight model of a tiny checkpoint saved at `path`, the eager patched model)."""
    ref = build(name)
    ref.save_pretrained(path)
    tokenizer().save_pretrained(path)
    lm = gnn.load(str(path))
    assert not lm.dispatched and next(lm._module.parameters()).is_meta
    return lm, gi.patch(copy.deepcopy(ref))


def _logits(lm, x):
    with torch.no_grad(), lm.trace(x):
        out = lm.output.logits.save()
    return out


@pytest.mark.parametrize("name", NAMES)
def test_capture_on_a_lazy_model_records_real_values(name, tmp_path):
    lm, eager = _lazy(name, tmp_path)
    x = ids_for(7, 2)
    with gi.capture(lm, sites=["beta", "state", "out_proj"]) as cache:
        assert lm.dispatched
        _logits(lm, x)
    with torch.no_grad(), gi.capture(eager, sites=["beta", "state", "out_proj"]) as expected:
        eager(input_ids=x, attention_mask=torch.ones_like(x))
    for key, values in expected.items():
        assert len(cache[key]) == len(values) == 1
        assert not cache[key][0].is_meta and torch.equal(cache[key][0], values[0]), key


@pytest.mark.parametrize("name", NAMES)
def test_intervene_on_a_lazy_model_edits_the_output(name, tmp_path):
    lm, eager = _lazy(name, tmp_path)
    L = list(gi.gdn_layers(eager))[-1]
    x = ids_for(7, 2)
    edit = {(L, "beta"): lambda b: b * 0}
    with gi.intervene(lm, edit):
        edited = _logits(lm, x)
    with torch.no_grad(), gi.intervene(eager, edit):
        expected = eager(input_ids=x, attention_mask=torch.ones_like(x)).logits
    assert torch.equal(edited, expected)
    assert not torch.equal(edited, _logits(lm, x))  # the edit changed something


def test_state_at_on_a_lazy_model_splits_the_prefill(tmp_path):
    lm, eager = _lazy(ANY_GDN, tmp_path)
    L = list(gi.gdn_layers(eager))[0]
    x = ids_for(7, 2)
    with gi.state_at(lm, [2, 4], layers=[L]), gi.capture(lm, sites=["state"], layers=[L]) as cache:
        _logits(lm, x)
    with torch.no_grad(), gi.state_at(eager, [2, 4], layers=[L]), gi.capture(eager, sites=["state"], layers=[L]) as ref:
        eager(input_ids=x, attention_mask=torch.ones_like(x))
    assert len(cache[L, "state"]) == 3
    assert all(torch.equal(a, b) for a, b in zip(cache[L, "state"], ref[L, "state"]))


@pytest.mark.parametrize("patched", [True, False])
def test_load_of_an_in_memory_model_without_a_tokenizer(patched):
    ref = build(ANY_GDN)
    model = copy.deepcopy(ref)
    lm = gnn.load(gi.patch(model) if patched else model)
    assert lm.tokenizer is None
    eager = gi.patch(copy.deepcopy(ref))
    x = ids_for(7, 2)
    with torch.no_grad():
        expected = eager(input_ids=x, attention_mask=torch.ones_like(x)).logits
        generated = eager.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False)
    assert torch.equal(_logits(lm, x), expected)
    with torch.no_grad(), lm.generate(x, max_new_tokens=3, do_sample=False) as tracer:
        ids = tracer.result.save()
    assert torch.equal(ids, generated)
    with pytest.raises(ValueError, match="loaded without a tokenizer.*pass token ids, or load\\(model, tokenizer="):
        with lm.trace("w3 w4"):
            pass


@pytest.mark.parametrize("name", NAMES)
def test_analysis_and_tracing_on_a_lazy_model_equal_the_eager_model(name, tmp_path):
    """Tools that run the model themselves (capture for M, attribution, causal tracing,
    attribution patching) load a lazy model's weights before their first forward."""
    from gdn_intervene import analysis as an
    from gdn_intervene import tracing

    x = ids_for(9, 1)
    clean, corrupt = x, x.clone()
    corrupt[0, 3] = (x[0, 3] + 5) % 90 + 3
    runs = {
        "effective attention": lambda m: torch.stack([a.matrix for a in an.effective_attention_for(m, x).values()]),
        "attribution": lambda m: an.attribution_for(m, x, positions=[8], direction=(5, 7)).contributions,
        "causal trace": lambda m: tracing.causal_trace(m, clean, corrupt, answers=(5, 7)).scores["state"],
        "attribution patching": lambda m: tracing.attribution_patching(m, clean, corrupt, answers=(5, 7)).scores[
            "state"
        ],
    }
    for what, run in runs.items():
        lm, eager = _lazy(name, tmp_path / what.replace(" ", "_"))
        got, want = run(lm), run(eager)
        assert not got.is_meta and got.abs().nan_to_num().sum() > 0, what
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=what)


def test_doctor_on_a_lazy_model_checks_its_real_weights(tmp_path):
    from gdn_intervene import doctor

    lm, _ = _lazy(ANY_GDN, tmp_path)
    out = doctor.report(lm)
    assert lm.dispatched and "meta" not in out
    assert ": passed" in out, out
