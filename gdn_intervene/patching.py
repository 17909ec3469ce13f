"""Install and restore: swap each GDN module's class in place (weights shared, nothing
copied), add the site modules, and undo it all exactly. Finding layers and sites afterwards is
`hooking.locate`'s."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from . import _compat
from . import selfcheck as _selfcheck
from .families import family_for, supported_class_names
from .hooking.locate import as_module
from .layer import GDNMixin, hookable_class, replaces_forward, warn_hub_forward

__all__ = ["patch", "unpatch", "patched", "patch_on_load", "from_pretrained"]


def _looks_gdn(m: nn.Module) -> bool:
    """A delta-rule layer by name or by parts: GDN keeps A_log/dt_bias on the module, KDA on
    its `forget_gate`."""
    if type(m).__name__.endswith(("GatedDeltaNet", "DeltaAttention")):
        return True
    gate = getattr(m, "forget_gate", m)
    return isinstance(getattr(m, "conv1d", None), nn.Module) and all(hasattr(gate, a) for a in ("A_log", "dt_bias"))


def _candidates(model: nn.Module) -> list[nn.Module]:
    found = []
    for m in model.modules():
        if isinstance(m, GDNMixin) or family_for(type(m)):
            found.append(m)
        elif _looks_gdn(m):
            raise ValueError(
                f"{type(m).__module__}.{type(m).__name__} looks like a Gated DeltaNet module, but its layout is "
                f"not known to gdn_intervene (supported: {', '.join(supported_class_names())}). To add it, append a "
                "Family(...) describing its projections to gdn_intervene.families.FAMILIES (see README, 'Adding a family')."
            )
    return found


def patch(
    model: nn.Module, *, native_cached: bool | None = None, selfcheck: bool = True, _strict: bool = True
) -> nn.Module:
    """Make every GDN module of `model` hookable, in place; returns `model`. Idempotent.

        model = gdn_intervene.patch(model)
        model.model.layers[0].linear_attn.beta   # a module now: hook it, trace it

    `native_cached=True` runs HF's native forward for every cached call (generation), with a
    warning that the sites do not fire there; `False` the decomposed one (the default for a new
    patch). Left out, an already patched module keeps its setting. Raises ValueError if `model`
    has no GDN module. The first call of each patched class checks itself against HF's forward
    (`gdn_intervene.selfcheck`); `selfcheck=False` skips that for this model's classes.
    """
    _compat.check_version("transformers")
    model = as_module(model)
    mods = _candidates(model)
    if not mods and _strict:
        raise ValueError(
            f"{type(model).__name__} has no Gated DeltaNet module; supported module classes: "
            f"{', '.join(supported_class_names())}"
        )
    hubs = []
    for m in mods:
        if isinstance(m, GDNMixin):
            if native_cached is not None:
                m.native_cached = native_cached
            continue
        hub = _hub_forward(m)
        orig = type(m)
        m.__class__ = hookable_class(orig)
        try:
            m._gdn_install(bool(native_cached))
        except BaseException:
            m.__class__ = orig
            raise
        _compat.rebind_forwards(m, orig.forward)
        if hub is not None:  # HF's own layer forward again, decomposed; said in one line
            if m.__dict__.get("forward") is hub:
                del m.__dict__["forward"]
            if m.__dict__.get("_old_forward") is hub:  # accelerate's hooks (device_map)
                m.__dict__["_old_forward"] = type(m).forward.__get__(m)
            hubs.append((m, hub))
    if hubs:
        where = "layers " + ", ".join(str(m.layer_idx) for m, _ in hubs)
        warn_hub_forward(*hubs[0], "patch restored HF's layer forward", layers=where)
    if not selfcheck:
        for m in mods:
            _selfcheck.mark_checked(type(m))
    return model


def _hub_forward(m: nn.Module):
    """The whole-layer hub kernel forward kernels' `kernelize` bound to `m` (transformers 5.25
    loads with use_kernels on), on the instance or, under accelerate's hooks (device_map), in
    `_old_forward`; None if there is none."""
    return next((f for f in map(m.__dict__.get, ("forward", "_old_forward")) if replaces_forward(m, f)), None)


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original HF classes; removes the site modules (and any hooks on them)."""
    model = as_module(model)
    for m in model.modules():
        if isinstance(m, GDNMixin):
            patched_forward = type(m).forward
            m._gdn_uninstall()
            m.__class__ = next(c for c in type(m).__mro__[1:] if not issubclass(c, GDNMixin) and c is not object)
            _compat.rebind_forwards(m, patched_forward)
    return model


@contextlib.contextmanager
def patched(model: nn.Module, **kw) -> Iterator[nn.Module]:
    """`with patched(model) as m:` patches for the block and restores on exit, also on error.
    A model that was already patched stays patched, with its settings (unless `kw` sets them)."""
    was = [m for m in as_module(model).modules() if isinstance(m, GDNMixin)]
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


def from_pretrained(path: str, *, model_class=None, native_cached: bool | None = None, **kwargs) -> nn.Module:
    """Load a checkpoint with its GDN modules patched from construction on.

    `model_class` defaults to `transformers.AutoModelForCausalLM`; kwargs go to its
    `from_pretrained` (device_map, dtype, ...)."""
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    with patch_on_load():
        model = model_class.from_pretrained(path, **kwargs)
    return patch(model, native_cached=native_cached)  # raises the core error if there is no GDN
