"""Tiny random models of every supported family, built from configs in code (no downloads).

`MODELS` maps an id to a builder; tests parametrise over it. Sizes are small but keep the
structure: two GDN layers around one full-attention layer, GQA in the GDN heads
(HV = `hv_ratio` x HK), head dims that are not all equal.
"""

from __future__ import annotations

import torch
import transformers as tr

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
    indexer = dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=16, indexer_compress_ratio=4)
    cfg = tr.Qwen4ExpTextConfig(**_COMMON, **_linear(hv_ratio), **_MOE, **extra, **indexer, head_dim=16)
    return tr.Qwen4ExpForCausalLM(cfg)


MODELS = {
    "qwen3_next": qwen3_next,
    "qwen3_5": qwen3_5,
    "qwen3_5_vl": qwen3_5_vl,
    "qwen3_5_moe": qwen3_5_moe,
    "olmo_hybrid": olmo_hybrid,
    "lara_mini": lara_mini,
    "qwen4_exp": qwen4_exp,
}


def build(name: str, *, hv_ratio: int = 2, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    model = MODELS[name](hv_ratio).to(dtype).eval()
    # HF initialises A_log/dt_bias in a narrow range; spread them so decays differ per head.
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "A_log") and hasattr(m, "dt_bias"):
                m.A_log.copy_(torch.linspace(-1.0, 1.0, m.A_log.numel()))
                m.dt_bias.copy_(torch.linspace(-0.5, 0.5, m.dt_bias.numel()))
    return model
