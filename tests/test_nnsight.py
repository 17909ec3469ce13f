"""nnsight integration: every read and edit through nnsight against an independent reference.

References never use nnsight: plain forward hooks (`gi.intervene`) on the same patched module,
or `reference.kernel_edit`, which runs the UNPATCHED model with HF's forward and edits the
arguments/results of one layer's kernel call. Comparisons are bitwise (CPU torch path).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import itertools
import weakref

import pytest
import torch

pytest.importorskip("nnsight")

from conftest import ids_for  # noqa: E402
from models import ANY_GDN, MODELS, VOCAB, build, present  # noqa: E402
from reference import kernel_edit, unrepeat  # noqa: E402

import gdn_intervene as gi  # noqa: E402
from gdn_intervene import _compat  # noqa: E402
from gdn_intervene import nnsight as gnn  # noqa: E402
from gdn_intervene.layer import GDNMixin  # noqa: E402
from gdn_intervene.sites import SITE_NAMES  # noqa: E402

FAMILIES = list(MODELS)
L, POS, HEAD = 2, 4, 1  # the edited GDN layer (after the full-attention layer 1), position, value head
T, N = 7, 4  # prompt length; new tokens (N forwards: the prefill and N - 1 decode steps)


def tokenizer():
    """A word-level tokenizer over the toy vocab, built offline: "w3 w4" -> [3, 4]."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@functools.cache
def _wrapped(name: str):
    ref = build(name)
    return gnn.load(gi.patch(copy.deepcopy(ref)), tokenizer=tokenizer()), ref


@pytest.fixture
def wrapped():
    """wrapped(name) -> (nnsight model over a patched copy, unpatched HF reference); checks
    on the way in and out that no test leaves a hook behind."""
    used = []

    def get(name):
        lm, ref = _wrapped(name)
        used.append(lm)
        assert not _hooked(lm), "a previous test left hooks behind"
        return lm, ref

    yield get
    for lm in used:
        assert not _hooked(lm), "this test left hooks behind"


def _hooked(lm) -> list[str]:
    return [n for n, m in lm._module.named_modules() if m._forward_hooks or m._forward_pre_hooks]


def attn(lm, layer: int):
    """The natural nnsight path of a GDN module (multimodal wrappers nest the text model)."""
    body = lm.model.language_model if hasattr(lm.model._module, "language_model") else lm.model
    parent = gi.gdn_layers(lm._module)[layer]._gdn_family.parent  # KDA: self_attn
    return getattr(body.layers[layer], parent)


def hf_logits(ref, ids: torch.Tensor) -> torch.Tensor:
    # nnsight passes an all-ones attention mask with token-id inputs; so does the reference.
    with torch.no_grad():
        return ref(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def hf_generate(ref, ids: torch.Tensor):
    with torch.no_grad():
        out = ref.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=N,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.logits, 1)  # [B, T + N], [B, N, vocab]


def ids(B: int = 2, seed: int = 0) -> torch.Tensor:
    return ids_for(T, B, seed)


# ---------------------------------------------------------------- reads


@pytest.mark.parametrize("name", FAMILIES)
def test_reads_equal_plain_hooks_and_hf_kernel_arguments(wrapped, name):
    lm, ref = wrapped(name)
    x = ids()
    seen = {}
    with lm.trace(x):
        for layer in gnn.layers(lm):  # sites in execution order, layer by layer
            for s in SITE_NAMES:
                seen[layer, s] = gnn.site(lm, layer, s).output.save()
        logits = lm.output.logits.save()

    hooked = {}
    record = {key: (lambda v, key=key: hooked.__setitem__(key, v.detach().clone())) for key in seen}
    with torch.no_grad(), gi.intervene(lm._module, record):
        lm._module(input_ids=x, attention_mask=torch.ones_like(x))
    for key in seen:
        assert torch.equal(seen[key], hooked[key]), key

    # Independent: the kernel arguments and results of HF's own forward, unpatched.
    for layer in gnn.layers(lm):
        hf = {}
        record_results = lambda out: hf.update(o=out[0], S=out[1]) or out  # noqa: E731
        with kernel_edit(ref, layer, before=hf.update, after=record_results):
            assert torch.equal(hf_logits(ref, x), logits)
        pairs = [
            ("q", "q"),
            ("k", "k"),
            ("v", "v"),
            ("beta", "beta"),
            ("decay", "g"),
            ("recurrence", "o"),
            ("state", "S"),
        ]
        for site, arg in pairs:
            assert torch.equal(seen[layer, site], unrepeat(hf[arg], seen[layer, site].shape[2])), (layer, site)


# ---------------------------------------------------------------- edits


@pytest.mark.parametrize("name", FAMILIES)
def test_zero_beta_at_one_position_and_head(wrapped, name):
    lm, ref = wrapped(name)
    x = ids()
    with lm.trace(x):
        attn(lm, L).beta.output[:, POS, HEAD] = 0
        edited = lm.output.logits.save()

    def before(kw):
        kw["beta"] = kw["beta"].clone()
        kw["beta"][:, POS, HEAD] = 0

    with kernel_edit(ref, L, before=before):
        expected = hf_logits(ref, x)
    assert torch.equal(edited, expected)
    plain = hf_logits(ref, x)
    assert torch.equal(edited[:, :POS], plain[:, :POS])  # causal: earlier positions untouched
    assert not torch.equal(edited[:, POS:], plain[:, POS:])


@pytest.mark.parametrize("name", FAMILIES)
def test_scale_decay_in_place(wrapped, name):
    lm, ref = wrapped(name)
    x = ids()
    with lm.trace(x):
        attn(lm, L).decay.output[:, :, HEAD] *= 2  # g <= 0: doubling g squares decay = exp(g)
        edited = lm.output.logits.save()

    def before(kw):
        kw["g"] = kw["g"].clone()
        kw["g"][:, :, HEAD] *= 2

    with kernel_edit(ref, L, before=before):
        assert torch.equal(edited, hf_logits(ref, x))
    assert not torch.equal(edited, hf_logits(ref, x))


@pytest.mark.parametrize("name", FAMILIES)
def test_activation_patching_recurrence_between_invokes(wrapped, name):
    lm, ref = wrapped(name)
    clean, corrupt = ids(1, seed=1), ids(1, seed=2)
    with lm.trace() as tracer:
        barrier = tracer.barrier(2)  # the read in the first invoke happens before the write
        with tracer.invoke(clean):
            o_clean = attn(lm, L).recurrence.output  # [1, T, HV, V]
            barrier()
        with tracer.invoke(corrupt):
            barrier()
            attn(lm, L).recurrence.output[:, POS] = o_clean[:, POS]
            patched = lm.output.logits.save()  # the corrupt row only

    def after(out):  # the same batch, row 1 takes row 0's delta-rule output at POS
        o, S = out
        o = o.clone()
        o[1, POS] = o[0, POS]
        return o, S

    both = torch.cat([clean, corrupt])
    with kernel_edit(ref, L, after=after):
        expected = hf_logits(ref, both)[1:]
    assert torch.equal(patched, expected)
    assert not torch.equal(patched, hf_logits(ref, both)[1:])


# ---------------------------------------------------------------- generation


def _beta_edit_reference(steps):
    """kernel_edit `before` that zeroes beta[:, -1, HEAD] on the layer's calls in `steps`."""
    calls = itertools.count()

    def before(kw):
        if next(calls) in steps:
            kw["beta"] = kw["beta"].clone()
            kw["beta"][:, -1, HEAD] = 0

    return before


@pytest.mark.parametrize("name", FAMILIES)
def test_generation_edit_on_every_step(wrapped, name):
    lm, ref = wrapped(name)
    x = ids()
    logits = []
    with lm.generate(x, max_new_tokens=N) as tracer:
        for step in tracer.iter[:N]:  # the prefill, then every decode step
            attn(lm, L).beta.output[:, -1, HEAD] = 0
            logits.append(lm.lm_head.output[:, -1].save())
        tokens = tracer.result.save()

    with kernel_edit(ref, L, before=_beta_edit_reference(range(N))):
        expected_tokens, expected_logits = hf_generate(ref, x)
    assert torch.equal(tokens, expected_tokens)
    assert torch.equal(torch.stack(logits, 1), expected_logits)
    assert not torch.equal(expected_logits, hf_generate(ref, x)[1])


@pytest.mark.parametrize("name", present("qwen3_5", "olmo_hybrid") or [ANY_GDN])
def test_generation_edit_on_chosen_steps(wrapped, name):
    lm, ref = wrapped(name)
    x = ids()
    logits = []
    with lm.generate(x, max_new_tokens=N) as tracer:
        for step in tracer.iter[1:3]:  # decode steps 1 and 2 only
            attn(lm, L).beta.output[:, -1, HEAD] = 0
            logits.append(lm.lm_head.output[:, -1].save())
        tokens = tracer.result.save()

    with kernel_edit(ref, L, before=_beta_edit_reference({1, 2})):
        expected_tokens, expected_logits = hf_generate(ref, x)
    plain_logits = hf_generate(ref, x)[1]
    assert torch.equal(tokens, expected_tokens)
    assert torch.equal(torch.stack(logits, 1), expected_logits[:, 1:3])
    assert torch.equal(expected_logits[:, :1], plain_logits[:, :1])  # the prefill is not edited
    assert not torch.equal(expected_logits[:, 1:], plain_logits[:, 1:])


@pytest.mark.parametrize("name", FAMILIES)
def test_state_patching_carries_into_generation(wrapped, name):
    lm, ref = wrapped(name)
    clean, corrupt = ids(1, seed=1), ids(1, seed=2)
    with lm.generate(max_new_tokens=N) as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(clean):
            S_clean = attn(lm, L).state.output  # prefill state [1, HV, K, V]
            barrier()
        with tracer.invoke(corrupt):
            barrier()
            attn(lm, L).state.output = S_clean  # written to the cache: decoding continues from it
            tokens = tracer.result.save()  # this invoke's row

    calls = itertools.count()

    def after(out):
        o, S = out
        if next(calls) == 0:  # the prefill
            S = S.clone()
            S[1] = S[0]
        return o, S

    both = torch.cat([clean, corrupt])
    with kernel_edit(ref, L, after=after):
        expected, expected_logits = hf_generate(ref, both)
    assert torch.equal(tokens, expected[1:])
    assert not torch.equal(expected_logits[1:], hf_generate(ref, both)[1][1:])


# ---------------------------------------------------------------- loading


def _save(name, path):
    ref = build(name)
    ref.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return ref


@pytest.mark.parametrize("name", FAMILIES)
def test_load_from_directory_lazy_and_dispatched(name, tmp_path):
    ref = _save(name, tmp_path)
    x = ids()
    if name == "glm5_next":
        pytest.skip(
            "GLM-5-Next has no *ForCausalLM (AutoModelForCausalLM refuses its config) and its "
            "image-text-to-text pipeline needs Glm5NextVideoProcessor, i.e. torchvision; "
            "a loaded model (gnn.load(model)) is covered by every other test"
        )
    for dispatch in (False, True):
        lm = gnn.load(str(tmp_path), dispatch=dispatch)
        layers = gi.gdn_layers(lm._module)
        assert list(layers) == [0, 2] and all(isinstance(m, GDNMixin) for m in layers.values())
        assert next(lm._module.parameters()).is_meta is not dispatch
        beta = gnn.site(lm, 0, "beta")
        with lm.trace(x):
            b = beta.output.save()
            logits = lm.output.logits.save()
        # Dispatch swapped in new, real modules: patched, and the same envoy points at them.
        assert beta._module is gi.site_module(lm._module, 0, "beta")
        assert not next(lm._module.parameters()).is_meta
        assert torch.equal(logits, hf_logits(ref, x))
        hf = {}
        with kernel_edit(ref, 0, before=lambda kw: hf.update(beta=kw["beta"])):
            hf_logits(ref, x)
        assert torch.equal(b, hf["beta"])


def test_text_prompts_use_the_saved_tokenizer(tmp_path):
    ref = _save(ANY_GDN, tmp_path)
    lm = gnn.load(str(tmp_path))
    with lm.trace("w3 w4 w5 w6"):
        logits = lm.output.logits.save()
    assert torch.equal(logits, hf_logits(ref, torch.tensor([[3, 4, 5, 6]])))


def test_module_wrapped_by_nnsight_before_patching():
    # nnsight captures each module's forward when it first wraps it; load() re-points it at
    # the patched forward, else no site would fire (OutOfOrderError: "already ran past it").
    from nnsight.modeling.transformers import TransformersModel

    ref = build(ANY_GDN)
    model = copy.deepcopy(ref)
    TransformersModel(model, task="text-generation", tokenizer=tokenizer())
    lm = gnn.load(model, tokenizer=tokenizer())
    x = ids()
    with lm.trace(x):
        b = attn(lm, 0).beta.output.save()
    hf = {}
    with kernel_edit(ref, 0, before=lambda kw: hf.update(beta=kw["beta"])):
        hf_logits(ref, x)
    assert torch.equal(b, hf["beta"])


# ---------------------------------------------------------------- hygiene


def _assert_clean(lm):
    assert not _hooked(lm)
    assert not torch.nn.modules.module._global_forward_hooks
    assert not torch.nn.modules.module._global_forward_pre_hooks
    assert not lm.interleaver.interleaving


def test_no_hooks_remain_after_a_trace_or_an_exception(wrapped):
    lm, ref = wrapped(ANY_GDN)
    x = ids()
    with lm.trace(x):
        attn(lm, L).beta.output[:] = 0
    _assert_clean(lm)
    with pytest.raises(RuntimeError, match="inside the trace"):
        with lm.trace(x):
            attn(lm, L).beta.output[:] = 0
            raise RuntimeError("inside the trace")
    _assert_clean(lm)
    with pytest.raises(gi.SiteValueError):
        with lm.trace(x):
            attn(lm, L).beta.output = torch.zeros(1)
    _assert_clean(lm)
    with lm.trace(x):  # and the model is unedited afterwards
        logits = lm.output.logits.save()
    assert torch.equal(logits, hf_logits(ref, x))


def _live_tensors() -> int:
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


def test_200_traces_do_not_grow_memory(wrapped):
    lm, _ = wrapped(ANY_GDN)
    x = ids()

    def trace():
        with lm.trace(x):
            b = attn(lm, 0).beta.output.save()
            attn(lm, L).decay.output[:, :, HEAD] *= 2
        return b

    trace()  # warm-up: nnsight caches the compiled block once
    gc.collect()
    before = _live_tensors()
    saved = [weakref.ref(trace()) for _ in range(200)]
    gc.collect()
    assert all(r() is None for r in saved)
    assert _live_tensors() <= before

    model_ref = weakref.ref(gnn.load(build(ANY_GDN), tokenizer=tokenizer())._module)
    gc.collect()
    assert model_ref() is None


# ---------------------------------------------------------------- errors


def test_wrong_shape_names_the_site_and_both_shapes(wrapped):
    lm, _ = wrapped(ANY_GDN)
    with pytest.raises(gi.SiteValueError) as err:
        with lm.trace(ids()):
            attn(lm, L).beta.output = torch.zeros(2, T, 3)
    message = str(err.value)
    assert "linear_attn.beta of layer 2" in message
    assert "[2, 7, 4]" in message and "[2, 7, 3]" in message


def test_full_attention_layer_and_unknown_site_errors(wrapped):
    lm, _ = wrapped(ANY_GDN)
    with pytest.raises(AttributeError, match=r"not a Gated DeltaNet layer; the GDN layers are \[0, 2\]"):
        lm.model.layers[1].linear_attn
    with pytest.raises(ValueError, match=r"layer 1 is not a GDN layer; GDN layers are \[0, 2\]"):
        gnn.site(lm, 1, "beta")
    with pytest.raises(AttributeError, match="its sites are: q_pre_conv, k_pre_conv"):
        lm.model.layers[0].linear_attn.betta
    with pytest.raises(ValueError, match="unknown site 'betta'; sites are: q_pre_conv"):
        gnn.site(lm, 0, "betta")
    assert gnn.site(lm, 2, "beta") is lm.model.layers[2].linear_attn.beta
    assert gnn.site(lm, 0, "norm") is lm.model.layers[0].linear_attn.norm


def test_a_model_without_gdn_layers_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(ValueError, match="LlamaForCausalLM has no Gated DeltaNet module"):
        gnn.load(llama, tokenizer=tokenizer())


@pytest.mark.skipif("olmo_hybrid" not in MODELS, reason="this release has no OLMo-Hybrid we serve")
def test_olmo_hybrid_norm_site_resolves_to_o_norm(wrapped):
    lm, _ = wrapped("olmo_hybrid")
    assert gnn.site(lm, 0, "norm") is lm.model.layers[0].linear_attn.o_norm
    assert gnn.site(lm, 0, "out_proj") is lm.model.layers[0].linear_attn.o_proj


# ---------------------------------------------------------------- migration from .source


def _kernels_are_module_functions() -> bool:
    """The migration table below names HF's forward of 5.15 on (module-level kernel calls)."""
    mod = _compat.modeling_module("transformers.models.qwen3_5.modeling_qwen3_5")
    return mod is not None and not _compat.convention(mod.Qwen3_5GatedDeltaNet).kernels_on_instance


@pytest.mark.skipif(
    not _kernels_are_module_functions(),
    reason="`.source` names differ before 5.15 (HF calls self.chunk_gated_delta_rule)",
)
def test_source_names_on_unpatched_qwen3_5_equal_the_sites():
    """README table: nnsight 0.8.1 `.source` names of HF's Qwen3.5 forward (transformers 5.24)."""
    from nnsight.modeling.transformers import TransformersModel

    ref = build(ANY_GDN)
    plain = TransformersModel(copy.deepcopy(ref), task="text-generation", tokenizer=tokenizer())
    lm = gnn.load(gi.patch(copy.deepcopy(ref)), tokenizer=tokenizer())
    old_to_new = {  # in execution order, as a trace must request them
        "z_1": "gate",
        "self_in_proj_b_0": "beta_logit",
        "self_in_proj_a_0": "decay_logit",
        "query_0": "q",
        "key_0": "k",
        "value_0": "v",
        "b_sigmoid_0": "beta",
        "g_0": "decay",
        "torch_chunk_gated_delta_rule_0": "recurrence",  # output (o, S): o, and S is `state`
        "self_norm_0": "norm",
    }
    old, new = {}, {}
    x = ids()
    with plain.trace(x):
        source = plain.model.layers[0].linear_attn.source
        for name in old_to_new:
            old[name] = getattr(source, name).output.save()
    with lm.trace(x):
        for site in [
            "q",
            "k",
            "v",
            "beta_logit",
            "beta",
            "decay_logit",
            "decay",
            "state",
            "recurrence",
            "gate",
            "norm",
        ]:
            new[site] = gnn.site(lm, 0, site).output.save()
    old["torch_chunk_gated_delta_rule_0"], S = old["torch_chunk_gated_delta_rule_0"]
    assert torch.equal(S, new["state"])
    old["self_norm_0"] = old["self_norm_0"].view_as(new["norm"])  # HF's norm runs on [B*T*HV, V]
    for name, site in old_to_new.items():
        assert torch.equal(old[name], new[site]), (name, site)


# ---------------------------------------------------------------- gradients (attribution patching)


def _site_envoy(lm, name):
    return gnn.site(lm, L, name)


def _hook_grad(model, name, x, rows):
    """Reference: plain forward hook + retain_grad on the batched input; loss on `rows`."""
    seen = []
    h = gi.site_module(model, L, name).register_forward_hook(lambda m, a, o: (o.retain_grad(), seen.append(o))[0])
    try:
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        logits[rows].sum().backward()
    finally:
        h.remove()
        model.zero_grad(set_to_none=True)
    return seen[0].grad[rows]


@pytest.mark.parametrize("invokes", [1, 2])
@pytest.mark.parametrize("sname", SITE_NAMES)
@pytest.mark.parametrize("name", FAMILIES)
def test_grad_in_one_and_two_invokes_is_exact(wrapped, name, sname, invokes):
    lm, _ = wrapped(name)
    clean, corrupt = ids(1, seed=1), ids(1, seed=2)
    split = [3] if sname == "state" else None  # without a split the final state reaches nothing
    ctx = gi.state_at(lm, split, layers=[L]) if split else contextlib.nullcontext()
    with ctx:
        with lm.trace() as tracer:
            if invokes == 2:
                with tracer.invoke(clean):
                    _site_envoy(lm, sname).output  # the usual clean run beside the corrupted one
            with tracer.invoke(corrupt):
                value = _site_envoy(lm, sname).output
                loss = lm.output.logits.sum()
                with loss.backward():
                    grad = value.grad.save()
        x = torch.cat([clean, corrupt]) if invokes == 2 else corrupt
        expected = _hook_grad(lm._module, sname, x, slice(invokes - 1, invokes))
    lm._module.zero_grad(set_to_none=True)
    assert torch.equal(grad, expected) and bool(expected.abs().sum() > 0)


@pytest.mark.parametrize("name", FAMILIES)
def test_in_place_edits_in_a_grad_trace_backpropagate(wrapped, name):
    """`attn.k.output[:, 3] = 0` in a default trace (parameters require grad), then backward:
    the same logits and parameter gradients as the plain-hook edit."""
    lm, _ = wrapped(name)
    x = ids(2)
    edits = ("q_pre_conv", "k", "v", "beta", "decay")
    with lm.trace(x):
        for s in edits:
            _site_envoy(lm, s).output[:, 3] = 0
        logits = lm.output.logits.save()
        lm.output.logits.float().pow(2).mean().backward()
    model = lm._module
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    def zero3(v):
        v[:, 3] = 0

    with gi.intervene(model, {(L, s): zero3 for s in edits}):
        expected = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        expected.float().pow(2).mean().backward()
    assert torch.equal(logits, expected.detach())
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
