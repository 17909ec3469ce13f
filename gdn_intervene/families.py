"""GDN module families: each layout as data, plus the one function per layout that maps
the layer input to the pre-conv q, k, v and the gate/beta/decay inputs z, b, a.

A family is detected once, at patch time, from the module's class; the forward never asks
`hasattr`. Adding a family that follows a known layout is one `Family(...)` line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import nn

from .sites import Mixer

__all__ = ["Family", "FAMILIES", "UNSUPPORTED", "Projected", "family_for", "family_of", "supported_class_names"]


class Projected(NamedTuple):
    """Per-head projections of one call, before the causal conv.

    q, k: [B, T, HK, K]; v, z: [B, T, HV, V]; b, a: [B, T, HV].
    qkv: [B, T, C] when q, k, v are slices of one concatenated projection (so the conv
    input needs no copy while nobody replaces them), else None.

    Every value is a slice or a reshape, never an output of `torch.split`: autograd forbids
    in-place edits of split's views, and users edit sites in place.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    z: torch.Tensor
    b: torch.Tensor
    a: torch.Tensor
    qkv: torch.Tensor | None


def _slices(x: torch.Tensor, sizes: list[int], dim: int) -> list[torch.Tensor]:
    """`torch.split(x, sizes, dim)` as plain slices (same memory, same numbers)."""
    out, start = [], 0
    for n in sizes:
        out.append(x.narrow(dim, start, n))
        start += n
    return out


def _project_fused_qkvz(m: nn.Module, x: torch.Tensor) -> Projected:
    # Qwen3-Next interleaves q, k, v, z per key-head group: HF's fix_query_key_value_ordering,
    # with slices for its torch.split.
    B, T, _ = x.shape
    HK, r = m.num_k_heads, m.num_v_heads // m.num_k_heads
    qkvz = m.in_proj_qkvz(x).view(B, T, HK, 2 * m.head_k_dim + 2 * r * m.head_v_dim)
    ba = m.in_proj_ba(x).view(B, T, HK, 2 * r)
    q, k, v, z = _slices(qkvz, [m.head_k_dim, m.head_k_dim, r * m.head_v_dim, r * m.head_v_dim], 3)
    b, a = _slices(ba, [r, r], 3)
    return Projected(
        q,
        k,
        v.reshape(B, T, -1, m.head_v_dim),
        z.reshape(B, T, -1, m.head_v_dim),
        b.reshape(B, T, m.num_v_heads),
        a.reshape(B, T, m.num_v_heads),
        None,
    )


def _project_split_qkv(m: nn.Module, x: torch.Tensor) -> Projected:
    B, T, _ = x.shape
    qkv = m.in_proj_qkv(x)
    q, k, v = _slices(qkv, [m.key_dim, m.key_dim, m.value_dim], -1)
    return Projected(
        q.view(B, T, -1, m.head_k_dim),
        k.view(B, T, -1, m.head_k_dim),
        v.view(B, T, -1, m.head_v_dim),
        m.in_proj_z(x).reshape(B, T, -1, m.head_v_dim),
        m.in_proj_b(x),
        m.in_proj_a(x),
        qkv,
    )


def _project_separate(m: nn.Module, x: torch.Tensor) -> Projected:
    B, T, _ = x.shape
    # HF's call order (q, k, v, b, a, g): autograd sums the input gradient in reverse call
    # order, so another order changes the gradient's last bits.
    q, k, v = (m.q_proj(x), m.k_proj(x), m.v_proj(x))
    b, a, z = m.b_proj(x), m.a_proj(x), m.g_proj(x)
    return Projected(
        q.view(B, T, -1, m.head_k_dim),
        k.view(B, T, -1, m.head_k_dim),
        v.view(B, T, -1, m.head_v_dim),
        z.view(B, T, -1, m.head_v_dim),
        b,
        a,
        None,
    )


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
    mixer: the decay's form (`Mixer.GDN`: per head); sites' shapes depend on it.
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
        hf_names={"norm": "o_norm", "out_proj": "o_proj"},
        neg_eigval_attr="allow_neg_eigval",
        conv_trims_always=True,
    ),
)

# GDN-like classes of the pinned transformers release that we deliberately do not patch.
# (class name -> reason). The registry test fails when a new one appears unlisted.
UNSUPPORTED: dict[str, str] = {}


def supported_class_names() -> tuple[str, ...]:
    return tuple(name for f in FAMILIES for _, name in f.classes)


_BY_CLASS_NAME = {(mod, name): f for f in FAMILIES for mod, name in f.classes}


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
