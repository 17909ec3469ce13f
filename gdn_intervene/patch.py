"""Install and restore: swap each GDN module's class in place (weights shared, nothing
copied), add the site modules, and undo it all exactly."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from . import _compat
from .families import family_of, supported_class_names
from .layer import GDNMixin, hookable_class
from .sites import site

__all__ = [
    "patch",
    "unpatch",
    "patched",
    "patch_on_load",
    "from_pretrained",
    "gdn_layers",
    "site_module",
    "intervene",
]


def _looks_gdn(m: nn.Module) -> bool:
    return type(m).__name__.endswith("GatedDeltaNet") or all(hasattr(m, a) for a in ("conv1d", "A_log", "dt_bias"))


def _candidates(model: nn.Module) -> list[nn.Module]:
    found = []
    for m in model.modules():
        if isinstance(m, GDNMixin) or any(family_of(c) for c in type(m).__mro__):
            found.append(m)
        elif _looks_gdn(m):
            raise ValueError(
                f"{type(m).__module__}.{type(m).__name__} looks like a Gated DeltaNet module, but its layout is "
                f"not known to gdn_intervene (supported: {', '.join(supported_class_names())}). To add it, append a "
                "Family(...) describing its projections to gdn_intervene.families.FAMILIES (see README, 'Adding a family')."
            )
    return found


def patch(model: nn.Module, *, native_cached: bool = False, _strict: bool = True) -> nn.Module:
    """Make every GDN module of `model` hookable, in place; returns `model`. Idempotent.

        model = gdn_intervene.patch(model)
        model.model.layers[0].linear_attn.beta   # a module now: hook it, trace it

    `native_cached=True` runs HF's native forward for every cached call (generation), with a
    warning that the sites do not fire there. Raises ValueError if `model` has no GDN module.
    """
    _compat.check_version("transformers")
    mods = _candidates(model)
    if not mods and _strict:
        raise ValueError(
            f"{type(model).__name__} has no Gated DeltaNet module; supported module classes: "
            f"{', '.join(supported_class_names())}"
        )
    for m in mods:
        if isinstance(m, GDNMixin):
            m.native_cached = native_cached
            continue
        orig = type(m)
        m.__class__ = hookable_class(orig)
        try:
            m._gdn_install(native_cached)
        except BaseException:
            m.__class__ = orig
            raise
        _compat.rebind_wrapped_forward(m)
        _compat.rebind_nnsight_body(m, orig.forward)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original HF classes; removes the site modules (and any hooks on them)."""
    for m in model.modules():
        if isinstance(m, GDNMixin):
            patched_forward = type(m).forward
            m._gdn_uninstall()
            m.__class__ = next(c for c in type(m).__mro__[1:] if not issubclass(c, GDNMixin) and c is not object)
            _compat.rebind_wrapped_forward(m)
            _compat.rebind_nnsight_body(m, patched_forward)
    return model


@contextlib.contextmanager
def patched(model: nn.Module, **kw) -> Iterator[nn.Module]:
    """`with patched(model) as m:` patches for the block and restores on exit, also on error.
    A model that was already patched stays patched."""
    was = [m for m in model.modules() if isinstance(m, GDNMixin)]
    patch(model, **kw)
    try:
        yield model
    finally:
        if not was:
            unpatch(model)


@contextlib.contextmanager
def patch_on_load() -> Iterator[None]:
    """Every transformers model built inside the block comes out patched, including
    meta-device models of lazy loaders (nnsight): `PreTrainedModel.post_init` patches the
    model it finishes. Weights load afterwards into the same parameters."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.post_init

    def post_init(self, *a, **k):
        out = original(self, *a, **k)
        patch(self, _strict=False)
        return out

    PreTrainedModel.post_init = post_init
    try:
        yield
    finally:
        PreTrainedModel.post_init = original


def from_pretrained(path: str, *, model_class=None, native_cached: bool = False, **kwargs) -> nn.Module:
    """Load a checkpoint with its GDN modules patched from construction on.

    `model_class` defaults to `transformers.AutoModelForCausalLM`; kwargs go to its
    `from_pretrained` (device_map, dtype, ...)."""
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    with patch_on_load():
        model = model_class.from_pretrained(path, **kwargs)
    return patch(model, native_cached=native_cached)  # raises the core error if there is no GDN


def gdn_layers(model: nn.Module) -> dict[int, nn.Module]:
    """{layer_idx: patched GDN module}, in layer order."""
    out = {m.layer_idx: m for m in model.modules() if isinstance(m, GDNMixin)}
    if not out:
        raise ValueError(f"{type(model).__name__} is not patched (call gdn_intervene.patch(model) first)")
    return dict(sorted(out.items()))


def site_module(model: nn.Module, layer: int, name: str) -> nn.Module:
    """The module of site `name` in GDN layer `layer` (HF-owned sites resolved per family)."""
    return _site_in(gdn_layers(model), layer, name)


def _site_in(layers: dict[int, nn.Module], layer: int, name: str) -> nn.Module:
    s = site(name)
    if layer not in layers:
        raise ValueError(f"layer {layer} is not a GDN layer; GDN layers are {list(layers)}")
    m = layers[layer]
    return getattr(m, m._gdn_family.hf_names[name]) if s.owner == "hf" else getattr(m, name)


Edit = Callable[[torch.Tensor], "torch.Tensor | None"]


@contextlib.contextmanager
def intervene(model: nn.Module, edits: Mapping[tuple[int, str], Edit]) -> Iterator[None]:
    """Plain-PyTorch interventions: `{(layer, site): fn}`; `fn(value)` returns a replacement
    or None (after editing in place). Hooks are removed on exit, also on error.

        with gdn_intervene.intervene(model, {(0, "beta"): lambda b: b * 0}):
            logits = model(ids).logits
    """
    handles = []
    try:
        layers = gdn_layers(model) if edits else {}
        for (layer, name), fn in edits.items():
            module = _site_in(layers, layer, name)
            handles.append(module.register_forward_hook(lambda mod, args, out, fn=fn: fn(out)))
        yield
    finally:
        for h in handles:
            h.remove()

