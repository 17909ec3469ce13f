"""Tiny random models of every supported family, built from configs in code (no downloads).

`MODELS` maps an id to a builder; tests parametrise over it. Sizes are small but keep the
structure: two GDN layers around one full-attention layer, GQA in the GDN heads
(HV = `hv_ratio` x HK), head dims that are not all equal.

The KDA families (Kimi Linear, GLM-5-Next, Bailing hybrid) have no GQA and one head dim
(HK = HV, K = V): their builders take no `hv_ratio` other than 1 (`GQA` lists the others).
Their full-attention layers are MLA (DeepSeek-style latent attention), their MLPs partly MoE.
GLM-5-Next ships no text-only *ForCausalLM: `glm5_next` is the multimodal
`Glm5NextForConditionalGeneration` fed text, and `glm5_next_text` the bare text model
(`Glm5NextTextModel`, no LM head: its tests compare hidden states, see test_kda.py).
"""

from __future__ import annotations

import torch
import transformers as tr

from gdn_intervene.families import FAMILIES, unserved

VOCAB = 96


def _linear(hv_ratio: int) -> dict:
    return dict(
        linear_num_key_heads=2,
        linear_num_value_heads=2 * hv_ratio,
        linear_key_head_dim=8,
        linear_value_head_dim=12,
        linear_conv_kernel_dim=4,
    )


_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    layer_types=["linear_attention", "full_attention", "linear_attention"],
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)


def qwen3_next(hv_ratio=2):
    cfg = tr.Qwen3NextConfig(**_COMMON, **_linear(hv_ratio), **_MOE, intermediate_size=48, head_dim=16)
    return tr.Qwen3NextForCausalLM(cfg)


def qwen3_5(hv_ratio=2):
    cfg = tr.Qwen3_5TextConfig(**_COMMON, **_linear(hv_ratio), intermediate_size=48, head_dim=16)
    return tr.Qwen3_5ForCausalLM(cfg)


def qwen3_5_vl(hv_ratio=2):
    text = dict(**_COMMON, **_linear(hv_ratio), intermediate_size=48, head_dim=16)
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4)
    cfg = tr.Qwen3_5Config(text_config=text, vision_config=vision)
    return tr.Qwen3_5ForConditionalGeneration(cfg)


def qwen3_5_moe(hv_ratio=2):
    cfg = tr.Qwen3_5MoeTextConfig(**_COMMON, **_linear(hv_ratio), **_MOE, head_dim=16)
    return tr.Qwen3_5MoeForCausalLM(cfg)


def olmo_hybrid(hv_ratio=2):
    cfg = tr.OlmoHybridConfig(**_COMMON, **_linear(hv_ratio), intermediate_size=48, linear_allow_neg_eigval=True)
    return tr.OlmoHybridForCausalLM(cfg)


def lara_mini(hv_ratio=2):
    cfg = tr.LaraMiniConfig(**_COMMON, **_linear(hv_ratio), **_MOE, head_dim=16)
    return tr.LaraMiniForCausalLM(cfg)


def qwen4_exp(hv_ratio=2):
    # Qwen4-Exp: hyper-connections, an indexed-attention layer; tiny indexer settings.
    extra = dict(hc_count=2, hc_lowrank=8, ngram_vocab_size_base=256, split_ngram_parts=2, heads_per_ngram=2)
    indexer = dict(
        indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=16, indexer_compress_ratio=4
    )
    cfg = tr.Qwen4ExpTextConfig(**_COMMON, **_linear(hv_ratio), **_MOE, **extra, **indexer, head_dim=16)
    return tr.Qwen4ExpForCausalLM(cfg)


# KDA: MLA full attention (no rope for GLM-5-Next's DSA layers), a dense then a MoE MLP.
_KDA_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    layer_types=["linear_attention", "full_attention", "linear_attention"],
    mlp_layer_types=["dense", "sparse", "dense"],
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
)
_KDA_HEADS = dict(linear_num_heads=2, linear_head_dim=8, linear_conv_kernel_dim=4)


def _no_gqa(hv_ratio):
    if hv_ratio != 1:
        raise ValueError("KDA families have no GQA (HV = HK)")


def kimi_linear(hv_ratio=1):
    _no_gqa(hv_ratio)
    cfg = tr.KimiLinearConfig(**_KDA_COMMON, **_KDA_HEADS, num_local_experts=4)
    return tr.KimiLinearForCausalLM(cfg)


def _glm5_text(lower_bound):
    # index_topk >= every test length: GLM-5-Next's DSA attention then keeps every key. With a
    # top-k below T its selection depends on the call's length (HF's model, unpatched: logits of
    # a 21-token prefix differ by 0.05 between a 21- and a 50-token call), which breaks the
    # prefix references of the state tests; the KDA layers are what these models test.
    return dict(
        _KDA_COMMON,
        **_KDA_HEADS,
        qk_rope_head_dim=0,
        q_lora_rank=16,
        n_routed_experts=4,
        index_topk=256,
        index_kpool=4,
        index_head_dim=8,
        index_n_heads=2,
        hc_mult=2,
        linear_lower_bound=lower_bound,
    )


def glm5_next(hv_ratio=1):
    """Multimodal, with GLM-5-Next's default decay lower bound (-5)."""
    _no_gqa(hv_ratio)
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=32,
        patch_size=4,
        projection_intermediate_size=32,
    )
    cfg = tr.Glm5NextConfig(text_config=_glm5_text(-5.0), vision_config=vision)
    return tr.Glm5NextForConditionalGeneration(cfg)


def glm5_next_text(hv_ratio=1):
    """The bare text model, without the lower bound (the softplus decay, as Kimi Linear)."""
    _no_gqa(hv_ratio)
    return tr.Glm5NextTextModel(tr.Glm5NextTextConfig(**_glm5_text(None)))


def bailing_hybrid(hv_ratio=1, safe_gate=True):
    _no_gqa(hv_ratio)
    # Bailing reads the KDA sizes from head_dim / num_attention_heads and then sets head_dim =
    # qk_rope_head_dim: keep them equal so a saved config reloads to the same sizes.
    cfg = tr.BailingHybridConfig(
        **_KDA_COMMON,
        head_dim=8,
        short_conv_kernel_size=4,
        num_local_experts=4,
        first_k_dense_replace=1,
        kda_safe_gate=safe_gate,
    )
    return tr.BailingHybridForCausalLM(cfg)


# id -> (builder, the transformers config class it needs). A family absent from the installed
# release (LaraMini before 5.24, Qwen4-Exp before 5.20) is absent from MODELS, so every
# parametrised test simply skips it.
_ALL = {
    "qwen3_next": (qwen3_next, "Qwen3NextConfig"),
    "qwen3_5": (qwen3_5, "Qwen3_5TextConfig"),
    "qwen3_5_vl": (qwen3_5_vl, "Qwen3_5Config"),
    "qwen3_5_moe": (qwen3_5_moe, "Qwen3_5MoeTextConfig"),
    "olmo_hybrid": (olmo_hybrid, "OlmoHybridConfig"),
    "lara_mini": (lara_mini, "LaraMiniConfig"),
    "qwen4_exp": (qwen4_exp, "Qwen4ExpTextConfig"),
    "kimi_linear": (kimi_linear, "KimiLinearConfig"),
    "glm5_next": (glm5_next, "Glm5NextConfig"),
    "bailing_hybrid": (bailing_hybrid, "BailingHybridConfig"),
}


def _available(config_name: str) -> bool:
    try:
        return getattr(tr, config_name) is not None
    except (AttributeError, ImportError):
        return False


def _served(config_name: str) -> bool:
    """False where the release has a family of this config's model in a layout `patch` refuses
    (OLMo-Hybrid's three convs before 5.15: test_core's refusal test covers it). The families
    are the registry's, found by the config's model package."""
    package = getattr(tr, config_name).__module__.rpartition(".")[0] + "."
    return all(unserved(f) is None for f in FAMILIES if any(mod.startswith(package) for mod, _ in f.classes))


MODELS = {k: fn for k, (fn, cfg) in _ALL.items() if _available(cfg) and _served(cfg)}
if not MODELS:  # one line at collection, not a StopIteration further down
    from gdn_intervene._compat import install_hint

    raise RuntimeError(f"transformers {tr.__version__} has no GDN family gdn_intervene serves ({install_hint()})")
KDA = tuple(n for n in ("kimi_linear", "glm5_next", "bailing_hybrid") if n in MODELS)  # (+ glm5_next_text: test_kda.py)
GQA = tuple(n for n in MODELS if n not in KDA)  # families whose builders take hv_ratio 2
BUILDERS = dict(MODELS, **({"glm5_next_text": glm5_next_text} if _available("Glm5NextTextConfig") else {}))


def build(name: str, *, hv_ratio: int | None = None, dtype=torch.float32, seed: int = 0):
    """hv_ratio defaults to 2 where the family has GQA, else 1."""
    if hv_ratio is None:
        hv_ratio = 2 if name in GQA else 1
    torch.manual_seed(seed)
    model = BUILDERS[name](hv_ratio).to(dtype).eval()
    # HF initialises A_log/dt_bias in a narrow range (GLM-5-Next's bounded gate: A_log = 0);
    # spread them so decays differ per head and, for KDA, per channel. KDA's dt_bias is per
    # channel, and with GLM-5-Next's bound (g = -5 sigmoid(...)) dt_bias near 0 would forget
    # everything within a few tokens: its range [-4, 0] gives slow and fast channels per head.
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "A_log") and hasattr(m, "dt_bias"):
                kda = m.dt_bias.numel() != m.A_log.numel()
                m.A_log.copy_(torch.linspace(-1.0, 1.0, m.A_log.numel()).view_as(m.A_log))
                lo, hi = (-4.0, 0.0) if kda else (-0.5, 0.5)
                m.dt_bias.copy_(torch.linspace(lo, hi, m.dt_bias.numel()).view_as(m.dt_bias))
    return model


def present(*names: str) -> list[str]:
    """Those of `names` this transformers release has (and serves), for parametrising."""
    return [n for n in names if n in BUILDERS]


def pick(*names: str) -> str:
    """The first of `names` this transformers release has (tests that need one family of a kind)."""
    return next((n for n in names if n in MODELS), next(iter(MODELS)))


# One GDN family every supported release has: Qwen3.5 (5.2 on), else Qwen3-Next (4.57-5.1).
ANY_GDN = pick("qwen3_5", "qwen3_next")
