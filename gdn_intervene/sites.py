"""The site registry: every hook point of a patched GDN layer, in execution order.

One tuple, `SITES`, drives the README table, the pyvene component mapping and the test
parametrisation. Shape letters: B batch, T tokens of this call, HK key heads, HV value heads,
K key head dim, V value head dim, C = 2*HK*K + HV*V conv channels, D model width.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Site", "SITES", "SITE_NAMES", "TAP_SITES", "site"]


@dataclass(frozen=True)
class Site:
    """One hook point under `linear_attn`.

    name:  attribute name on every patched GDN module (for HF-owned modules, the canonical
           name; `Family.hf_names` maps it to the family's attribute, e.g. norm -> o_norm).
    shape: shape letters of the module's output.
    meaning: one line for the docs.
    head_axis: axis of the output that indexes heads (None: no head axis).
    heads: "HK" or "HV", which head count `head_axis` counts.
    owner: "ours" (a parameter-free module this library adds) or "hf" (HF's own module).
    """

    name: str
    shape: str
    meaning: str
    head_axis: int | None = None
    heads: str | None = None
    owner: str = "ours"

    @property
    def ndim(self) -> int:
        return len(self.shape.strip("[]").split(","))


SITES: tuple[Site, ...] = (
    Site("q_pre_conv", "[B, T, HK, K]", "query projection per head, before the causal conv", 2, "HK"),
    Site("k_pre_conv", "[B, T, HK, K]", "key projection per head, before the causal conv", 2, "HK"),
    Site("v_pre_conv", "[B, T, HV, V]", "value projection per head, before the causal conv", 2, "HV"),
    Site("conv", "[B, T, C]", "causal depthwise conv + SiLU over concatenated q, k, v (reads/writes the conv cache)"),
    Site("q", "[B, T, HK, K]", "query after the conv, before L2 norm, scaling and GQA expansion", 2, "HK"),
    Site("k", "[B, T, HK, K]", "key after the conv, before L2 norm and GQA expansion", 2, "HK"),
    Site("v", "[B, T, HV, V]", "value after the conv", 2, "HV"),
    Site("beta_logit", "[B, T, HV]", "write strength before the sigmoid", 2, "HV"),
    Site("beta", "[B, T, HV]", "write strength the recurrence uses: sigmoid (x2 where negative eigenvalues are allowed)", 2, "HV"),
    Site("decay_logit", "[B, T, HV]", "decay input a, before softplus", 2, "HV"),
    Site("decay", "[B, T, HV]", "log decay g = -exp(A_log) * softplus(a + dt_bias); g <= 0, decay = exp(g)", 2, "HV"),
    Site("state", "[B, HV, K, V]", "recurrent state after this call (or after each split, see state_at); written to the cache", 1, "HV"),
    Site("recurrence", "[B, T, HV, V]", "delta-rule output o (chunk kernel in prefill, recurrent kernel in decode)", 2, "HV"),
    Site("gate", "[B, T, HV, V]", "output gate z, before SiLU", 2, "HV"),
    Site("norm", "[B, T, HV, V]", "gated RMSNorm output (HF's module, called on 4-D input)", 2, "HV", owner="hf"),
    Site("out_proj", "[B, T, D]", "layer output (HF's module)", owner="hf"),
)

SITE_NAMES: tuple[str, ...] = tuple(s.name for s in SITES)
TAP_SITES: tuple[Site, ...] = tuple(s for s in SITES if s.owner == "ours")
_BY_NAME = {s.name: s for s in SITES}


def site(name: str) -> Site:
    """The `Site` called `name`; a clear error listing the sites otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown site {name!r}; sites are: {', '.join(SITE_NAMES)}") from None
