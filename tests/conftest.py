"""Shared fixtures and helpers. `tests/` is on the import path through pytest's `pythonpath`
setting (pyproject.toml), so test files import `models`, `reference` and these helpers directly."""

import copy
import functools
import inspect
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: threads only add contention

import models  # noqa: E402

import gdn_intervene as gi  # noqa: E402
from gdn_intervene.toy import unloadable  # noqa: E402

try:  # the differential suite's profiles: "ci" (the default: fixed seed, fits CI), "soak" (minutes, new
    # seeds each run: before a release), "long" (2000 examples per test: half an hour)
    from hypothesis import HealthCheck, settings

    _SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
    settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, suppress_health_check=_SLOW,
                              print_blob=True)  # fmt: skip
    settings.register_profile("soak", max_examples=300, deadline=None, suppress_health_check=_SLOW, print_blob=True)
    settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=_SLOW, print_blob=True)
    settings.load_profile("ci")  # `pytest --hypothesis-profile=long` loads the other after this
except ImportError:  # hypothesis is in the [all] extra; the compat matrix rows run without it
    pass

# Tests that run the bundled toy (a Qwen3.5 checkpoint): skipped, saying why, where the release has no Qwen3.5.
needs_toy = pytest.mark.skipif(unloadable() is not None, reason=unloadable() or "")


def logits(model, ids, mask=None, **kw) -> torch.Tensor:
    """[B, T, vocab] logits of one no-grad forward."""
    with torch.no_grad():
        return run(model, input_ids=ids, attention_mask=mask, **kw).logits


def no_hooks(model) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@functools.cache
def _pair(name: str, hv_ratio: int, dtype: torch.dtype):
    ref = models.build(name, hv_ratio=hv_ratio, dtype=dtype)
    return gi.patch(copy.deepcopy(ref)), ref


@pytest.fixture
def pair():
    """pair(name, hv_ratio=None, dtype=fp32) -> (patched, unpatched deep copy); shared per
    session, so tests must leave no hooks behind (the suite checks that they do not).
    hv_ratio None: 2 where the family has GQA, else 1; a GQA ratio for a family without GQA
    (KDA) skips the test."""

    def get(name, hv_ratio=None, dtype=torch.float32):
        if hv_ratio not in (None, 1) and name not in models.GQA:
            pytest.skip(f"{name} has no GQA (HV = HK)")
        patched, ref = _pair(name, hv_ratio, dtype)
        yield_check = [m for m in patched.modules() if m._forward_hooks or m._forward_pre_hooks]
        assert not yield_check, "a previous test left hooks behind"
        for model in (patched, ref):  # multimodal Qwen3.5 caches mrope deltas across calls
            for m in model.modules():
                if getattr(m, "rope_deltas", None) is not None:
                    m.rope_deltas = None
        return patched, ref

    return get


def ids_for(T: int, B: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, models.VOCAB, (B, T), generator=g)


def left_pad_mask(B: int, T: int) -> torch.Tensor:
    """Row b has b pad tokens on the left (row 0 unpadded), capped at T - 1."""
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, : min(b, T - 1)] = 0
    return mask


def cache_kw(model) -> str:
    """The model forward's name for the cache: `cache` (transformers 5.24 on) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def new_cache(model):
    """An empty cache of the kind the model makes for itself: HF's DynamicCache, or the
    model-specific one of releases that have it (Qwen3NextDynamicCache, Qwen3_5DynamicCache: 4.57-5.4)."""
    from transformers import DynamicCache

    config = model.config.get_text_config()
    module = vars(sys.modules[type(model).__module__])
    own = [c for n, c in module.items() if n.endswith("DynamicCache") and n != "DynamicCache" and isinstance(c, type)]
    return own[0](config) if own else DynamicCache(config=config)


def view(cache):
    """`cache` through the 5.23 linear-attention API (`get_conv_state`, `get_recurrent_state`),
    whatever the release's cache type."""
    return gi._compat.cache_view(cache)


def run(model, **kw):
    """`model(**kw)`, with `cache=` passed under the model's own name for it."""
    if "cache" in kw:
        kw[cache_kw(model)] = kw.pop("cache")
    return model(**kw)


def allocator_peak_bytes(call) -> int:
    """Peak of the torch CPU allocator's live bytes during call(), above those live before it
    (torch.profiler memory events in time order: deterministic, unlike process RSS)."""
    import torch.profiler as tp

    with tp.profile(activities=[tp.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = call()
        del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def trace_pair(model, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """(clean [1, T], corrupted [1, T] (token 2 changed), (clean answer, corrupt answer)): each
    run's argmax, made to differ where the tiny random model gives both the same."""
    clean = ids_for(T, B=1, seed=seed)
    bad = clean.clone()
    bad[0, 2] = (bad[0, 2] + 7) % 90 + 3
    with torch.no_grad():
        answers = (int(model(clean).logits[0, -1].argmax()), int(model(bad).logits[0, -1].argmax()))
    if answers[0] == answers[1]:
        answers = (answers[0], (answers[0] + 1) % models.VOCAB)
    return clean, bad, answers
