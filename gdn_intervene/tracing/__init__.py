"""Causal tracing over GDN sites: activation patching (`causal_trace`, exact, one forward per
batch of cells) and attribution patching (`attribution_patching`, estimates of every cell from a
few forwards and backwards), one result type, and how two results agree.

    from gdn_intervene import tracing
    trace = tracing.causal_trace(model, clean, corrupt)             # scores[site]: [L, T]
    atp = tracing.attribution_patching(model, clean, corrupt, verify=10)
    tracing.agreement(atp, trace)["all"]                              # Pearson, Spearman, recall

- `result`: `TraceResult`, `Cell`, the errors; `inputs`: the checks both methods share;
  `activation`: causal tracing; `attribution`: attribution patching; `agreement`: cells paired
  by (site, layer, position); `sweep`: batches split between the ranks of a process group.
"""

from ..sites import TRACE_SITES
from .activation import causal_trace
from .agreement import Agreement, agreement
from .attribution import attribution_patching
from .result import (
    ACTIVATION,
    ATTRIBUTION,
    CLEAN_INTO_CORRUPT,
    CORRUPT_INTO_CLEAN,
    RESTORED,
    Best,
    Cell,
    SameAnswerError,
    TraceResult,
    ZeroSpanError,
)

__all__ = [
    "TRACE_SITES",
    "ACTIVATION",
    "ATTRIBUTION",
    "CLEAN_INTO_CORRUPT",
    "CORRUPT_INTO_CLEAN",
    "RESTORED",
    "Agreement",
    "Best",
    "Cell",
    "SameAnswerError",
    "TraceResult",
    "ZeroSpanError",
    "agreement",
    "attribution_patching",
    "causal_trace",
]
