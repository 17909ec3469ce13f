"""gdn_intervene: hookable Gated DeltaNet layers for interpretability.

    import gdn_intervene
    gdn_intervene.patch(model)            # in place; same weights, same numbers
    model.model.layers[0].linear_attn.beta   # now a module any framework can hook
"""

from __future__ import annotations

from .families import FAMILIES
from .layer import NativeFallbackWarning
from .modules import SiteValueError
from .patch import from_pretrained, gdn_layers, intervene, patch, patch_on_load, patched, site_module, unpatch
from .sites import SITES, Site
from ._compat import UnsupportedVersionError

__version__ = "0.1.0"

__all__ = [
    "patch",
    "unpatch",
    "patched",
    "patch_on_load",
    "from_pretrained",
    "gdn_layers",
    "site_module",
    "intervene",
    "SITES",
    "Site",
    "FAMILIES",
    "SiteValueError",
    "NativeFallbackWarning",
    "UnsupportedVersionError",
]
