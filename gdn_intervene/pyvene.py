"""pyvene integration: component names for every GDN model class.

    import pyvene as pv, gdn_intervene as gi, gdn_intervene.pyvene
    gdn_intervene.pyvene.register()               # idempotent; imports pyvene here, not before
    model = gi.patch(model)
    iv = pv.IntervenableModel([{"layer": 0, "component": "head_linear_attn_beta", "unit": "h.pos"}], model)
    loc = [[[1]] * B, [[3]] * B]                  # head 1, position 3, for each of B rows
    _, out = iv({"input_ids": base}, [{"input_ids": src}], {"sources->base": ([loc], [loc])})

Components (layer index = decoder layer, as `layers[%s]`):
- pyvene's Llama/Qwen2 names: `block_input`, `block_output`, `mlp_input`, `mlp_output`, and on
  full-attention layers `attention_input`, `attention_output`, `attention_value_output`,
  `query_output`, `key_output`, `value_output` (+ `head_` variants of the last four).
- one per site of `gdn_intervene.SITES`, `linear_attn_<site>`, with `recurrence` ->
  `linear_attn_recurrence_output` and `out_proj` -> `linear_attn_output`; every site with a
  head axis also as `head_linear_attn_<...>`, for `unit="h.pos"` (or `"h"`). The names are the
  same in every family; the KDA families keep the module at `self_attn` (its sites are
  `self_attn.<site>`), and there the attention components refuse the KDA layers.

pyvene indexes `[B, T, X]`. Each GDN value is shown to pyvene as that view and put back after:
`[B, T, H, D]` -> `[B, T, H*D]`; gates `[B, T, HV]` are `[B, T, HV]` (one number per head,
D = 1); the state `[B, HV, K, V]` -> `[B, 1, HV*K*V]`, i.e. one position (0) per call: the
state after this call (each decode step in `generate`), which reaches the logits only through
the cache. Inside `gdn_intervene.state_at(model, [p])` (one position) the state components
see the state after token p instead, which the rest of the call reads: the layer's prefill is
split after p, the state site fires after p and again at the end, and pyvene is shown only
the state after p (the layer says which state fires: `GDNLayer.firing`; the final state passes
through unedited). More than one position raises: pyvene takes one value per call. Head h of a `head_` component is the
slice `[h*D, (h+1)*D)` of that view; HK heads for q/k, HV heads otherwise. KDA's per-channel
decay `[B, T, HV, K]` has D = K. Widths come from the family's shape of the site
(`Site.shape_for(family.mixer)`) and its config fields (`Family.config`: KDA configs name one
head count and one head dim, `linear_num_heads` and `linear_head_dim`).

What `register()` changes in pyvene 0.1.8 (all through `_wrap_pyvene` here; every other
model class goes to pyvene's own code unchanged):
- `get_module_hook`: a GDN component resolves by layer index with a clear error (it names the
  GDN layers; an attention component at a GDN layer names the attention layers) and hooks the
  site through an adapter that hands pyvene a fresh `[B, T, X]` copy and writes pyvene's edit
  of it back into the site's value, in place (a state component: that of the first firing of a
  call that `state_at` splits). pyvene edits the hooked tensor in place; on the copy that cannot
  disturb autograd or a non-contiguous kernel output, and the value keeps its own layout (a
  strided value returned contiguous would move the last bits of what follows it).
  An out-of-range head or position raises `ValueError` naming the head count and T.
- `get_dimension_by_component`: widths such as HV*V are products of two config fields, which
  pyvene's dimension syntax cannot express; they are computed from the (text) config.
- `remove_forward_hooks`: pyvene removes every forward hook of the model before and after
  each call. transformers 5.x installs its `output_hidden_states`/`output_attentions`
  capturing hooks once per model and marks them installed, so after one pyvene call those
  outputs came back silently incomplete. For our model classes only pyvene's own hooks (and
  the adapters) are removed; hooks of transformers and of the user stay.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import _compat
from .families import FAMILIES, Family
from .hooking.locate import gdn_layers, site_module
from .layer import GDNLayer, is_patched
from .sites import SITES, Fires, Owner, Site

__all__ = ["register", "COMPONENTS", "model_classes", "component"]


@dataclass(frozen=True)
class Component:
    """One pyvene component. path: module under a decoder layer (for a site, `linear_attn.` is
    the family's `Family.parent`); site: the GDN site, if any; heads: what counts the heads of a
    `head_` component: a config field, or for a site its head letter (HK, HV), which
    `Family.config` names per family; width(c) -> X of the `[B, T, X]` view (per head for a
    `head_` component) from the text config `c` (a site's: width(c, family))."""

    name: str
    path: str
    hook: str  # "output" or "input"
    width: Callable
    site: Site | None = None
    heads: str | None = None


def _site_width(s: Site, per_head: bool) -> Callable:
    """width(config, family) of the site's `[B, T, X]` view, read off the registry's shape
    letters for the family's mixer (without B and T; the head letter, if any, comes first:
    [HV, K, V], [HV, V]) and the family's config fields."""

    def width(c, fam: Family) -> int:
        letters = [x for x in s.shape_for(fam.mixer) if x not in ("B", "T")]
        sizes = fam.letters(c)
        return math.prod(sizes[x] for x in (letters[1:] if per_head else letters))

    return width


def _site_name(s: Site) -> str:
    return {"recurrence": "linear_attn_recurrence_output", "out_proj": "linear_attn_output"}.get(
        s.name, f"linear_attn_{s.name}"
    )


def _head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _streams(c) -> int:
    """Hyper-connection streams of the residual: Qwen4-Exp's `hc_count`, GLM-5-Next's `hc_mult`;
    1 for a plain residual."""
    return getattr(c, "hc_count", None) or getattr(c, "hc_mult", None) or 1


def _block(c) -> int:  # the block's input and output: all streams at a position, N * D
    return c.hidden_size * _streams(c)


def _components() -> dict[str, Component]:
    D = lambda c: c.hidden_size  # noqa: E731
    out = [
        Component("block_input", "", "input", _block),
        Component("block_output", "", "output", _block),
        Component("mlp_input", "mlp", "input", D),
        Component("mlp_output", "mlp", "output", D),
        Component("attention_input", "self_attn", "input", D),
        Component("attention_output", "self_attn", "output", D),
        Component(
            "attention_value_output", "self_attn.o_proj", "input", lambda c: c.num_attention_heads * _head_dim(c)
        ),
        Component("head_attention_value_output", "self_attn.o_proj", "input", _head_dim, heads="num_attention_heads"),
        # q_proj also holds the output gate in the gated-attention families (2 x head_dim per
        # head), which the config does not say: its width is left to pyvene (None).
        Component("query_output", "self_attn.q_proj", "output", lambda c: None),
        Component("head_query_output", "self_attn.q_proj", "output", lambda c: None, heads="num_attention_heads"),
        Component("key_output", "self_attn.k_proj", "output", lambda c: c.num_key_value_heads * _head_dim(c)),
        Component("head_key_output", "self_attn.k_proj", "output", _head_dim, heads="num_key_value_heads"),
        Component("value_output", "self_attn.v_proj", "output", lambda c: c.num_key_value_heads * _head_dim(c)),
        Component("head_value_output", "self_attn.v_proj", "output", _head_dim, heads="num_key_value_heads"),
    ]
    for s in SITES:
        name = _site_name(s)
        out.append(Component(name, f"linear_attn.{s.name}", "output", _site_width(s, False), site=s))
        if s.head_axis is not None:
            out.append(Component("head_" + name, f"linear_attn.{s.name}", "output", _site_width(s, True), s, s.heads))
    return {c.name: c for c in out}


COMPONENTS: dict[str, Component] = _components()


def component(name: str) -> Component:
    try:
        return COMPONENTS[name]
    except KeyError:
        raise ValueError(f"unknown component {name!r}; components are: {', '.join(COMPONENTS)}") from None


def model_classes() -> list[type]:
    """Every model class of the families' modeling modules that holds decoder layers:
    *ForCausalLM, *ForConditionalGeneration, *Model and *TextModel (not vision towers)."""
    from transformers import PreTrainedModel

    found = []
    for fam in FAMILIES:
        for mod_name, _ in fam.classes:
            mod = _compat.modeling_module(mod_name)
            if mod is None:  # this family is absent from the installed transformers release
                continue
            for name, cls in vars(mod).items():
                if (
                    inspect.isclass(cls)
                    and cls.__module__ == mod_name
                    and issubclass(cls, PreTrainedModel)
                    and name.endswith(("ForCausalLM", "ForConditionalGeneration", "Model"))
                    and not name.endswith(("PreTrainedModel", "VisionModel"))
                    and cls not in found
                ):
                    found.append(cls)
    return found


def _layers_prefix(cls: type) -> str:
    """Path of the decoder-layer list, by HF's naming: multimodal models keep the text model
    under `language_model`; `*ForX` heads keep the base model under `model`."""
    mod = vars(importlib.import_module(cls.__module__))
    multimodal = any(n.endswith("ForConditionalGeneration") for n in mod)
    name = cls.__name__
    if name.endswith("ForConditionalGeneration"):
        return "model.language_model.layers"
    if name.endswith("ForCausalLM") or name.endswith("TextModel") or not multimodal:
        return "model.layers" if name.endswith("ForCausalLM") else "layers"
    return "language_model.layers"


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


_REGISTERED: set[type] = set()


def register() -> list[type]:
    """Register every GDN model class with pyvene (idempotent); returns the classes."""
    import pyvene
    from pyvene.models.constants import CONST_INPUT_HOOK, CONST_OUTPUT_HOOK

    _compat.check_version("pyvene", importlib.metadata.version("pyvene"))  # pyvene has no __version__
    classes = model_classes()
    for cls in classes:
        prefix = _layers_prefix(cls)
        cfg = "text_config." if prefix.startswith(("model.language_model", "language_model")) else ""
        fam = _family_of_model(cls)
        modules, dims = {}, {}
        for c in COMPONENTS.values():
            hook = CONST_OUTPUT_HOOK if c.hook == "output" else CONST_INPUT_HOOK
            path = f"{prefix}[%s]" + (f".{c.path}" if c.path else "")
            heads = c.heads
            if c.site is not None:  # under the family's parent; norm/out_proj: o_norm/o_proj where HF says so
                attr = fam.hf_names[c.site.name] if c.site.owner is Owner.HF else c.site.name
                path = f"{prefix}[%s].{fam.parent}.{attr}"
                heads = fam.config[c.heads] if c.heads else None  # HK/HV -> this family's config field
            modules[c.name] = (path, hook) + (((_split_heads, heads),) if heads else ())
            if heads:
                dims[heads] = (cfg + heads,)  # pyvene reads split counts from here
        pyvene.type_to_module_mapping[cls] = modules
        pyvene.type_to_dimension_mapping[cls] = dims
        _REGISTERED.add(cls)
    _wrap_pyvene(
        {
            "get_module_hook": _wrap_get_module_hook,
            "get_dimension_by_component": _wrap_get_dimension,
            "remove_forward_hooks": _wrap_remove_hooks,
        }
    )
    return classes


def _family_of_model(model_type) -> Family:
    """The GDN family of a registered model class (by its modeling module)."""
    cls = model_type if isinstance(model_type, type) else type(model_type)
    return next(f for f in FAMILIES if any(m == cls.__module__ for m, _ in f.classes))


def _split_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, T, n*D] -> [B, n, T, D], as pyvene's `split_head_and_permute` (D may be 1)."""
    return x.view(*x.shape[:-1], n, x.shape[-1] // n).permute(0, 2, 1, 3)


def _ours(model_or_type) -> bool:
    t = model_or_type if isinstance(model_or_type, type) else type(model_or_type)
    return t in _REGISTERED


# ---- pyvene 0.1.8 shims: the three wrappers, installed by _wrap_pyvene ----


def _wrap_pyvene(wrappers: dict) -> None:
    """Replace functions of pyvene 0.1.8's `pyvene.models.intervenable_base`, once each:
    `{name: make}` sets `name` there to `make(original)`. `IntervenableModel` calls
    `get_module_hook`, `get_dimension_by_component` and `remove_forward_hooks` through that
    module's globals (star-imported from `modeling_utils`), so this is where they are reached."""
    import pyvene.models.intervenable_base as base

    for name, make in wrappers.items():
        original = getattr(base, name)
        if not getattr(original, "_gdn_wrapped", False):
            new = make(original)
            new._gdn_wrapped = True
            setattr(base, name, new)


def _wrap_get_dimension(original):
    def get_dimension_by_component(model_type, model_config, comp):
        if _ours(model_type) and comp in COMPONENTS:
            c = COMPONENTS[comp]
            cfg = _text_config(model_config)
            return c.width(cfg, _family_of_model(model_type)) if c.site is not None else c.width(cfg)
        return original(model_type, model_config, comp)

    return get_dimension_by_component


def _wrap_get_module_hook(original):
    def get_module_hook(model, representation, backend="native"):
        if not (_ours(model) and representation.component in COMPONENTS and backend == "native"):
            return original(model, representation, backend)
        c = COMPONENTS[representation.component]
        layer = representation.layer
        if c.site is not None:
            try:  # the core's error names the GDN layers (or says the model is not patched)
                module = site_module(model, layer, c.site.name)
            except ValueError as e:
                raise ValueError(f"pyvene component {c.name!r}: {e}") from None
            sizes = _family_of_model(model).letters(_text_config(model.config))
            heads = sizes[c.site.heads] if c.heads else None
            owner = gdn_layers(model)[layer] if c.site.fires is Fires.PER_SPLIT else None
            return _Adapter(module, c, layer, heads, owner)
        decoder = _decoder_layer(model, layer)
        if c.name in ("block_input", "block_output") and getattr(_text_config(model.config), "hc_mult", None):
            return _BlockAdapter(decoder, c)  # GLM-5-Next: the streams are [B, T, N, D]
        if c.path.startswith("self_attn") and not _is_attention(decoder):
            attn = [i for i, d in enumerate(_decoder_layers(model)) if _is_attention(d)]
            raise ValueError(
                f"pyvene component {c.name!r}: layer {layer} has no full-attention self_attn (it is a "
                f"linear-attention layer); full-attention layers are {attn}"
            )
        return original(model, representation, backend)

    return get_module_hook


def _wrap_remove_hooks(original):
    def remove_forward_hooks(main_module):
        if not _ours(main_module):
            return original(main_module)
        for m in main_module.modules():
            _compat.remove_forward_hooks_where(m, _is_pyvene_hook)

    return remove_forward_hooks


def _is_pyvene_hook(fn) -> bool:
    return getattr(fn, "__module__", "").startswith("pyvene.") or getattr(fn, "_gdn_pyvene", False)


def _is_attention(decoder: nn.Module) -> bool:
    """A full-attention decoder layer (the KDA families keep their module at `self_attn` too)."""
    return hasattr(decoder, "self_attn") and not is_patched(decoder.self_attn)


def _decoder_layers(model) -> nn.ModuleList:
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.endswith("layers") and "vision" not in name and "visual" not in name:
            return m
    raise ValueError(f"{type(model).__name__}: no decoder layer list found")


def _decoder_layer(model, layer: int) -> nn.Module:
    layers = _decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range: the model has {len(layers)} decoder layers")
    return layers[layer]


class _Adapter:
    """`pyvene` calls `module_hook(hook_callback, with_kwargs=True)` and later `.remove()` on
    what it returns. We register one forward hook on the site that shows pyvene a fresh
    `[B, T, X]` copy of the value (state: `[B, 1, HV*K*V]`) and copies the result back into the
    value (in place: it keeps its layout, as pyvene's edits of HF's own modules do).

    State components (`owner`: the GDN layer): pyvene sees one state per call, the one the
    layer says is firing (`GDNLayer.firing`): inside `gdn_intervene.state_at(model, [p])` the
    state after p (a pre-hook on the layer records each call's length: a call shorter than p + 1
    tokens, a decode step, shows its final state), else the call's final state."""

    def __init__(
        self, module: nn.Module, comp: Component, layer: int, heads: int | None, owner: nn.Module | None = None
    ):
        self.module, self.comp, self.layer, self.heads, self.owner = module, comp, layer, heads, owner

    def __call__(self, hook, with_kwargs: bool = True):
        comp, layer, heads = self.comp, self.layer, self.heads
        gdn = None if self.owner is None else GDNLayer(self.owner)
        T = [0]  # tokens of the layer's current call

        def adapter(module, args, kwargs, out):
            if gdn is not None and not _pyvenes_state(gdn, comp, layer, T[0]):
                return None
            lead = tuple(out.shape[:2]) if comp.site.has_time else (out.shape[0], 1)
            flat = out.reshape(*lead, -1).clone()
            try:
                hook(module, args, kwargs, flat)
            except (IndexError, RuntimeError) as e:
                if "out of bounds" not in str(e):
                    raise
                raise ValueError(_range_message(comp, layer, flat.shape[1], heads)) from e
            # Back into the value itself, in its own layout: a strided value (Qwen3-Next's gate is a
            # slice of the fused projection) returned contiguous would change the last bits of
            # the norm and projection after it (an edit in place is legal at every site).
            return out.copy_(flat.view(out.shape))

        adapter._gdn_pyvene = True
        handles = [self.module.register_forward_hook(adapter, with_kwargs=True)]
        if gdn is not None:

            def new_call(module, args, kwargs):
                T[0] = (args[0] if args else kwargs["hidden_states"]).shape[1]

            new_call._gdn_pyvene = True
            handles.append(self.owner.register_forward_pre_hook(new_call, with_kwargs=True))
        return _Handles(handles)


def _pyvenes_state(gdn: GDNLayer, comp: Component, layer: int, T: int) -> bool:
    """Whether the state firing now is the one pyvene's state component stands for."""
    ps = gdn.state_positions
    if len(ps) > 1:
        raise ValueError(
            f"pyvene component {comp.name!r} at layer {layer}: the layer is split after positions {list(ps)} "
            "(gdn_intervene.state_at), but pyvene takes one state per call; give state_at one position"
        )
    firing = gdn.firing
    if firing is None:
        return True
    return firing.position == ps[0] if ps and ps[0] < T else firing.final


class _BlockAdapter:
    """A block component of a model whose residual is N hyper-connection streams held as
    [B, T, N, D] (GLM-5-Next's mHC): pyvene is shown all streams at a position, a fresh
    [B, T, N*D] copy (the unit Qwen4-Exp's flat streams have), and its edit is put back."""

    def __init__(self, decoder: nn.Module, comp: Component):
        self.decoder, self.comp = decoder, comp

    def __call__(self, hook, with_kwargs: bool = True):
        if self.comp.hook == "output":

            def adapter(module, args, kwargs, out):
                h, rest = (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, None)
                flat = h.reshape(*h.shape[:2], -1).clone()
                hook(module, args, kwargs, flat if rest is None else (flat, *rest))
                return flat.view(h.shape) if rest is None else (flat.view(h.shape), *rest)

            adapter._gdn_pyvene = True
            return _Handles([self.decoder.register_forward_hook(adapter, with_kwargs=True)])

        def pre(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            flat = h.reshape(*h.shape[:2], -1).clone()
            hook(module, (flat, *args[1:]) if args else (), kwargs if args else {**kwargs, "hidden_states": flat})
            if args:
                return (flat.view(h.shape), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": flat.view(h.shape)}

        pre._gdn_pyvene = True
        return _Handles([self.decoder.register_forward_pre_hook(pre, with_kwargs=True)])


class _Handles:
    """The adapter's hooks, removed together (what pyvene's `HandlerList` calls `remove()` on)."""

    def __init__(self, handles: list):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _range_message(comp: Component, layer: int, T: int, heads: int | None) -> str:
    where = f"positions 0..{T - 1} (T={T})" if comp.site.has_time else "position 0 only (one value per call)"
    if heads is not None:
        where = f"{heads} heads ({comp.site.heads}, indices 0..{heads - 1}) and {where}"
    return f"pyvene component {comp.name!r} at layer {layer}: a unit location is out of range; this value has {where}"
