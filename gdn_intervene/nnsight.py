"""nnsight integration: a patched `TransformersModel` whose GDN sites are envoys.

    from gdn_intervene.nnsight import load, site

    model = load("Qwen/Qwen3.5-0.8B")                 # or a local checkpoint directory
    attn = model.model.layers[0].linear_attn          # site(model, 0, "beta") is attn.beta
    with model.trace("The Eiffel Tower is in"):
        beta = attn.beta.output.save()                # [B, T, HV]
        attn.decay.output[:, -1] *= 2                 # g <= 0: doubling g squares decay = exp(g)
    with model.generate("Hello", max_new_tokens=5) as tracer:
        for step in tracer.iter[:5]:                  # the prefill, then each of the 4 decode steps
            attn.beta.output[:, -1, 3] = 0
        ids = tracer.result.save()

nnsight builds a model on the meta device and, at the first trace (or `dispatch=True`),
loads the real weights into NEW modules. A patch applied to the meta model alone would be
lost there, so `PatchedTransformersModel` runs both builds inside `gdn_intervene.patch_on_load()`:
every module tree nnsight ever sees is patched, and the envoy tree (sites included) is the same
before and after dispatch. `gdn_intervene.capture`, `intervene` and `state_at`, the analysis
and tracing tools and the doctor dispatch a lazy model before they hook or run it (hooks on the
meta placeholders would never run).

An in-memory model that names no checkpoint (`config._name_or_path` empty) and comes without
`tokenizer=` loads without one: token-id inputs work, text raises a one-line error.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from nnsight import Envoy
from nnsight.modeling.transformers import TransformersModel

from . import _compat
from .hooking.locate import gdn_layers, site_module
from .layer import GDNLayer, is_patched
from .patching import patch, patch_on_load
from .sites import SITE_NAMES

__all__ = ["PatchedTransformersModel", "load", "site", "layers"]

_compat.check_version("nnsight")

# nnsight's preprocessor slots and the pipeline class flag that says a task loads each.
_PREPROCESSOR_FLAGS = {
    "tokenizer": "_load_tokenizer",
    "image_processor": "_load_image_processor",
    "feature_extractor": "_load_feature_extractor",
    "processor": "_load_processor",
}


class _SiteEnvoy(Envoy):
    """An `Envoy` whose missing-attribute error says where the GDN sites are.

    `model.model.layers[1].linear_attn` on a full-attention layer, or a misspelt site, fails
    with the GDN layer indices or the site names instead of a bare AttributeError."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError as error:
            hint = self._gdn_hint(name)
            if hint is None:
                raise
            raise AttributeError(f"{error}. {hint}") from None

    def _gdn_hint(self, name: str) -> str | None:
        module = self.__dict__.get("_module")
        if is_patched(module):
            parent = GDNLayer(module).parent  # linear_attn; self_attn in the KDA families
            return f"Layer {module.layer_idx}'s {parent} has no {name!r}; its sites are: {', '.join(SITE_NAMES)}"
        if name != "linear_attn" and name not in SITE_NAMES:
            return None
        try:
            found = list(gdn_layers(self.root._module))
        except ValueError:
            return None
        return (
            f"{self.path} is not a Gated DeltaNet layer; the GDN layers are {found} "
            "(gdn_intervene.nnsight.site(model, layer, name) finds a site by layer index)"
        )


class PatchedTransformersModel(TransformersModel):
    """`nnsight.TransformersModel` whose GDN modules are patched in every build.

    Overrides nnsight's three loading hooks: `_load_meta` (the lazy meta build), `_load` (the
    real weights, at dispatch or with `dispatch=True`) and `_wrap` (a ready module). Raises
    ValueError if the model has no GDN module.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("envoys", _SiteEnvoy)
        super().__init__(*args, **kwargs)

    def _gdn_patch(self, module: torch.nn.Module) -> torch.nn.Module:
        if not any(is_patched(m) for m in module.modules()):  # keep a caller's patch options
            patch(module)  # ValueError if there is no GDN module
        for m in gdn_layers(module).values():  # wrapped by another envoy before the patch?
            _compat.rebind_forwards(m)
        return module

    def _load_meta(self, *args: Any, **kwargs: Any) -> torch.nn.Module:
        with patch_on_load():
            return self._gdn_patch(super()._load_meta(*args, **kwargs))

    def _load(self, *args: Any, **kwargs: Any) -> torch.nn.Module:
        with patch_on_load():
            return self._gdn_patch(super()._load(*args, **kwargs))

    def _wrap(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        if self.tokenizer is None and not self.repo_id and "pipeline_class" not in kwargs:
            # Nowhere to load a tokenizer from: HF's pipeline would fail on the empty name.
            pipeline_class = _tokenizerless(self.task)
            if pipeline_class is not None:
                kwargs["pipeline_class"] = pipeline_class
        # Patched before nnsight wraps it: nnsight captures each module's forward once.
        return super()._wrap(self._gdn_patch(module), *args, **kwargs)

    def _loaded_preprocessors(self) -> set:
        impl = _pipeline_class(self.task)
        if impl is None:
            return super()._loaded_preprocessors()
        return {attr for attr, flag in _PREPROCESSOR_FLAGS.items() if getattr(impl, flag, False)}


# --- nnsight 0.8.1 / transformers 5.x shims ---


def _pipeline_class(task: str | None) -> type | None:
    """The pipeline class of a transformers task, or None if unknown.

    transformers 5.24 lists it as a dotted string in `check_task(task)[1]["impl"]`; nnsight
    0.8.1 reads class flags (`_load_tokenizer`, ...) off that entry, finds none on a string, and
    so its lazy build loads no tokenizer ("Impossible to guess which tokenizer to use")."""
    import importlib

    from transformers.pipelines import check_task

    try:
        impl = check_task(task)[1]["impl"]
    except Exception:  # unknown or unset task: let nnsight decide
        return None
    if isinstance(impl, str):
        module, _, name = impl.rpartition(".")
        impl = getattr(importlib.import_module(module), name)
    return impl


@functools.cache
def _tokenizerless(task: str | None) -> type | None:
    """The task's pipeline class, made to build without a tokenizer (HF's soft flag, None), whose
    text preprocessing says that it has none; None for a task that loads no tokenizer."""
    impl = _pipeline_class(task)
    if impl is None or not getattr(impl, "_load_tokenizer", False):
        return None

    def preprocess(self, *args: Any, **kwargs: Any) -> Any:
        if self.tokenizer is None:
            raise ValueError(
                "gdn_intervene.nnsight: this model was loaded without a tokenizer (an in-memory model names no "
                "checkpoint to load one from): pass token ids, or load(model, tokenizer=...)"
            )
        return impl.preprocess(self, *args, **kwargs)

    namespace = {
        "_load_tokenizer": None,
        "preprocess": preprocess,
        "__module__": impl.__module__,
    }  # nnsight reads Chat there
    return type(f"Tokenizerless{impl.__name__}", (impl,), namespace)


def load(
    model: str | torch.nn.Module,
    *,
    task: str = "text-generation",
    dispatch: bool = False,
    **kwargs: Any,
) -> PatchedTransformersModel:
    """A patched nnsight model from a hub id, a local checkpoint directory or a loaded HF model.

        model = gdn_intervene.nnsight.load("path/to/checkpoint", dispatch=True, dtype=torch.bfloat16)

    `dispatch=False` (nnsight's default) builds on the meta device and loads the weights at the
    first trace (or at the first `gdn_intervene.capture` / `intervene` / `state_at`); both builds
    are patched. An in-memory model without `tokenizer=` whose config names no checkpoint loads
    without a tokenizer (token-id inputs only). Other kwargs go to `nnsight.TransformersModel`
    (`tokenizer=`, `dtype=`, `device_map=`, ...)."""
    return PatchedTransformersModel(model, task=task, dispatch=dispatch, **kwargs)


def layers(model: Envoy) -> dict[int, Envoy]:
    """{layer_idx: the envoy of that layer's patched GDN module}, in layer order."""
    return {i: _envoy_of(model, m) for i, m in gdn_layers(model._module).items()}


def site(model: Envoy, layer: int, name: str) -> Envoy:
    """The envoy of site `name` in GDN layer `layer`; HF-owned sites resolve per family
    (`site(model, 0, "norm")` is OLMo-Hybrid's `o_norm`). Raises ValueError naming the GDN layers
    for a full-attention layer, and the sites for an unknown name.

        with model.trace(ids):
            site(model, 2, "state").output[:, 1] = 0     # [B, HV, K, V]
    """
    return _envoy_of(model, site_module(model._module, layer, name))


def _envoy_of(model: Envoy, module: torch.nn.Module) -> Envoy:
    envoy = model.interleaver.envoys.get(id(module))
    if envoy is None:  # a module the envoy tree has not mirrored yet
        path = next(n for n, m in model._module.named_modules() if m is module)
        envoy = model.get(path)
    return envoy
