"""gdn_intervene: hookable Gated DeltaNet layers for interpretability.

    import gdn_intervene as gi
    gi.patch(model)                            # in place; same weights, same numbers
    model.model.layers[0].linear_attn.beta     # now a module any framework can hook
    with gi.capture(model, sites=["beta"]) as cache:
        model(ids)
    cache[0, "beta"]                           # [prefill beta [B, T, HV]]

The public names are loaded on first use: `import gdn_intervene` imports neither torch nor
transformers (the CLI's `--help` stays fast), and nothing is patched or registered on import.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

# public name -> defining submodule
_WHERE = {
    "patch": "patching",
    "unpatch": "patching",
    "patched": "patching",
    "patch_on_load": "patching",
    "from_pretrained": "patching",
    "gdn_layers": "hooking.locate",
    "gdn_layer": "hooking.locate",
    "site_module": "hooking.locate",
    "GDNLayer": "layer",
    "intervene": "hooking.edit",
    "state_at": "hooking.edit",
    "capture": "hooking.capture",
    "Capture": "hooking.capture",
    "SITES": "sites",
    "Site": "sites",
    "StateFiring": "sites",
    "FAMILIES": "families",
    "family_for": "families",
    "SiteValueError": "modules",
    "CheckpointEditError": "replay",
    "NativeFallbackWarning": "layer",
    "UnsupportedVersionError": "_compat",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
