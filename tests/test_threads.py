"""The thread rule: captures, interventions and `state_at` act only on forwards of the thread
that opened them; concurrent users of one model each get their single-threaded result. Also:
`capture(detach=False)` records the tensor the layer goes on with, so `autograd.grad` reaches it.

Thread tests run the threads in lock step (a barrier around every forward), so both blocks are
open, and forwards of both threads run, at the same time."""

import _thread
import contextlib
import queue
import threading

import pytest
import torch
from conftest import ids_for, trace_pair
from models import ANY_GDN, present

import gdn_intervene as gi
from gdn_intervene.sites import SITE_NAMES
from gdn_intervene.tracing import causal_trace

T, STEPS = 9, 3  # prompt length; forwards per thread


def _in_threads(*jobs):
    """Run jobs(barrier) in one thread each, all at once; their results, or the first error."""
    barrier = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []

    def run(i):
        try:
            results[i] = jobs[i](barrier)
        except BaseException as e:  # noqa: BLE001 - reraised below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


def _capture_job(model, x, sites, positions=None):
    """Captures `sites` over STEPS forwards of `x` (in `state_at(positions)` if given)."""

    def job(barrier=None):
        wait = barrier.wait if barrier else (lambda: None)
        with torch.no_grad(), gi.capture(model, sites=sites) as cache:
            split = gi.state_at(model, positions) if positions else None
            if split:
                split.__enter__()
            try:
                wait()
                for _ in range(STEPS):
                    model(input_ids=x, use_cache=False)
                    wait()
            finally:
                if split:
                    split.__exit__(None, None, None)
        return {k: list(v) for k, v in cache.items()}

    return job


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k])) for k in a
    )


@pytest.mark.parametrize("name", present("qwen3_5", "kimi_linear") or [ANY_GDN])
def test_concurrent_captures_each_see_their_own_forwards(pair, name):
    model, _ = pair(name)
    x, y = ids_for(T, 2, seed=1), ids_for(T, 3, seed=2)
    jobs = [_capture_job(model, x, SITE_NAMES), _capture_job(model, y, ["beta", "state", "out_proj"])]
    alone = [job() for job in jobs]
    together = _in_threads(*jobs)
    for a, b in zip(together, alone):
        assert all(len(v) == STEPS for v in a.values())  # not 2 * STEPS: no firing of the other thread
        assert _same(a, b)


def test_concurrent_state_at_splits_only_its_own_thread(pair):
    model, _ = pair(ANY_GDN)
    x = ids_for(T, 2, seed=1)
    jobs = [
        _capture_job(model, x, ["state", "recurrence"], positions=[2, 5]),
        _capture_job(model, x, ["state", "recurrence"], positions=[4]),
        _capture_job(model, x, ["state", "recurrence"]),  # no split: one state per forward
    ]
    alone = [job() for job in jobs]
    together = _in_threads(*jobs)
    layers = list(gi.gdn_layers(model))
    for a, b, per_forward in zip(together, alone, (3, 2, 1)):
        assert all(len(a[L, "state"]) == STEPS * per_forward for L in layers)
        assert _same(a, b)
    assert all(m.state_positions is None for m in gi.gdn_layers(model).values())  # restored


def test_concurrent_interventions_each_get_their_own_result(pair):
    model, _ = pair(ANY_GDN)
    L = list(gi.gdn_layers(model))[-1]
    x = ids_for(T, 2, seed=1)
    edits = [
        {(L, "beta"): lambda b: b * 0},
        {(L, "decay"): lambda g: g * 3, (L, "v"): lambda v: v.flip(1)},
        {},  # a thread with no intervention sees the plain model
    ]

    def job(edit):
        def run(barrier=None):
            wait = barrier.wait if barrier else (lambda: None)
            outs = []
            with torch.no_grad(), gi.intervene(model, edit):
                wait()
                for _ in range(STEPS):
                    outs.append(model(input_ids=x, use_cache=False).logits)
                    wait()
            return outs

        return run

    alone = [job(e)() for e in edits]
    together = _in_threads(*(job(e) for e in edits))
    assert not torch.equal(alone[0][0], alone[2][0]) and not torch.equal(alone[1][0], alone[2][0])
    for a, b in zip(together, alone):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_concurrent_causal_traces_equal_single_threaded(pair):
    model, _ = pair(ANY_GDN)
    prompts = [trace_pair(model, 8, seed) for seed in (3, 4)]

    def job(clean, bad, answers):
        def run(barrier=None):
            if barrier:
                barrier.wait()
            return causal_trace(model, clean, bad, answers=answers, batch_size=5)

        return run

    alone = [job(*p)() for p in prompts]
    together = _in_threads(*(job(*p) for p in prompts))
    for a, b in zip(together, alone):
        assert a.scores.keys() == b.scores.keys()
        for s in a.scores:
            torch.testing.assert_close(a.scores[s], b.scores[s], rtol=0, atol=0, equal_nan=True)


def test_a_block_that_misses_its_forwards_says_so(pair):
    """A capture in this thread while another thread runs the model records nothing: it warns."""
    model, _ = pair(ANY_GDN)
    x = ids_for(T, 1)
    with pytest.warns(UserWarning, match="saw none of its thread's forwards"):
        with torch.no_grad(), gi.capture(model, sites=["beta"]) as cache:
            worker = threading.Thread(target=model, kwargs=dict(input_ids=x, use_cache=False))
            worker.start()
            worker.join()
    assert all(not v for v in cache._values.values())


def _in_torch_thread(fn):
    """fn() in a thread that `threading` did not start (as autograd's device threads are)."""
    out = queue.Queue()

    def run():
        try:
            out.put((True, fn()))
        except BaseException as e:  # noqa: BLE001 - returned to the caller
            out.put((False, e))

    _thread.start_new_thread(run, ())
    ok, value = out.get(timeout=120)
    if not ok:
        raise value
    return value


def test_torch_threads_count_as_the_one_thread_with_open_blocks(pair):
    """Autograd's device threads recompute checkpointed layers during a GPU backward: edits
    apply there when one thread holds blocks, and such a forward raises when several do."""
    model, _ = pair(ANY_GDN)
    L = list(gi.gdn_layers(model))[-1]
    x = ids_for(T, 1)
    forward = lambda: model(input_ids=x, use_cache=False).logits  # noqa: E731
    with torch.no_grad():
        with gi.intervene(model, {(L, "beta"): lambda b: b * 0}):
            edited = forward()
            assert torch.equal(_in_torch_thread(forward), edited)
            opened, release = threading.Event(), threading.Event()

            def other():
                with gi.capture(model, sites=["beta"]):
                    opened.set()
                    release.wait(60)

            t = threading.Thread(target=other)
            t.start()
            opened.wait(60)
            try:
                with pytest.raises(RuntimeError, match="cannot tell whose forward this is"):
                    _in_torch_thread(forward)
            finally:
                release.set()
                t.join()
        assert not torch.equal(_in_torch_thread(forward), edited)


# ---------------------------------------------------------------- capture(detach=False)


def _eps_grad(model, L, name, x, call=0):
    """Reference: d loss / d site value via a zero `eps` (requires grad) added to firing `call`."""
    eps, calls = [], [0]

    def add(module, args, out):
        calls[0] += 1
        if calls[0] - 1 == call:
            eps.append(torch.zeros_like(out, requires_grad=True))
            return out + eps[0]

    h = gi.site_module(model, L, name).register_forward_hook(add)
    try:
        loss = model(input_ids=x, use_cache=False).logits.float().pow(2).mean()
    finally:
        h.remove()
    return torch.autograd.grad(loss, eps[0])[0]


@pytest.mark.parametrize("clone", [True, False])
@pytest.mark.parametrize("site_name", SITE_NAMES)
@pytest.mark.parametrize("name", present("qwen3_5", "kimi_linear") or [ANY_GDN])
def test_capture_without_detach_gives_the_gradient_at_the_site(pair, name, site_name, clone):
    model, _ = pair(name)
    L = list(gi.gdn_layers(model))[0]
    x = ids_for(T, 2)
    split = gi.state_at(model, [3], layers=[L]) if site_name == "state" else None  # else the state reaches nothing
    with split or contextlib.nullcontext():
        with gi.capture(model, sites=[site_name], layers=[L], detach=False, clone=clone) as cache:
            loss = model(input_ids=x, use_cache=False).logits.float().pow(2).mean()
        grad = torch.autograd.grad(loss, cache[L, site_name][0])[0]
        expected = _eps_grad(model, L, site_name, x)
    assert torch.equal(grad, expected) and bool(expected.abs().sum() > 0)
