"""pyvene integration: GDN components of every family, checked against `kernel_edit` on the
unpatched model (HF's own forward; independent of gdn_intervene), bitwise on the CPU path.

T = 7 prompt tokens, batch 2; head 1 of HV = 4, position 3 (mid-prompt, so later tokens see
the edit through the recurrence).
"""

import pytest
import torch
from conftest import ids_for, no_hooks, view
from models import ANY_GDN, MODELS, build, present
from reference import kernel_edit

import gdn_intervene as gi

pv = pytest.importorskip("pyvene")
import gdn_intervene.pyvene as gp  # noqa: E402

gp.register()
NAMES = list(MODELS)
B, T, H, P = 2, 7, 1, 3


@pytest.fixture
def models(pair):
    """(patched, unpatched); pyvene freezes the model's parameters: restore them after."""
    got = []

    def get(name):
        got.append(pair(name))
        return got[-1]

    yield get
    for patched, _ in got:
        for p in patched.parameters():
            p.requires_grad_(True)
        assert all(not (m._forward_hooks or m._forward_pre_hooks) for m in patched.modules()), "hooks left behind"


def hp(h, p):  # h.pos unit location, same for every batch row
    return [[[h]] * B, [[p]] * B]


# kernel argument / result each site is, and how to edit head H at position P there
EDIT = {
    "beta": ("before", lambda kw: kw["beta"], lambda x: (slice(None), P, H)),
    "recurrence": ("after", lambda out: out[0], lambda x: (slice(None), P, H)),
    "state": ("after", lambda out: out[1], lambda x: (slice(None), H)),
}


def reference(ref, layer, site, base, src):
    """Run `src`, keep the kernel's value of `site`; rerun `base` with head H (at position P)
    of that value swapped in. Returns (logits, recurrent state in the cache)."""
    when, get, index = EDIT[site]
    kept = {}

    def keep(x):  # kernel kwargs (before) or (o, S) (after); returns them unchanged
        kept["v"] = get(x).clone()
        return x

    with kernel_edit(ref, layer, **{when: keep}), torch.no_grad():
        ref(input_ids=src)

    def swap(x):
        x = x.clone()
        x[index(x)] = kept["v"][index(x)]
        return x

    if when == "before":
        edit = {"before": lambda kw: kw.__setitem__("beta", swap(kw["beta"]))}
    elif site == "recurrence":
        edit = {"after": lambda out: (swap(out[0]), out[1])}
    else:
        edit = {"after": lambda out: (out[0], swap(out[1]))}
    with kernel_edit(ref, layer, **edit), torch.no_grad():
        out = ref(input_ids=base, use_cache=True)
    return out.logits, view(out.past_key_values).get_recurrent_state(layer)


COMPONENT = {
    "beta": "head_linear_attn_beta",
    "recurrence": "head_linear_attn_recurrence_output",
    "state": "head_linear_attn_state",
}


@pytest.mark.parametrize("site", list(COMPONENT))
@pytest.mark.parametrize("name", NAMES)
def test_vanilla_head_swap_matches_kernel_edit(models, name, site):
    patched, ref = models(name)
    layer = max(gi.gdn_layers(patched))  # the GDN layer after the attention layer
    base, src = ids_for(T, B, seed=1), ids_for(T, B, seed=2)
    want_logits, want_state = reference(ref, layer, site, base, src)

    iv = pv.IntervenableModel([{"layer": layer, "component": COMPONENT[site], "unit": "h.pos"}], patched)
    loc = hp(H, 0 if site == "state" else P)  # one state per call: position 0
    with torch.no_grad():
        _, out = iv({"input_ids": base}, [{"input_ids": src}], {"sources->base": ([loc], [loc])})
    assert no_hooks(patched)
    assert torch.equal(out.logits, want_logits)
    assert torch.equal(view(out.past_key_values).get_recurrent_state(layer), want_state)
    with torch.no_grad():
        clean = patched(input_ids=base, use_cache=True)
    # the swap must change something for this test to mean anything (a state edit: the cache)
    unchanged = torch.equal(view(clean.past_key_values).get_recurrent_state(layer), want_state)
    assert not (unchanged and torch.equal(clean.logits, want_logits))


@pytest.mark.parametrize("name", NAMES)
def test_state_at_a_position_inside_state_at(models, name):
    """Inside `gi.state_at(model, [P])` the state components are the state after token P (the
    first of the call's two firings; the final one passes through): head H of it swapped from
    `src` gives the logits and cached state of the same swap made with `gi.intervene` on the
    first firing. Two positions are refused (pyvene takes one value per call)."""
    patched, _ = models(name)
    layer = min(gi.gdn_layers(patched))  # the first GDN layer: the rest of the model reads the edit
    base, src = ids_for(T, B, seed=1), ids_for(T, B, seed=2)
    iv = pv.IntervenableModel([{"layer": layer, "component": "head_linear_attn_state", "unit": "h.pos"}], patched)
    with torch.no_grad(), gi.state_at(patched, [P], layers=[layer]):
        _, got = iv({"input_ids": base}, [{"input_ids": src}], {"sources->base": ([hp(H, 0)], [hp(H, 0)])})
        assert no_hooks(patched)
        with gi.capture(patched, sites=["state"], layers=[layer]) as seen:
            patched(input_ids=src)
        assert len(seen[layer, "state"]) == 2  # after P, then the final state
        kept, fired = seen[layer, "state"][0], []

        def swap(S):
            fired.append(1)
            if len(fired) > 1:
                return None
            S = S.clone()
            S[:, H] = kept[:, H]
            return S

        with gi.intervene(patched, {(layer, "state"): swap}):
            want = patched(input_ids=base, use_cache=True)
        plain = patched(input_ids=base, use_cache=True)
    assert torch.equal(got.logits, want.logits)
    assert torch.equal(
        view(got.past_key_values).get_recurrent_state(layer), view(want.past_key_values).get_recurrent_state(layer)
    )
    assert not torch.equal(got.logits[:, P + 1 :], plain.logits[:, P + 1 :])  # the later tokens read the swap
    assert torch.equal(got.logits[:, : P + 1], plain.logits[:, : P + 1])  # the earlier ones cannot
    with (
        torch.no_grad(),
        gi.state_at(patched, [1, P], layers=[layer]),
        pytest.raises(ValueError, match=r"split after positions \[1, 3\].*pyvene takes one state per call"),
    ):
        iv({"input_ids": base}, [{"input_ids": src}], {"sources->base": ([hp(H, 0)], [hp(H, 0)])})
    assert no_hooks(patched)


@pytest.mark.skipif("olmo_hybrid" not in MODELS, reason="this release has no OLMo-Hybrid we serve")
def test_whole_position_swap_beta(models):
    """unit="pos" on the non-head component swaps all HV heads at position P."""
    patched, ref = models("olmo_hybrid")  # beta x2 (negative eigenvalues)
    base, src = ids_for(T, B, seed=1), ids_for(T, B, seed=2)
    kept = {}
    with kernel_edit(ref, 0, before=lambda kw: kept.setdefault("b", kw["beta"].clone())), torch.no_grad():
        ref(input_ids=src)

    def swap(kw):
        kw["beta"] = kw["beta"].clone()
        kw["beta"][:, P] = kept["b"][:, P]

    with kernel_edit(ref, 0, before=swap), torch.no_grad():
        want = ref(input_ids=base).logits
    iv = pv.IntervenableModel([{"layer": 0, "component": "linear_attn_beta", "unit": "pos"}], patched)
    with torch.no_grad():
        _, out = iv({"input_ids": base}, [{"input_ids": src}], {"sources->base": P})
    assert torch.equal(out.logits, want)


@pytest.mark.parametrize("kind", ["rotated", "low_rank"])
def test_trainable_intervention_one_step(models, kind):
    patched, _ = models(ANY_GDN)
    if kind == "rotated":
        cfg = {
            "layer": 2,
            "component": "linear_attn_recurrence_output",
            "unit": "pos",
            "intervention_type": pv.RotatedSpaceIntervention,
        }
        loc = {"sources->base": P}
    else:
        cfg = {
            "layer": 2,
            "component": "head_linear_attn_recurrence_output",
            "unit": "h.pos",
            "intervention_type": pv.LowRankRotatedSpaceIntervention,
            "low_rank_dimension": 2,
        }
        loc = {"sources->base": ([hp(H, P)], [hp(H, P)])}
    iv = pv.IntervenableModel([cfg], patched)
    if kind == "rotated":  # swapping every rotated coordinate is the identity map: swap 8 of HV*V
        next(iter(iv.interventions.values())).set_interchange_dim(8)
    params = iv.get_trainable_parameters()
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    base, src = ids_for(T, B, seed=1), ids_for(T, B, seed=2)
    _, out = iv({"input_ids": base}, [{"input_ids": src}], loc)
    out.logits[:, P].logsumexp(-1).sum().backward()  # layer 2 is the last: only position P sees the edit
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, params))
    assert no_hooks(patched)


@pytest.mark.parametrize("name", present("qwen3_5", "qwen3_next"))
def test_generate_matches_hook_reference(models, name):
    """(a) every generated token: beta of layer 0 set to a constant vector (not the prompt);
    (b) the prompt only: head H of the recurrence at position P from a source prompt."""
    patched, _ = models(name)
    base, src = ids_for(T, B, seed=1), ids_for(T, B, seed=2)
    # compare the step logits too: a random tiny model may not flip a greedy token
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    HV = gi.gdn_layers(patched)[0].num_v_heads
    const = torch.linspace(0.05, 0.95, HV)
    # pyvene freezes the parameters, and with frozen parameters HF's prompt logits differ in
    # the last bit (torch 2.13 CPU): build it before the references so all runs share that.
    iv = pv.IntervenableModel(
        [
            {
                "layer": 0,
                "component": "linear_attn_beta",
                "unit": "pos",
                "intervention": pv.VanillaIntervention(source_representation=const),
            }
        ],
        patched,
    )
    iv2 = pv.IntervenableModel(
        [{"layer": 2, "component": "head_linear_attn_recurrence_output", "unit": "h.pos"}], patched
    )

    calls = []

    def set_beta(mod, args, out):  # hand-written: skip the prompt call, edit each decode step
        calls.append(out.shape[1])
        if len(calls) == 1:
            return None
        out = out.clone()
        out[:, 0] = const
        return out

    h = gi.site_module(patched, 0, "beta").register_forward_hook(set_beta)
    try:
        with torch.no_grad():
            want = patched.generate(input_ids=base, **gen)
    finally:
        h.remove()
    assert calls == [T, 1, 1, 1, 1]
    _, got = iv.generate({"input_ids": base}, intervene_on_prompt=False, **gen)
    same(got, want)
    assert not torch.equal(torch.stack(got.logits), torch.stack(patched.generate(input_ids=base, **gen).logits))

    kept = {}
    site = gi.site_module(patched, 2, "recurrence")
    h = site.register_forward_hook(lambda m, a, o: kept.setdefault("o", o.clone()))
    with torch.no_grad():
        patched(input_ids=src)
    h.remove()
    seen = []

    def swap(mod, args, out):
        seen.append(1)
        if len(seen) > 1:
            return None
        out = out.clone()
        out[:, P, H] = kept["o"][:, P, H]
        return out

    h = site.register_forward_hook(swap)
    try:
        with torch.no_grad():
            want = patched.generate(input_ids=base, **gen)
    finally:
        h.remove()
    _, got = iv2.generate(
        {"input_ids": base},
        [{"input_ids": src}],
        {"sources->base": ([hp(H, P)], [hp(H, P)])},
        intervene_on_prompt=True,
        **gen,
    )
    same(got, want)
    assert no_hooks(patched)


def same(got, want):
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits, strict=True))


@pytest.mark.parametrize("name", present("qwen3_5", "kimi_linear") or [ANY_GDN])  # KDA layers sit at self_attn too
def test_gdn_component_at_attention_layer(models, name):
    patched, _ = models(name)
    with pytest.raises(ValueError, match=r"linear_attn_beta.*layer 1 is not a GDN layer; GDN layers are \[0, 2\]"):
        pv.IntervenableModel([{"layer": 1, "component": "linear_attn_beta"}], patched)
    with pytest.raises(ValueError, match=r"full-attention layers are \[1\]"):
        pv.IntervenableModel([{"layer": 0, "component": "head_query_output", "unit": "h.pos"}], patched)
    assert no_hooks(patched)


def test_head_out_of_range_names_head_count_and_leaves_no_hooks(models):
    patched, _ = models(ANY_GDN)
    iv = pv.IntervenableModel([{"layer": 0, "component": "head_linear_attn_beta", "unit": "h.pos"}], patched)
    base, src = ids_for(T, B, seed=1), ids_for(T, B, seed=2)
    with pytest.raises(ValueError, match=r"4 heads \(HV, indices 0..3\)"):
        iv({"input_ids": base}, [{"input_ids": src}], {"sources->base": ([hp(4, P)], [hp(4, P)])})
    assert no_hooks(patched)


def test_transformers_capture_hooks_survive():
    """transformers 5.x installs its output-capturing hooks once per model; pyvene's cleanup
    used to remove them, after which output_hidden_states came back incomplete."""
    model = gi.patch(build(ANY_GDN))
    ids = ids_for(T, B)
    with torch.no_grad():
        want = model(input_ids=ids, output_hidden_states=True).hidden_states
        iv = pv.IntervenableModel([{"layer": 0, "component": "block_output", "unit": "pos"}], model)
        iv({"input_ids": ids}, [{"input_ids": ids}], {"sources->base": 0})
        got = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(got) == len(want) == 4 and all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("name", NAMES)
def test_mapping_paths_and_widths(models, name):
    """Every registered path resolves on the instance, and every GDN width is that of the value."""
    from pyvene.models.intervenable_base import get_dimension_by_component
    from pyvene.models.modeling_utils import getattr_for_torch_module

    patched, _ = models(name)
    assert type(patched) in gp.register()  # idempotent: registering again is harmless
    mapping = pv.type_to_module_mapping[type(patched)]
    widths = {}
    hooks = []
    for c in gp.COMPONENTS.values():
        if c.site is None:
            continue
        mod = getattr_for_torch_module(patched, mapping[c.name][0] % 0)
        assert mod is gi.site_module(patched, 0, c.site.name)

        def keep(m, a, o, c=c):
            lead = o.shape[1] if c.site.has_time else 1
            widths[c.name] = o[0].numel() // lead

        hooks.append(mod.register_forward_hook(keep))
    with torch.no_grad():
        patched(input_ids=ids_for(T, B))
    for h in hooks:
        h.remove()
    for name_, width in widths.items():
        c = gp.COMPONENTS[name_]
        cfg = patched.config.get_text_config()
        heads = gp._family_of_model(type(patched)).letters(cfg)[c.heads] if c.heads else 1  # HK/HV
        assert get_dimension_by_component(type(patched), patched.config, name_) * heads == width, name_
    for comp in ("block_output", "mlp_output"):
        getattr_for_torch_module(patched, mapping[comp][0] % 1)
    attn = getattr_for_torch_module(patched, mapping["attention_output"][0] % 1)
    if hasattr(attn, "q_proj"):  # MLA attention (GLM-5-Next, with a q LoRA) has q_a_proj/q_b_proj instead
        getattr_for_torch_module(patched, mapping["query_output"][0] % 1)


def test_register_covers_all_families():
    import transformers

    classes = {c.__name__ for c in gp.register()}
    for must in (
        "Qwen3NextForCausalLM",
        "Qwen3_5ForCausalLM",
        "Qwen3_5ForConditionalGeneration",
        "Qwen3_5TextModel",
        "Qwen3_5MoeForCausalLM",
        "OlmoHybridForCausalLM",
        "LaraMiniForCausalLM",
        "Qwen4ExpForCausalLM",
        "KimiLinearForCausalLM",
        "Glm5NextForConditionalGeneration",
        "Glm5NextTextModel",
        "BailingHybridForCausalLM",
    ):
        assert must in classes or getattr(transformers, must, None) is None  # absent from this release
    assert {
        "linear_attn_q",
        "linear_attn_k",
        "linear_attn_v",
        "linear_attn_beta",
        "linear_attn_decay",
        "linear_attn_recurrence_output",
        "linear_attn_state",
        "linear_attn_gate",
        "linear_attn_output",
        "head_linear_attn_beta",
        "head_linear_attn_recurrence_output",
    } <= set(gp.COMPONENTS)


@pytest.mark.parametrize("name", present("glm5_next", "qwen4_exp"))
@pytest.mark.parametrize("component", ["block_output", "block_input"])
def test_das_on_hyper_connection_streams(models, name, component):
    """The block components of a model whose residual is N hyper-connection streams (GLM-5-Next:
    [B, T, N, D], `hc_mult`; Qwen4-Exp: [B, T, N*D], `hc_count`) are all streams at a position,
    N*D wide. A rank-2 DAS rotation there equals the hand-written one: at position P,
    h + R^T (R h_src - R h) on the flattened streams (reference: plain hooks on the decoder layer)."""
    from pyvene.models.intervenable_base import get_dimension_by_component

    patched, _ = models(name)
    cfg = patched.config.get_text_config()
    N = getattr(cfg, "hc_mult", None) or getattr(cfg, "hc_count", 1)
    width = get_dimension_by_component(type(patched), patched.config, component)
    assert N > 1 and width == N * cfg.hidden_size
    L = 1
    iv = pv.IntervenableModel(
        [
            {
                "layer": L,
                "component": component,
                "unit": "pos",
                "intervention_type": pv.LowRankRotatedSpaceIntervention,
                "low_rank_dimension": 2,
            }
        ],
        patched,
    )
    R = next(iter(iv.interventions.values())).rotate_layer.weight.detach().clone()  # [N*D, 2]
    base, src = ids_for(T, B, seed=1), ids_for(T, B, seed=2)
    with torch.no_grad():
        _, out = iv({"input_ids": base}, [{"input_ids": src}], {"sources->base": P})
    for p in patched.parameters():
        p.requires_grad_(True)
    decoder = gp._decoder_layers(patched)[L]
    seen = {}

    def flat(h):
        return h.reshape(*h.shape[:2], -1)

    def grab(h):
        seen["src"] = flat(h)[:, P].clone()

    def rotate(h):
        f = flat(h).clone()
        x = f[:, P]
        f[:, P] = x + (seen["src"] - x) @ R @ R.T
        return f.view(h.shape)

    def hooks(fn):
        if component == "block_output":

            def out_hook(m, a, o):
                new = fn(o[0] if isinstance(o, tuple) else o)
                return None if new is None else ((new, *o[1:]) if isinstance(o, tuple) else new)

            return decoder.register_forward_hook(out_hook)
        return decoder.register_forward_pre_hook(lambda m, a: None if (new := fn(a[0])) is None else (new, *a[1:]))

    with torch.no_grad():
        for fn, ids in ((grab, src), (rotate, base)):
            h = hooks(fn)
            try:
                want = patched(input_ids=ids).logits
            finally:
                h.remove()
    torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.logits, patched(input_ids=base).logits.detach(), atol=1e-4)
