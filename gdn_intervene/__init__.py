"""gdn_intervene: hookable Gated DeltaNet layers for interpretability.

    import gdn_intervene as gi
    gi.patch(model)                            # in place; same weights, same numbers
    model.model.layers[0].linear_attn.beta     # now a module any framework can hook
    with gi.capture(model, sites=["beta"]) as cache:
        model(ids)
    cache[0, "beta"]                           # [prefill beta [B, T, HV]]
"""

from __future__ import annotations

from ._compat import UnsupportedVersionError
from .capture import Capture, capture
from .edit import intervene, state_at
from .families import FAMILIES, family_for
from .layer import NativeFallbackWarning
from .modules import SiteValueError
from .patch import from_pretrained, gdn_layers, patch, patch_on_load, patched, site_module, unpatch
from .sites import SITES, Site

__version__ = "0.2.0"

__all__ = [
    "patch",
    "unpatch",
    "patched",
    "patch_on_load",
    "from_pretrained",
    "gdn_layers",
    "site_module",
    "intervene",
    "state_at",
    "capture",
    "Capture",
    "SITES",
    "Site",
    "FAMILIES",
    "family_for",
    "SiteValueError",
    "NativeFallbackWarning",
    "UnsupportedVersionError",
]
