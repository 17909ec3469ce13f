"""Core: a patched model is the unpatched model, bit for bit, and its sites work.

Sizes: T in {1, 3, 63, 64, 65, 130} covers one token, a partial chunk, one chunk minus one,
exactly one 64-token chunk, one past it and three chunks with padding. Every comparison is
`torch.equal` against an unpatched deep copy: both run HF's torch kernels on the CPU.
"""

import copy
import re

import pytest
import torch
from conftest import ids_for, left_pad_mask, logits, new_cache, no_hooks
from models import MODELS, build, pick
from reference import kernel_edit
from transformers import LlamaConfig, LlamaForCausalLM

import gdn_intervene as gi
from gdn_intervene import _compat
from gdn_intervene.layer import _WARNED, GDNMixin
from gdn_intervene.sites import SITE_NAMES, SITES
from gdn_intervene.toy import unloadable

NAMES = list(MODELS)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


pytestmark = pytest.mark.compat  # the whole file runs on every release of the CI matrix


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("T", [1, 3, 63, 64, 65, 130])
@pytest.mark.parametrize("hv_ratio", [1, 2], ids=["hv=hk", "hv=2hk"])
@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("name", NAMES)
def test_prefill_logits_bitwise(pair, name, dtype, hv_ratio, T):
    patched, ref = pair(name, hv_ratio, DTYPES[dtype])
    ids = ids_for(T)
    assert torch.equal(logits(patched, ids), logits(ref, ids))  # batch 3
    mask = left_pad_mask(3, T)
    assert torch.equal(logits(patched, ids, mask), logits(ref, ids, mask))  # left padding
    one, one_mask = ids[2:], left_pad_mask(3, T)[2:]
    assert torch.equal(logits(patched, one, one_mask), logits(ref, one, one_mask))  # padded batch of 1


def _conv_rec(cache, layers):
    view = _compat.cache_view(cache)
    return [(view.get_conv_state(i).clone(), view.get_recurrent_state(i).clone()) for i in layers]


def _decode_both(patched, ref, steps=7):
    """A 64-token padded prefill (pads inside the one 64-token chunk), then greedy decode steps
    by hand on both models; yields (step, logits_p, logits_r, caches, mask) after every call."""
    layers = list(gi.gdn_layers(patched))
    ids, mask = ids_for(64), left_pad_mask(3, 64)
    caches = {k: new_cache(m) for k, m in (("p", patched), ("r", ref))}
    step_ids = ids
    for step in range(steps):
        outs = {k: logits(m, step_ids, mask, cache=caches[k], use_cache=True) for k, m in (("p", patched), ("r", ref))}
        yield step, outs, [(_conv_rec(caches[k], layers)) for k in ("p", "r")], caches, mask
        nxt = outs["p"][:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        step_ids = nxt


@pytest.mark.parametrize("hv_ratio", [1, 2], ids=["hv=hk", "hv=2hk"])
@pytest.mark.parametrize("name", NAMES)
def test_cached_decode_steps_bitwise(pair, name, hv_ratio):
    """Prefill (padded), then 6 decode steps: logits and both cache states equal after every call."""
    patched, ref = pair(name, hv_ratio)
    for step, outs, (mine, theirs), _, _ in _decode_both(patched, ref):
        assert torch.equal(outs["p"], outs["r"]), f"logits differ at step {step}"
        for (cp, rp), (cr, rr) in zip(mine, theirs):
            assert torch.equal(cp, cr) and torch.equal(rp, rr), f"cache differs at step {step}"


@pytest.mark.parametrize("name", NAMES)
def test_cached_multi_token_continuation_bitwise(pair, name):
    """After prefill and two decode steps, a 5-token cached call (chunk kernel + initial state)."""
    patched, ref = pair(name)
    *_, (_, _, _, caches, mask) = _decode_both(patched, ref, steps=3)
    more = ids_for(5, seed=1)
    mask = torch.cat([mask, torch.ones_like(more)], dim=1)  # the mask of the last call, plus 5
    cont = {k: logits(m, more, mask, cache=caches[k], use_cache=True) for k, m in (("p", patched), ("r", ref))}
    assert torch.equal(cont["p"], cont["r"])


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generate_bitwise(pair, name):
    patched, ref = pair(name)
    ids, mask = ids_for(64), left_pad_mask(3, 64)
    gen = {
        k: m.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, min_new_tokens=20)
        for k, m in (("p", patched), ("r", ref))
    }
    assert gen["p"].shape[1] == 84 and torch.equal(gen["p"], gen["r"])


@pytest.mark.parametrize("name", NAMES)
def test_beam_search_generate_bitwise(pair, name):
    """Beam search reorders the cache between steps (`reorder_cache`): the sites read the
    reordered states, through whichever cache view the release needs."""
    patched, ref = pair(name)
    ids = ids_for(12)
    fired = []
    h = gi.site_module(patched, list(gi.gdn_layers(patched))[0], "state").register_forward_hook(
        lambda *a: fired.append(1)
    )
    try:
        gen = {
            k: m.generate(ids, max_new_tokens=6, min_new_tokens=6, num_beams=3, do_sample=False)
            for k, m in (("p", patched), ("r", ref))
        }
    finally:
        h.remove()
    assert gen["p"].shape == (3, 18) and torch.equal(gen["p"], gen["r"])
    assert len(fired) == 6  # the prefill and 5 decode steps, each on the 9 beams at once


@pytest.mark.parametrize("name", NAMES)
def test_gradients_bitwise(pair, name):
    patched, ref = pair(name)
    ids = ids_for(70)
    grads = {}
    for key, model in (("p", patched), ("r", ref)):
        model.zero_grad(set_to_none=True)
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=emb).logits.float().pow(2).mean().backward()
        grads[key] = [emb.grad] + [p.grad for p in model.parameters()]
        model.zero_grad(set_to_none=True)
    assert len(grads["p"]) == len(grads["r"])
    for gp, gr in zip(grads["p"], grads["r"]):
        assert (gp is None and gr is None) or torch.equal(gp, gr)


# ---------------------------------------------------------------- install / restore


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_and_checkpoints_roundtrip(pair, name, tmp_path):
    patched, ref = pair(name)
    sp, sr = patched.state_dict(), ref.state_dict()
    assert list(sp) == list(sr) and all(torch.equal(sp[k], sr[k]) for k in sp)
    ids = ids_for(12)
    patched.save_pretrained(tmp_path / "from_patched")
    plain = type(ref).from_pretrained(tmp_path / "from_patched").eval()
    assert not any(isinstance(m, GDNMixin) for m in plain.modules())
    assert torch.equal(logits(plain, ids), logits(ref, ids))
    ref.save_pretrained(tmp_path / "from_plain")
    loaded = gi.from_pretrained(tmp_path / "from_plain", model_class=type(ref)).eval()
    assert all(isinstance(m, GDNMixin) for m in gi.gdn_layers(loaded).values())
    assert torch.equal(logits(loaded, ids), logits(ref, ids))


def test_patch_is_idempotent_and_unpatch_restores():
    ref = build(pick("qwen3_5"))
    model = copy.deepcopy(ref)
    before = {n: (type(m), sorted(m.__dict__)) for n, m in model.named_modules()}
    params = {n: p.data_ptr() for n, p in model.named_parameters()}
    gi.patch(model)
    layers = gi.gdn_layers(model)
    gi.patch(model)
    assert gi.gdn_layers(model) == layers and len(list(model.modules())) == len(list(gi.patch(model).modules()))
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params  # shared, not copied
    layers[0].beta.register_forward_hook(lambda *a: None)
    gi.unpatch(model)
    after = {n: (type(m), sorted(m.__dict__)) for n, m in model.named_modules()}
    assert after == before and no_hooks(model)
    ids = ids_for(10)
    assert torch.equal(logits(model, ids), logits(ref, ids))


def test_patched_context_manager_restores_on_error():
    model = build("qwen3_next")
    with pytest.raises(RuntimeError, match="boom"):
        with gi.patched(model):
            assert gi.gdn_layers(model)
            raise RuntimeError("boom")
    assert not any(isinstance(m, GDNMixin) for m in model.modules())


def test_patch_on_load_builds_patched_modules(tmp_path):
    ref = build(pick("qwen3_5_vl"))
    ref.save_pretrained(tmp_path)
    with gi.patch_on_load():
        model = type(ref).from_pretrained(tmp_path).eval()
    assert len(gi.gdn_layers(model)) == 2
    assert torch.equal(logits(model, ids_for(8)), logits(ref, ids_for(8)))
    plain = type(ref).from_pretrained(tmp_path)  # the patch does not outlive the block
    assert not any(isinstance(m, GDNMixin) for m in plain.modules())


# ---------------------------------------------------------------- sites fire


@pytest.mark.parametrize("name", NAMES)
def test_every_site_fires_once_per_call(pair, name):
    """Fire counts as the registry states them: once per call (prefill and each decode step);
    `state` (Fires.PER_SPLIT) once per split of a prefill under state_at."""
    patched, _ = pair(name)
    ids = ids_for(5)
    with gi.capture(patched, clone=False) as cache:
        kv = new_cache(patched)
        logits(patched, ids, cache=kv, use_cache=True)
        assert {len(v) for _, v in cache.items()} == {1} and len(cache) == 2 * len(SITES)
        for step in range(1, 4):
            logits(patched, ids[:, :1], cache=kv, use_cache=True)
            assert {len(v) for _, v in cache.items()} == {1 + step}
    with gi.capture(patched, clone=False) as cache, gi.state_at(patched, [1, 3]):
        logits(patched, ids, use_cache=False)
    for (layer, sname), values in cache.items():
        assert len(values) == (3 if gi.sites.site(sname).fires is gi.sites.Fires.PER_SPLIT else 1), sname
    assert no_hooks(patched)


# ---------------------------------------------------------------- interventions


@pytest.mark.parametrize("site_name", SITE_NAMES)
@pytest.mark.parametrize("name", NAMES)
def test_replacing_a_site_by_a_copy_of_itself_changes_nothing(pair, name, site_name):
    patched, ref = pair(name)
    ids, mask = ids_for(20), left_pad_mask(3, 20)
    with gi.intervene(patched, {(layer, site_name): torch.clone for layer in gi.gdn_layers(patched)}):
        out = logits(patched, ids, mask)
        gen = patched.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, logits(ref, ids, mask))
    assert torch.equal(gen, ref.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("name", NAMES)
def test_zeroing_beta_of_one_head_at_one_position(pair, name):
    patched, ref = pair(name)
    layer, head, p = list(gi.gdn_layers(patched))[-1], 1, 7
    ids = ids_for(16)

    def zero(beta):
        beta = beta.clone()
        beta[:, p, head] = 0
        return beta

    with gi.intervene(patched, {(layer, "beta"): zero}):
        out = logits(patched, ids)
    base = logits(ref, ids)
    assert torch.equal(out[:, :p], base[:, :p])  # nothing before p changes
    assert (out[:, p:] != base[:, p:]).any(dim=-1).all()  # every later position does

    with kernel_edit(ref, layer, before=lambda kw: kw.__setitem__("beta", zero(kw["beta"]))):
        expected = logits(ref, ids)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("site_name", ["decay", "recurrence", "beta", "v"])
@pytest.mark.parametrize("name", NAMES)
def test_patching_another_runs_value_matches_reference(pair, name, site_name):
    """Activation patching: run B's value at one layer, inserted into run A."""
    patched, ref = pair(name)
    layer = list(gi.gdn_layers(patched))[0]
    a, b = ids_for(33, seed=1), ids_for(33, seed=2)
    saved = {}
    with gi.intervene(patched, {(layer, site_name): lambda x: saved.__setitem__("x", x.clone())}):
        logits(patched, b)
    with gi.intervene(patched, {(layer, site_name): lambda x: saved["x"]}):
        out = logits(patched, a)

    if site_name == "recurrence":
        edit = dict(after=lambda res: (saved["x"], res[1]))
    else:  # a kernel argument
        arg = {"decay": "g"}.get(site_name, site_name)
        edit = dict(before=lambda kw: kw.__setitem__(arg, saved["x"]))
    with kernel_edit(ref, layer, **edit):
        expected = logits(ref, a)
    assert torch.equal(out, expected)
    assert not torch.equal(out, logits(ref, a))


def test_state_replacement_carries_to_the_cache_and_later_tokens(pair):
    patched, ref = pair(pick("qwen3_5"))
    layer = list(gi.gdn_layers(patched))[0]
    ids, nxt = ids_for(12), ids_for(1, seed=5)
    zero_state = lambda S: torch.zeros_like(S)  # noqa: E731
    cache_p = new_cache(patched)
    with gi.intervene(patched, {(layer, "state"): zero_state}):
        first = logits(patched, ids, cache=cache_p, use_cache=True)
    S = _compat.cache_view(cache_p).get_recurrent_state(layer)
    assert torch.equal(S, torch.zeros_like(S))
    after = logits(patched, nxt, cache=cache_p, use_cache=True)

    cache_r = new_cache(ref)
    with kernel_edit(ref, layer, after=lambda res: (res[0], torch.zeros_like(res[1]))):
        expected_first = logits(ref, ids, cache=cache_r, use_cache=True)
    expected_after = logits(ref, nxt, cache=cache_r, use_cache=True)
    assert torch.equal(first, expected_first)  # the state edit does not change this call's output
    assert torch.equal(after, expected_after)  # but it changes the next token
    assert not torch.equal(after, logits(ref, torch.cat([ids, nxt], 1))[:, -1:])


# ---------------------------------------------------------------- native fallback


def test_native_cached_switch_warns_and_matches(pair, recwarn):
    ref = build(pick("qwen3_5"))
    model = gi.patch(copy.deepcopy(ref), native_cached=True)
    _WARNED.clear()
    fired = []
    h = gi.site_module(model, 0, "beta").register_forward_hook(lambda *a: fired.append(1))
    try:
        ids = ids_for(6)
        gen = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert torch.equal(gen, ref.generate(ids, max_new_tokens=5, do_sample=False))
        assert fired == []  # sites do not fire on the native path ...
        logits(model, ids, use_cache=False)
        assert fired == [1]  # ... but do without a cache
    finally:
        h.remove()
    msgs = [w for w in recwarn if issubclass(w.category, gi.NativeFallbackWarning)]
    assert len(msgs) == 1 and "native_cached=True" in str(msgs[0].message)


def test_cache_without_the_linear_attention_api_is_named():
    class LegacyCache:
        def get_conv_state(self, i):
            return None

    reason = _compat.cache_gap(LegacyCache())
    assert "LegacyCache" in reason and "update_recurrent_state" in reason
    assert _compat.cache_gap(new_cache(build(pick("qwen3_5", "qwen3_next")))) is None  # the model's own kind


# ---------------------------------------------------------------- bad input


def test_model_without_gdn_is_rejected():
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no Gated DeltaNet.*Qwen3_5GatedDeltaNet"):
        gi.patch(LlamaForCausalLM(cfg))


def test_unknown_gdn_layout_is_rejected():
    class MyGatedDeltaNet(torch.nn.Module):
        pass

    model = torch.nn.Sequential(MyGatedDeltaNet())
    with pytest.raises(ValueError, match=r"MyGatedDeltaNet looks like a Gated DeltaNet.*FAMILIES"):
        gi.patch(model)


def test_transformers_below_the_supported_range_is_refused_newer_is_not(monkeypatch):
    import transformers

    lo = _compat.TESTED["transformers"][0]
    monkeypatch.delenv("GDN_INTERVENE_SKIP_VERSION_CHECK", raising=False)
    monkeypatch.setattr(transformers, "__version__", "4.40.0")
    with pytest.raises(gi.UnsupportedVersionError, match=rf"supports transformers >={lo}.*found transformers 4\.40\.0"):
        gi.patch(build(pick("qwen3_5")))
    monkeypatch.setattr(transformers, "__version__", "9.0.0")  # newer: guarded by the self-check instead
    assert gi.gdn_layers(gi.patch(build(pick("qwen3_5"))))


@pytest.mark.skipif(unloadable() is None, reason="this release loads the Qwen3.5 toy")
def test_the_toy_needs_qwen3_5_and_the_cli_says_so_in_one_line(capsys, tmp_path):
    from gdn_intervene import cli

    for argv in (
        ["demo", "--no-progress"],
        ["attention"],
        ["trace", "--prompt", "k1 v2", "--corrupt", "k2 v2"],
    ):  # the toy
        out = tmp_path / argv[0]
        rc = cli.main([*argv, "--out", str(out)])
        err = [
            line for line in capsys.readouterr().err.splitlines() if not line.startswith(("[transformers]", "note: "))
        ]
        assert rc == 2 and len(err) == 1, err
        assert re.fullmatch(
            r"error: the bundled toy model is a Qwen3\.5 checkpoint, which transformers \S+ cannot load; "
            r"it needs a release with Qwen3\.5 \(tested: 5\.5 on; the library itself supports 4\.57 on\)",
            err[0],
        ), err
        assert not out.exists()  # refused before any work


def test_a_layout_the_release_predates_is_refused_by_name(monkeypatch):
    """A GDN class whose `__init__` lacks a submodule the decomposed forward reads (OLMo-Hybrid's
    fused `conv1d`, three short convs before 5.15) is refused, naming the release and the first
    one that works; also with the version check skipped."""
    from gdn_intervene.families import FAMILIES

    olmo = next(f for f in FAMILIES if f.name == "olmo_hybrid")

    class OlmoHybridGatedDeltaNet(torch.nn.Module):  # the old layout, as family_of finds it
        def __init__(self):
            super().__init__()
            self.q_conv1d = self.k_conv1d = self.v_conv1d = torch.nn.Conv1d(4, 4, 4, groups=4)
            self.layer_idx = 0

    OlmoHybridGatedDeltaNet.__module__ = olmo.classes[0][0]
    gap = _compat.layout_gap(OlmoHybridGatedDeltaNet, olmo.layout_attrs, olmo.layout_since)
    assert re.search(
        r"OlmoHybridGatedDeltaNet on transformers \S+ has no q_proj, k_proj, v_proj, b_proj, a_proj, g_proj, "
        r"conv1d, .*served from transformers 5\.15\.0 on \(tested: transformers \S+ to \S+; "
        r'pip install "transformers>=\d+\.\d+,<\d+\.\d+"\)$',
        gap,
    )
    assert "\n" not in gap
    monkeypatch.setattr("gdn_intervene.layer._CLASSES", {})
    with pytest.raises(gi.UnsupportedVersionError, match=r"OlmoHybridGatedDeltaNet on transformers .*5\.15\.0"):
        gi.patch(torch.nn.Sequential(OlmoHybridGatedDeltaNet()))


@pytest.mark.skipif(
    _compat.modeling_module("transformers.models.olmo_hybrid.modeling_olmo_hybrid") is None or "olmo_hybrid" in MODELS,
    reason="this release has no OLMo-Hybrid, or serves it",
)
def test_olmo_hybrid_with_three_convs_is_refused(monkeypatch):
    """On 5.3-5.14 (the matrix: 5.5, 5.10): the real class, refused with the release named."""
    import transformers
    from models import olmo_hybrid

    monkeypatch.setenv("GDN_INTERVENE_SKIP_VERSION_CHECK", "1")
    found = re.escape(transformers.__version__)
    model = olmo_hybrid()
    with pytest.raises(
        gi.UnsupportedVersionError,
        match=rf"OlmoHybridGatedDeltaNet on transformers {found} has no "
        rf"conv1d, .*served from transformers 5\.15\.0 on \(tested: .*pip install ",
    ):
        gi.patch(model)
    assert not any(isinstance(m, GDNMixin) for m in model.modules()) and no_hooks(model)  # nothing left behind


@pytest.mark.parametrize(
    "bad, expected",
    [
        (
            lambda b: b[:, :-1],
            r"site linear_attn\.beta of layer 0: expected a tensor \[3, 8, 4\] torch.float32.*received \[3, 7, 4\]",
        ),
        (lambda b: b.double(), r"received \[3, 8, 4\] torch.float64"),
        (lambda b: b[0], r"received \[8, 4\]"),  # would broadcast; must not
        (lambda b: 0.0, r"received a float"),
    ],
    ids=["short", "dtype", "broadcastable", "not-a-tensor"],
)
def test_wrong_replacement_names_the_site(pair, bad, expected):
    patched, _ = pair(pick("qwen3_5"))
    with pytest.raises(gi.SiteValueError, match=expected):
        with gi.intervene(patched, {(0, "beta"): bad}):
            logits(patched, ids_for(8))
    assert no_hooks(patched)


def test_exception_in_user_hook_leaves_nothing_behind():
    ref = build(pick("olmo_hybrid"))
    model = copy.deepcopy(ref)

    def boom(x):
        raise KeyError("user bug")

    with pytest.raises(KeyError, match="user bug"):
        with gi.patched(model):
            with gi.intervene(model, {(2, "recurrence"): boom}):
                logits(model, ids_for(8))
    assert no_hooks(model) and not any(isinstance(m, GDNMixin) for m in model.modules())
    assert torch.equal(logits(model, ids_for(8)), logits(ref, ids_for(8)))


def test_site_on_a_full_attention_layer_lists_gdn_layers(pair):
    patched, _ = pair(pick("qwen3_5"))
    with pytest.raises(ValueError, match=r"layer 1 is not a GDN layer; GDN layers are \[0, 2\]"):
        gi.site_module(patched, 1, "beta")
    with pytest.raises(ValueError, match="unknown site 'betta'; sites are: q_pre_conv"):
        gi.site_module(patched, 0, "betta")
