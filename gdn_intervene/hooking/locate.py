"""Find the patched GDN layers of a model and the modules of their sites.

Every function takes a model, or an nnsight model (or any wrapper that keeps the module as
`_module`), and finds layers by type, never by path: multimodal checkpoints keep the text model
under `model.language_model`.
"""

from __future__ import annotations

from torch import nn

from ..layer import GDNLayer, is_patched
from ..sites import site

__all__ = ["as_module", "decoder_layers", "gdn_layer", "gdn_layers", "select_layers", "site_in", "site_module"]


def as_module(model) -> nn.Module:
    """The `nn.Module` behind `model`: the model itself, or the module an nnsight model (or any
    wrapper that keeps it as `_module`, e.g. `gdn_intervene.nnsight.load(...)`) wraps."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "_module", None)
    if isinstance(inner, nn.Module):
        return inner
    raise TypeError(f"expected a torch.nn.Module (or an nnsight model wrapping one); got {type(model).__name__}")


def gdn_layers(model) -> dict[int, nn.Module]:
    """{layer_idx: patched GDN module}, in layer order (`model` may be an nnsight model)."""
    model = as_module(model)
    out = {m.layer_idx: m for m in model.modules() if is_patched(m)}
    if not out:
        raise ValueError(f"{type(model).__name__} is not patched (call gdn_intervene.patch(model) first)")
    return dict(sorted(out.items()))


def gdn_layer(model, index: int | None = None) -> GDNLayer:
    """The handle (`GDNLayer`) of GDN layer `index` of `model`; `model` may also be one patched
    GDN module (then no index)."""
    if index is None and is_patched(model):
        return GDNLayer(model)
    return GDNLayer(select_layers(model, index)[index])


def select_layers(model, layers=None) -> dict[int, nn.Module]:
    """{layer: patched GDN module} for `layers`: None (all), an int, or an iterable of ints;
    anything else, or an index that is not a GDN layer, is a ValueError naming the GDN layers."""
    mods = gdn_layers(model)
    if layers is None:
        return mods
    wanted = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else list(layers)
    bad = [l for l in wanted if isinstance(l, bool) or not isinstance(l, int) or l not in mods]
    if bad or not wanted:
        raise ValueError(f"layers must be GDN layer indices from {list(mods)}; got {wanted!r}")
    return {l: mods[l] for l in wanted}


def site_module(model, layer: int, name: str) -> nn.Module:
    """The module of site `name` in GDN layer `layer` (HF-owned sites resolved per family)."""
    return site_in(gdn_layers(model), layer, name)


def site_in(layers: dict[int, nn.Module], layer: int, name: str) -> nn.Module:
    """The module of site `name` in `layers[layer]` ({layer: patched module}, from `gdn_layers`)."""
    site(name)  # an unknown name raises first, listing the sites
    if layer not in layers:
        raise ValueError(f"layer {layer} is not a GDN layer; GDN layers are {list(layers)}")
    return GDNLayer(layers[layer]).site(name)


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layer list holding the GDN layers (the innermost such list: multimodal wrappers
    nest the text model); a ValueError where there is none."""
    model = as_module(model)
    gdn = next(iter(gdn_layers(model).values()))
    found = [
        m.layers
        for m in model.modules()
        if isinstance(getattr(m, "layers", None), nn.ModuleList) and any(gdn in layer.modules() for layer in m.layers)
    ]
    if not found:
        raise ValueError(
            f"cannot find the decoder layers of {type(model).__name__} (a module whose `layers` hold the GDN layers)"
        )
    return found[-1]
