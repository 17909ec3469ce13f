"""The site registry: every hook point of a patched GDN layer, in execution order.

`SITES` holds every per-site fact; the README table, the pyvene components and widths, the
capture object and the test parametrisation read it. Shape letters: B batch, T tokens of this
call, HK key heads, HV value heads, K key head dim, V value head dim, C = 2*HK*K + HV*V conv
channels, D model width.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "Owner",
    "Fires",
    "Mixer",
    "Site",
    "SITES",
    "SITE_NAMES",
    "TAP_SITES",
    "TRACE_SITES",
    "StateFiring",
    "site",
    "state_firings",
]

HEAD_LETTERS = ("HK", "HV")


class Owner(enum.Enum):
    OURS = "ours"  # a parameter-free module this library adds
    HF = "hf"  # HF's own module (the gated norm, the output projection)


class Fires(enum.Enum):
    PER_CALL = "once per forward call"
    PER_SPLIT = (
        "once per state the call keeps: the final one; inside state_at, after each listed position, then "
        "the final one if it is not listed; outside state_at, where the cache keeps N intermediate states "
        "(transformers 5.25 on: assisted generation and prompt lookup), after each of the last N positions "
        "(see state_firings)"
    )


class Mixer(enum.Enum):
    """What the token mixer's decay looks like; sites whose shape depends on it say so."""

    GDN = "gdn"  # one log decay per value head: g [B, T, HV]
    KDA = "kda"  # Kimi Delta Attention: one log decay per key channel: g [B, T, HV, K]


@dataclass(frozen=True)
class Site:
    """One hook point under `linear_attn`.

    name: attribute on every patched GDN module (for HF-owned modules the canonical name;
        `Family.hf_names` maps it to the family's attribute, e.g. norm -> o_norm).
    shape: letters of the output's axes, for GDN; `shapes` overrides it per `Mixer`.
    owner: `Owner.OURS` or `Owner.HF`.  fires: how often the site fires per forward call.
    saved_by_producer: the op that produces the value keeps it for its own backward (the
        recurrent kernel reads its final state for its output), so a listened value is a copy
        under autograd and an in-place edit stays legal.
    """

    name: str
    shape: tuple[str, ...]
    meaning: str
    owner: Owner = Owner.OURS
    fires: Fires = Fires.PER_CALL
    shapes: Mapping[Mixer, tuple[str, ...]] = field(default_factory=dict)
    saved_by_producer: bool = False

    def shape_for(self, mixer: Mixer = Mixer.GDN) -> tuple[str, ...]:
        return self.shapes.get(mixer, self.shape)

    @property
    def head_axis(self) -> int | None:
        """Axis of the output that indexes heads (derived from the shape), or None."""
        return next((i for i, x in enumerate(self.shape) if x in HEAD_LETTERS), None)

    @property
    def heads(self) -> str | None:
        """ "HK" or "HV": which head count `head_axis` counts."""
        return None if self.head_axis is None else self.shape[self.head_axis]

    @property
    def has_time(self) -> bool:
        """Whether the output has a T axis (axis 1); the state has none."""
        return "T" in self.shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def shape_str(self, mixer: Mixer = Mixer.GDN) -> str:
        return "[" + ", ".join(self.shape_for(mixer)) + "]"


_KDA_DECAY = {Mixer.KDA: ("B", "T", "HV", "K")}

SITES: tuple[Site, ...] = (
    Site("q_pre_conv", ("B", "T", "HK", "K"), "query projection per head, before the causal conv"),
    Site("k_pre_conv", ("B", "T", "HK", "K"), "key projection per head, before the causal conv"),
    Site("v_pre_conv", ("B", "T", "HV", "V"), "value projection per head, before the causal conv"),
    Site(
        "conv", ("B", "T", "C"), "causal depthwise conv + SiLU over concatenated q, k, v (reads/writes the conv cache)"
    ),
    Site("q", ("B", "T", "HK", "K"), "query after the conv, before L2 norm, scaling and GQA expansion"),
    Site("k", ("B", "T", "HK", "K"), "key after the conv, before L2 norm and GQA expansion"),
    Site("v", ("B", "T", "HV", "V"), "value after the conv"),
    Site("beta_logit", ("B", "T", "HV"), "write strength before the sigmoid"),
    Site(
        "beta",
        ("B", "T", "HV"),
        "write strength the recurrence uses: sigmoid (x2 where negative eigenvalues are allowed)",
    ),
    Site(
        "decay_logit",
        ("B", "T", "HV"),
        "decay input a, before softplus (KDA: per key channel, the forget gate's projection before dt_bias)",
        shapes=_KDA_DECAY,
    ),
    Site(
        "decay",
        ("B", "T", "HV"),
        "log decay g = -exp(A_log) * softplus(a + dt_bias); g <= 0, decay = exp(g) "
        "(KDA: per key channel; bounded families: lower_bound * sigmoid(exp(A_log) * (a + dt_bias)))",
        shapes=_KDA_DECAY,
    ),
    Site(
        "state",
        ("B", "HV", "K", "V"),
        "recurrent state after this call (or after each split, see state_at, and each kept intermediate "
        "state); written to the cache",
        fires=Fires.PER_SPLIT,
        saved_by_producer=True,
    ),
    Site(
        "recurrence", ("B", "T", "HV", "V"), "delta-rule output o (chunk kernel in prefill, recurrent kernel in decode)"
    ),
    Site("gate", ("B", "T", "HV", "V"), "output gate z, before SiLU (KDA: before the sigmoid)"),
    Site("norm", ("B", "T", "HV", "V"), "gated RMSNorm output (HF's module, called on 4-D input)", owner=Owner.HF),
    Site("out_proj", ("B", "T", "D"), "layer output (HF's module)", owner=Owner.HF),
)

SITE_NAMES: tuple[str, ...] = tuple(s.name for s in SITES)
TAP_SITES: tuple[Site, ...] = tuple(s for s in SITES if s.owner is Owner.OURS)
# The default sites of a causal trace: one per stage of the layer (write key, value, gates,
# state, read-out, output).
TRACE_SITES: tuple[str, ...] = ("k", "v", "beta", "decay", "state", "recurrence", "out_proj")
_BY_NAME = {s.name: s for s in SITES}


def site(name: str) -> Site:
    """The `Site` called `name`; a clear error listing the sites otherwise."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown site {name!r}; sites are: {', '.join(SITE_NAMES)}") from None


class StateFiring(NamedTuple):
    """One firing of the `state` site in a layer call: the state after token `position` of the
    call (0-based, T - 1 for the final state); `final`: the call's last state (the one a decode
    step or a plain prefill writes to the cache)."""

    position: int
    final: bool


def state_firings(
    T: int, *, positions: Sequence[int] = (), keep: int = 0, decode: bool = False
) -> tuple[StateFiring, ...]:
    """The rule of when the `state` site fires in one layer call of T tokens, in firing order;
    every tool that reads or edits the state asks it (`GDNLayer.state_firings`, captures).

    - a cached decode step (`decode`: the recurrent kernel on one token): once, its state;
    - `positions` (inside `gdn_intervene.state_at`, each in [0, T)): after each listed
      position, then the final state unless T - 1 is listed; intermediate states the cache keeps
      (`keep`) fire only where listed;
    - else, where the cache keeps `keep` = N > 0 intermediate states (5.25 on: assisted
      generation, prompt lookup): after each of the last N positions;
    - else once, the final state.
    """
    if decode or T == 1:
        return (StateFiring(T - 1, True),)
    if positions:
        listed = sorted(p for p in positions if p < T)
        return tuple(StateFiring(p, p == T - 1) for p in listed) + (
            () if listed and listed[-1] == T - 1 else (StateFiring(T - 1, True),)
        )
    if keep:
        return tuple(StateFiring(p, p == T - 1) for p in range(T - min(keep, T), T))
    return (StateFiring(T - 1, True),)
