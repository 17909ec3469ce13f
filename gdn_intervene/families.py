"""GDN module families: each layout as data, plus the one function per layout that maps
the layer input to the pre-conv q, k, v and the gate/beta/decay inputs z, b, a.

Two mixers share one forward (`layer.GDNMixin.forward`):
- `Mixer.GDN`, Gated DeltaNet: one log decay per head and token, g [B, T, HV]; GQA (HV >= HK);
  z, b, a come out of the projections with q, k, v; gated RMSNorm with SiLU.
- `Mixer.KDA`, Kimi Delta Attention (Kimi Linear, GLM-5-Next, Bailing hybrid): one log decay
  per key channel, g [B, T, HV, K], from a `forget_gate` submodule (low-rank
  `f_a_proj -> f_b_proj`, or one `f_proj`; `dt_bias`, `A_log`; optionally
  `lower_bound * sigmoid(...)` instead of the softplus); HK = HV, K = V; b and a are projected
  after the conv and z (low-rank `g_a_proj -> g_b_proj`, or `g_proj`) after the recurrence, in
  HF's call order (autograd sums the input gradient in reverse call order); gated RMSNorm with
  a sigmoid; the module sits at the decoder layer's `self_attn`.

A family is detected once, at patch time, from the module's class; the forward never asks
`hasattr`. Adding a family that follows a known layout is one `Family(...)` line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .sites import Mixer

__all__ = [
    "Family",
    "FAMILIES",
    "UNSUPPORTED",
    "Projected",
    "cut_qkv",
    "family_for",
    "family_of",
    "supported_class_names",
    "unserved",
]


class Projected(NamedTuple):
    """Per-head projections of one call, before the causal conv.

    q, k: [B, T, HK, K]; v, z: [B, T, HV, V]; b, a: [B, T, HV].
    qkv: [B, T, C] when q, k, v are slices of one concatenated projection (so the conv
    input needs no copy while nobody replaces them), else None; q, k, v are then None until
    `cut_qkv` cuts them, which the layer does only for a listener.
    z, b, a are None for families that project them later (`Family.late_gates`, `late_z`).

    Every value is a slice or a reshape, never an output of `torch.split`: autograd forbids
    in-place edits of split's views, and users edit sites in place.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    z: torch.Tensor | None
    b: torch.Tensor | None
    a: torch.Tensor | None
    qkv: torch.Tensor | None


def _slices(x: torch.Tensor, sizes: list[int], dim: int) -> list[torch.Tensor]:
    """`torch.split(x, sizes, dim)` as plain slices (same memory, same numbers)."""
    out, start = [], 0
    for n in sizes:
        out.append(x.narrow(dim, start, n))
        start += n
    return out


def _project_fused_qkvz(m: nn.Module, x: torch.Tensor) -> Projected:
    # Qwen3-Next interleaves q, k, v, z per key-head group (HF's fix_query_key_value_ordering,
    # with slices for its torch.split): [q_h, k_h, v_h1..v_hr, z_h1..z_hr] for each key head h.
    # Views, not einops: this runs in every decode step, where einops' ~10 us per call adds up.
    B, T, _ = x.shape
    HK, r = m.num_k_heads, m.num_v_heads // m.num_k_heads
    qkvz = m.in_proj_qkvz(x).view(B, T, HK, -1)  # b t (h d) -> b t h d
    ba = m.in_proj_ba(x).view(B, T, HK, 2 * r)
    q, k, v, z = _slices(qkvz, [m.head_k_dim, m.head_k_dim, r * m.head_v_dim, r * m.head_v_dim], 3)
    b, a = _slices(ba, [r, r], 3)
    v, z = (t.reshape(B, T, HK * r, m.head_v_dim) for t in (v, z))  # b t h (r d) -> b t (h r) d: [B, T, HV, V]
    b, a = (t.reshape(B, T, HK * r) for t in (b, a))  # b t h r -> b t (h r): [B, T, HV]
    return Projected(q, k, v, z, b, a, None)


def _project_split_qkv(m: nn.Module, x: torch.Tensor) -> Projected:
    B, T, _ = x.shape
    qkv = m.in_proj_qkv(x)
    return Projected(
        None, None, None, m.in_proj_z(x).reshape(B, T, -1, m.head_v_dim), m.in_proj_b(x), m.in_proj_a(x), qkv
    )


def cut_qkv(m: nn.Module, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [B, T, HK, K], k [B, T, HK, K], v [B, T, HV, V]): slices of a fused projection [B, T, C]."""
    B, T, _ = qkv.shape
    q, k, v = _slices(qkv, [m.key_dim, m.key_dim, m.value_dim], -1)
    # b t (h d) -> b t h d, as views (every decode step: no einops call overhead)
    return q.view(B, T, -1, m.head_k_dim), k.view(B, T, -1, m.head_k_dim), v.view(B, T, -1, m.head_v_dim)


def _project_separate(m: nn.Module, x: torch.Tensor) -> Projected:
    # HF's call order: q, k, v here, b and a after the conv (`_gates_separate`), g after the
    # recurrence (`_z_separate`). Autograd sums the input gradient in reverse call order, so
    # another order changes its last bits; projecting g up front held it through the kernel.
    B, T, _ = x.shape
    q, k, v = (m.q_proj(x), m.k_proj(x), m.v_proj(x))
    return Projected(
        q.view(B, T, -1, m.head_k_dim),
        k.view(B, T, -1, m.head_k_dim),
        v.view(B, T, -1, m.head_v_dim),
        None,
        None,
        None,
        None,
    )


def _gates_separate(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OLMo-Hybrid: (b [B, T, HV], a [B, T, HV])."""
    return m.b_proj(x), m.a_proj(x)


def _z_separate(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    return m.g_proj(x).view(B, T, -1, m.head_v_dim)


def _project_kda(m: nn.Module, x: torch.Tensor) -> Projected:
    B, T, _ = x.shape
    q, k, v = m.q_proj(x), m.k_proj(x), m.v_proj(x)
    K = m.head_dim
    return Projected(q.view(B, T, -1, K), k.view(B, T, -1, K), v.view(B, T, -1, K), None, None, None, None)


def _gates_kda_lowrank(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kimi Linear, GLM-5-Next: (b [B, T, HV], a [B, T, HV, K]), the forget gate first, as in HF."""
    B, T, _ = x.shape
    fg = m.forget_gate
    a = fg.f_b_proj(fg.f_a_proj(x)).view(B, T, -1, m.head_dim)
    return m.b_proj(x), a


def _gates_kda_full(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bailing hybrid: a full-rank `forget_gate.f_proj`."""
    B, T, _ = x.shape
    a = m.forget_gate.f_proj(x).view(B, T, -1, m.head_dim)
    return m.b_proj(x), a


def _z_kda_lowrank(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    return m.g_b_proj(m.g_a_proj(x)).view(B, T, -1, m.head_dim)


def _z_kda_full(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    return m.g_proj(x).view(B, T, -1, m.head_dim)


def _decay_gdn(m: nn.Module, a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, HV] -> g = -exp(A_log) * softplus(a + dt_bias), fp32 (HF's expression)."""
    return -m.A_log.float().exp() * F.softplus(a.float() + m.dt_bias)


def _decay_kda_fla(m: nn.Module, a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Kimi Linear, GLM-5-Next: a [B, T, HV, K] -> fp32 g, per channel (HF's expressions).

    g = lower_bound * sigmoid(exp(A_log) * (a + dt_bias)) when the forget gate has a
    `safe_gate_lower_bound` (GLM-5-Next's default, -5), else -exp(A_log) * softplus(a + dt_bias)
    with HF's overflow-safe softplus (`x` above 20)."""
    fg = m.forget_gate
    # HF adds dt_bias on [B, T, HV*K], then views: the same layout keeps dt_bias's gradient
    # (a sum over B and T) bitwise.
    g = (a.float().flatten(2) + fg.dt_bias.float().view(1, 1, -1)).view(a.shape)
    rate = torch.exp(fg.A_log.float().view(1, 1, -1, 1))
    bound = getattr(fg, "safe_gate_lower_bound", None)
    if bound is not None:
        return bound * torch.sigmoid(rate * g)
    return -rate * torch.where(g > 20.0, g, torch.log(1.0 + torch.exp(g)))


def _decay_kda_bailing(m: nn.Module, a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bailing hybrid: as `_decay_kda_fla`, bounded by `kda_lower_bound` when `kda_safe_gate`,
    else torch's softplus; cast to the layer input's dtype (HF's expressions)."""
    fg = m.forget_gate
    g = a.float() + fg.dt_bias.view(1, 1, *a.shape[2:])
    rate = fg.A_log.exp().view(1, 1, -1, 1)
    gate = fg.lower_bound * torch.sigmoid(rate * g) if fg.safe_gate else -rate * F.softplus(g)
    return gate.to(dtype)


def _dims_gdn(m: nn.Module) -> tuple[int, int, int, int]:
    return m.key_dim, m.value_dim, m.head_k_dim, m.head_v_dim


def _dims_kda(m: nn.Module) -> tuple[int, int, int, int]:
    return m.qkv_dim, m.qkv_dim, m.head_dim, m.head_dim


_GDN_CONFIG = {
    "HK": "linear_num_key_heads",
    "HV": "linear_num_value_heads",
    "K": "linear_key_head_dim",
    "V": "linear_value_head_dim",
}
_KDA_CONFIG = {"HK": "linear_num_heads", "HV": "linear_num_heads", "K": "linear_head_dim", "V": "linear_head_dim"}
GDN_KERNELS = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")
KDA_KERNELS = ("chunk_kimi_delta_attention", "recurrent_kimi_delta_attention")


@dataclass(frozen=True)
class Family:
    """One GDN layout.

    classes: (transformers module path, class name) of every HF class with this layout.
    projections: HF's projection submodules, in call order.
    hf_names: canonical site name -> this family's attribute, for HF-owned sites.
    neg_eigval_attr: module attribute that, when true, doubles beta (beta in [0, 2]).
    conv_trims_always: HF slices the conv output to the last T positions on every call (not
        only with a cache). A no-op on the values, but it changes the layout autograd hands the
        conv's backward, so gradients are bitwise only if we do the same.
    mixer: the decay's form (`Mixer.GDN`: per head; `Mixer.KDA`: per key channel); sites'
        shapes depend on it.
    late_gates: (m, x) -> (b, a), projected after the conv (None: `project` returns them).
    late_z: (m, x) -> z, projected after the recurrence (None: `project` returns it).
    decay: (m, a, input dtype) -> g, the log decay (<= 0) the kernel takes.
    dims: m -> (key_dim, value_dim, head_k_dim, head_v_dim), the module's sizes.
    config: shape letter -> (text) config field, for HK, HV, K, V (`letters`).
    kernels: names of the (chunk, recurrent) kernels in the modeling module's namespace.
    parent: attribute of the decoder layer that holds the module.
    conv_asks_recording: HF's decode step runs the conv-update kernel only while the cache does
        not record past states (`is_recording_past`); the KDA forwards do not ask.
    packed_kwarg: the kernels take packed-sequence offsets as `cu_seqlens` (popped from
        `cu_seq_lens_q`), as the GDN forwards pass them; False: kwargs go on unchanged (KDA).
    state_fp32: the state is cast to fp32 before it is written to the cache (KDA).
    accelerate_children: children whose accelerate hooks the forward fires by hand (their
        weights are read without calling them).
    layout_since: the first transformers release whose class has this layout, where older
        releases have the class with another one (`layout_attrs` tells them apart).
    notes: one line for the docs' family table.
    """

    name: str
    layout: str
    classes: tuple[tuple[str, str], ...]
    projections: tuple[str, ...]
    project: Callable[[nn.Module, torch.Tensor], Projected]
    hf_names: dict[str, str] = field(default_factory=lambda: {"norm": "norm", "out_proj": "out_proj"})
    neg_eigval_attr: str | None = None
    conv_trims_always: bool = False
    mixer: Mixer = Mixer.GDN
    late_gates: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    late_z: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    decay: Callable[[nn.Module, torch.Tensor, torch.dtype], torch.Tensor] = _decay_gdn
    dims: Callable[[nn.Module], tuple[int, int, int, int]] = _dims_gdn
    config: dict[str, str] = field(default_factory=lambda: dict(_GDN_CONFIG))
    kernels: tuple[str, str] = GDN_KERNELS
    parent: str = "linear_attn"
    conv_asks_recording: bool = True
    packed_kwarg: bool = True
    state_fp32: bool = False
    accelerate_children: tuple[str, ...] = ("conv1d",)
    layout_since: str | None = None
    notes: str = ""

    @property
    def layout_attrs(self) -> tuple[str, ...]:
        """The submodules the decomposed forward reads: the projections' and the conv's."""
        return tuple(dict.fromkeys(p.split(".")[0] for p in (*self.projections, *self.accelerate_children)))

    def letters(self, config) -> dict[str, int]:
        """Shape letter -> size from the (text) config: HK, HV, K, V, D and C = 2*HK*K + HV*V."""
        n = {x: getattr(config, f) for x, f in self.config.items()}
        return dict(n, D=config.hidden_size, C=2 * n["HK"] * n["K"] + n["HV"] * n["V"])


_M = "transformers.models."
FAMILIES: tuple[Family, ...] = (
    Family(
        "qwen3_next",
        "fused_qkvz",
        ((_M + "qwen3_next.modeling_qwen3_next", "Qwen3NextGatedDeltaNet"),),
        ("in_proj_qkvz", "in_proj_ba"),
        _project_fused_qkvz,
    ),
    Family(
        "qwen3_5",
        "split_qkv",
        (
            (_M + "qwen3_5.modeling_qwen3_5", "Qwen3_5GatedDeltaNet"),
            (_M + "qwen3_5_moe.modeling_qwen3_5_moe", "Qwen3_5MoeGatedDeltaNet"),
            (_M + "qwen4_exp.modeling_qwen4_exp", "Qwen4ExpTextGatedDeltaNet"),
            (_M + "lara_mini.modeling_lara_mini", "LaraMiniGatedDeltaNet"),
        ),
        ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),
        _project_split_qkv,
    ),
    Family(
        "olmo_hybrid",
        "separate",
        ((_M + "olmo_hybrid.modeling_olmo_hybrid", "OlmoHybridGatedDeltaNet"),),
        ("q_proj", "k_proj", "v_proj", "b_proj", "a_proj", "g_proj"),
        _project_separate,
        late_gates=_gates_separate,
        late_z=_z_separate,
        hf_names={"norm": "o_norm", "out_proj": "o_proj"},
        neg_eigval_attr="allow_neg_eigval",
        conv_trims_always=True,
        layout_since="5.15.0",  # 5.3-5.14: three short convs (q_conv1d, k_conv1d, v_conv1d)
    ),
)
_KDA = dict(
    hf_names={"norm": "o_norm", "out_proj": "o_proj"},
    mixer=Mixer.KDA,
    dims=_dims_kda,
    config=_KDA_CONFIG,
    kernels=KDA_KERNELS,
    parent="self_attn",
    conv_asks_recording=False,
    packed_kwarg=False,
    state_fp32=True,
    accelerate_children=("conv1d", "forget_gate"),  # forget_gate holds dt_bias and A_log
)
FAMILIES += (
    Family(
        "kimi_linear",
        "kda_lowrank",
        (
            (_M + "kimi_linear.modeling_kimi_linear", "KimiLinearDeltaAttention"),
            (_M + "glm5_next.modeling_glm5_next", "Glm5NextTextLinearAttention"),
        ),
        (
            "q_proj",
            "k_proj",
            "v_proj",
            "forget_gate.f_a_proj",
            "forget_gate.f_b_proj",
            "b_proj",
            "g_a_proj",
            "g_b_proj",
        ),
        _project_kda,
        late_gates=_gates_kda_lowrank,
        late_z=_z_kda_lowrank,
        decay=_decay_kda_fla,
        conv_trims_always=True,
        notes="decay per channel; bounded (`lower_bound * sigmoid`) when the config sets `linear_lower_bound` "
        "(GLM-5-Next, default -5), else softplus (Kimi Linear)",
        **_KDA,
    ),
    Family(
        "bailing_hybrid",
        "kda_full",
        ((_M + "bailing_hybrid.modeling_bailing_hybrid", "BailingHybridDeltaAttention"),),
        ("q_proj", "k_proj", "v_proj", "forget_gate.f_proj", "b_proj", "g_proj"),
        _project_kda,
        late_gates=_gates_kda_full,
        late_z=_z_kda_full,
        decay=_decay_kda_bailing,
        notes="decay per channel; bounded by `kda_lower_bound` when `kda_safe_gate` (default), else softplus; "
        "cast to the input dtype",
        **_KDA,
    ),
)

# GDN-like classes of the pinned transformers release that we deliberately do not patch.
# (class name -> reason). The registry test fails when a new one appears unlisted.
UNSUPPORTED: dict[str, str] = {}


def supported_class_names() -> tuple[str, ...]:
    return tuple(name for f in FAMILIES for _, name in f.classes)


_BY_CLASS_NAME = {(mod, name): f for f in FAMILIES for mod, name in f.classes}


def unserved(fam: Family) -> str | None:
    """Why the installed transformers release has `fam`'s classes in a layout we do not serve
    (`_compat.layout_gap`), or None (served, or absent from the release)."""
    from . import _compat

    for mod, name in fam.classes:
        module = _compat.modeling_module(mod)
        cls = getattr(module, name, None) if module is not None else None
        if cls is not None and (gap := _compat.layout_gap(cls, fam.layout_attrs, fam.layout_since)):
            return gap
    return None


def family_of(cls: type) -> Family | None:
    """The family of exactly this HF GDN class (matched by defining module and name), or None."""
    return _BY_CLASS_NAME.get((cls.__module__, cls.__name__))


def family_for(cls: type) -> tuple[Family, type] | None:
    """(family, HF base class) of `cls` or of its nearest HF GDN ancestor (a patched class,
    a user subclass), or None. The one MRO walk everything else uses."""
    for c in cls.__mro__:
        if (fam := family_of(c)) is not None:
            return fam, c
    return None
