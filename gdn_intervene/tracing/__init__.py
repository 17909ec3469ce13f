"""Causal tracing over GDN sites: activation patching (`causal_trace`, exact, one forward per
batch of cells) and attribution patching (`attribution_patching`, estimates of every cell from a
few forwards and backwards), one result type, and how two results agree.

    from gdn_intervene import tracing
    trace = tracing.causal_trace(model, clean, corrupt)             # scores[site]: [L, T]
    atp = tracing.attribution_patching(model, clean, corrupt, verify=10)
    tracing.agreement(atp, trace)["all"]                              # Pearson, Spearman, recall

- `result`: `TraceResult`, `Cell`, the errors; `inputs`: the checks both methods share;
  `activation`: causal tracing; `attribution`: attribution patching; `pairing`: cells paired
  by (site, layer, position); `sweep`: batches split between the ranks of a process group;
  `paths`: how attribution patching integrates (torch-free).
"""

from __future__ import annotations

import importlib

# public name -> defining submodule; loaded on first use, so `tracing.paths` (torch-free) is
# importable by the command line without importing torch
_WHERE = {
    "TRACE_SITES": "..sites",
    "causal_trace": ".activation",
    "Agreement": ".pairing",
    "agreement": ".pairing",
    "attribution_patching": ".attribution",
    "verify_top": ".attribution",
    **{n: ".result" for n in ("ACTIVATION", "ATTRIBUTION", "CLEAN_INTO_CORRUPT", "CORRUPT_INTO_CLEAN", "RESTORED",
                             "Best", "Cell", "SameAnswerError", "TraceResult", "ZeroSpanError")},
    **{n: ".paths" for n in ("INPUTS", "ACTIVATIONS", "DEFAULT_STEPS", "DEFAULT_PATH")},
}  # fmt: skip

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
