"""How each HF GDN class's forward calls its kernels, cache and decorators (`Convention`),
read from that forward itself, never from a version number; and the layout check."""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from typing import Any, NamedTuple

from .versions import install_hint


class Convention(NamedTuple):
    """How HF's forward of one GDN class calls its kernels and reads its cache, detected once
    per class from the forward itself (its signature, names and source), never from a version
    number. Fields, with the releases that showed each value:

    cache_kw: the forward's cache argument: `cache` (5.24 on) or `cache_params`.
    gqa_in_layer: q, k are repeated to the value heads before the kernel (before 5.23).
    kernels_on_instance: the kernels are instance attributes bound in `__init__`
        (`self.chunk_gated_delta_rule`, `self.causal_conv1d_fn`, ...: 4.57-5.14), not module-level
        functions (5.15 on).
    continues: a cached call of several tokens continues from the cached states (5.7 on);
        False: it restarts from zero states, as a prefill (4.57-5.6).
    kernel_kwargs: what of the forward's `**kwargs` reaches the kernels: "all" (5.15 on: the
        conv gets them, the delta-rule kernels `cu_seqlens` plus them), "packed" (5.9-5.14:
        the conv `seq_idx`, the chunk kernel `cu_seqlens`), "none" (4.57-5.8).
    decode_needs_position: a cached decode step also needs `cache_position` (4.57-5.3).
    extra_params: where the forward takes no `**kwargs` (4.57, 5.5), the names it takes besides
        the hidden states, the cache and the mask (4.57: `cache_position`); any other keyword is
        a TypeError, as in HF. None: it takes `**kwargs`.
    trim_with_cache: the conv output is cut to the last T positions on every cached call
        (5.15 on), not only where cached context was prepended (5.10) or never (4.57, 5.5).
        A no-op on the values, not on the gradient's layout.
    conv_helper: the conv runs through the modeling module's shared `causal_conv1d_forward`
        (5.25 on), which decides the decode step (asking `is_recording_past`, KDA too), counts
        the layer's tokens (`cache.increase_count`) and trims.
    keeps_states: a non-decode cached call keeps `cache.get_recurrent_states_to_keep(i)`
        intermediate states (5.25 on): the chunk kernel runs on the first T - N positions (even
        zero of them), then N single-token recurrent calls, and the cache gets the N states.
    conv_keywords: HF passes the conv kernels `weight=`, `bias=`, `activation=` by keyword
        (OLMo-Hybrid, KDA before 5.25), not positionally (a hub kernel sees the call as made).
    kernel_routing: HF's forward runs inside kernels' `use_kernelized_func` wrapper, which
        routes the module-level kernel objects to the instance's own copies
        (`self._kernel_funcs`, what `kernelize` replaces) (5.25 on); `kernels.kernel_router`.
    """

    cache_kw: str = "cache"
    gqa_in_layer: bool = False
    kernels_on_instance: bool = False
    continues: bool = True
    kernel_kwargs: str = "all"
    decode_needs_position: bool = False
    trim_with_cache: bool = True
    extra_params: tuple[str, ...] | None = None
    conv_helper: bool = False
    keeps_states: bool = False
    conv_keywords: bool = False
    kernel_routing: bool = False


@functools.cache
def convention(cls: type, chunk_kernel: str = "torch_chunk_gated_delta_rule") -> Convention:
    """The `Convention` of HF GDN class `cls` (`chunk_kernel`: the family's module-level chunk
    kernel). Without HF's source (a bytecode-only install) the newest shape is assumed for what
    only the source tells; the first-call self-check catches a mismatch."""
    fwd = undecorated(cls.forward)
    params = inspect.signature(fwd).parameters
    on_instance = (
        chunk_kernel not in fwd.__code__.co_names and chunk_kernel.removeprefix("torch_") in fwd.__code__.co_names
    )
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    names = fwd.__code__.co_names
    base = Convention(
        conv_helper="causal_conv1d_forward" in names,
        keeps_states="get_recurrent_states_to_keep" in names,
        kernel_routing=kernelized_wrapper(cls.forward) is not None,
        cache_kw="cache" if "cache" in params else "cache_params",
        kernels_on_instance=on_instance,
        kernel_kwargs="all" if takes_kwargs else "none",
        extra_params=None
        if takes_kwargs
        else tuple(n for n in params if n not in ("self", "hidden_states", "cache", "cache_params", "attention_mask")),
    )
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fwd)))
    except (OSError, TypeError, SyntaxError):
        return base
    src = ast.unparse(tree)
    decides = [
        ast.unparse(n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "use_precomputed_states" for t in n.targets)
    ]
    restarts = any("seq_len == 1" in d for d in decides)
    chunk_calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and _callee(n) in (chunk_kernel, chunk_kernel.removeprefix("torch_"))
    ]
    keywords = {k.arg for c in chunk_calls for k in c.keywords}
    if base.kernel_kwargs == "all" and chunk_calls and None not in keywords:  # no `**kwargs` on to the kernel
        kernel_kwargs = "packed" if "cu_seqlens" in keywords else "none"
    else:
        kernel_kwargs = base.kernel_kwargs
    trims_after_context = any(
        "-seq_len" in ast.unparse(n.body[0]) and "use_precomputed_states" in ast.unparse(n.test)
        for n in ast.walk(tree)
        if isinstance(n, ast.If) and len(n.body) == 1
    )
    conv_calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and _callee(n) in ("causal_conv1d_fn", "causal_conv1d_update")
    ]
    return base._replace(
        conv_keywords=any(k.arg == "weight" for c in conv_calls for k in c.keywords),
        gqa_in_layer="repeat_interleave" in src,
        trim_with_cache=not restarts and not trims_after_context,
        continues=not restarts,
        kernel_kwargs=kernel_kwargs,
        decode_needs_position=any("cache_position" in d for d in decides),
    )


def _callee(call: ast.Call) -> str | None:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def route_kwargs(
    conv: Convention, kwargs: dict, packed_kwarg: bool, hf_name: str = "forward"
) -> tuple[dict, dict, dict]:
    """(conv, chunk, recurrent) keyword arguments from the forward's `kwargs`, as HF's forward
    passes them (see `Convention.kernel_kwargs`; `packed_kwarg`: the family's kernels take
    `cu_seq_lens_q` as `cu_seqlens`). A keyword HF's forward does not take is HF's TypeError
    (`hf_name`: its class's name), never silently dropped."""
    if conv.extra_params is not None:
        for k in kwargs:
            if k not in conv.extra_params:
                raise TypeError(f"{hf_name}.forward() got an unexpected keyword argument '{k}'")
    if conv.kernel_kwargs == "none":
        return {}, {}, {}
    if conv.kernel_kwargs == "packed":
        return {"seq_idx": kwargs.get("seq_idx")}, {"cu_seqlens": kwargs.get("cu_seq_lens_q")}, {}
    rest = dict(kwargs)
    packed = {"cu_seqlens": rest.pop("cu_seq_lens_q", None)} if packed_kwarg else {}
    delta = {**packed, **rest}
    return kwargs, delta, delta


def wrapped_chain(fn) -> list:
    """`fn` and every function it wraps: through `__wrapped__` (functools.wraps) and through
    closure cells holding a function (decorators that do not use wraps, e.g. kernels'
    `use_kernelized_func` around `__init__`), outermost first."""
    chain, todo = [], [fn]
    while todo and len(chain) < 16:
        f = todo.pop()
        if not inspect.isfunction(f) or f in chain:
            continue
        chain.append(f)
        todo.extend(c.cell_contents for c in (f.__closure__ or ()) if _cell_is_function(c))
        if getattr(f, "__wrapped__", None) is not None:
            todo.append(f.__wrapped__)
    return chain


def _cell_is_function(cell) -> bool:
    try:
        return inspect.isfunction(cell.cell_contents)
    except ValueError:  # an empty cell
        return False


def kernelized_wrapper(fn):
    """The function in `fn`'s wrapper chain that is kernels' `use_kernelized_func` forward
    wrapper (its closure holds `orig_forward` and the decorator's kernel objects), or None."""
    for f in wrapped_chain(fn):
        free = f.__code__.co_freevars
        if "orig_forward" in free and "decorator_args" in free:
            return f
    return None


def layout_gap(cls: type, attrs: tuple[str, ...], since: str | None) -> str | None:
    """Why HF GDN class `cls` has a layout the decomposed forward cannot serve (None if it can),
    in one line naming the class, the release, the tested range and the install that works:
    its `__init__` (the original behind any decorator) must create every submodule in `attrs`
    (e.g. OLMo-Hybrid's one fused `conv1d`, which 5.3-5.14 split into q/k/v convs). `since`:
    the first release with that layout."""
    made = set()
    for c in cls.__mro__:
        init = vars(c).get("__init__")
        if inspect.isfunction(init) and c.__module__.startswith("transformers."):
            for f in wrapped_chain(init):
                made.update(f.__code__.co_names)
    missing = [a for a in attrs if a not in made]
    if not missing:
        return None
    import transformers

    first = f"; this layout is served from transformers {since} on" if since else ""
    return (
        f"{cls.__name__} on transformers {transformers.__version__} has no {', '.join(missing)}, a GDN layout "
        f"gdn_intervene does not know{first} ({install_hint()})"
    )


# --- how HF's GDN forward is called, and what it leaves to the layer ---


def repeat_heads(q, k, num_v_heads: int):
    """q, k [B, T, HK, K] -> [B, T, HV, K], each key head serving HV/HK consecutive value heads."""
    r = num_v_heads // q.shape[2]
    if r == 1:
        return q, k
    return q.repeat_interleave(r, dim=2), k.repeat_interleave(r, dim=2)


def force_accelerate_hooks(names: list[str]):
    """HF's decorator (5.13 on; the same here before): the forward reads `self.conv1d.weight`
    without calling conv1d, so accelerate's offload hooks of those children must be fired by
    hand, before the forward and (reversed) after it."""
    try:
        from transformers.integrations.accelerate import force_accelerate_hooks as hf_decorator
    except ImportError:
        pass
    else:
        return hf_decorator(names)

    def decorator(forward):
        @functools.wraps(forward)
        def wrapped(self, *args, **kwargs):
            hooked = [(m, getattr(m, "_hf_hook", None)) for m in (getattr(self, n) for n in names)]
            for m, hook in hooked:
                if hook is not None:
                    hook.pre_forward(m)
            out = forward(self, *args, **kwargs)
            for m, hook in reversed(hooked):
                if hook is not None:
                    hook.post_forward(m, None)
            return out

        return wrapped

    return decorator


def deprecate_cache_params(fn, hf_cls: type | None = None):
    """Accept the cache under both names. Where HF's forward takes `cache` (5.24 on), as HF
    does: `cache_params` with a deprecation warning. Where it takes `cache_params` (before),
    silently: that is what HF's own decoder layers pass."""
    if hf_cls is None or convention(hf_cls).cache_kw == "cache":
        from transformers.utils.deprecation import deprecate_kwarg

        return deprecate_kwarg("cache_params", "5.40.0", new_name="cache")(fn)

    @functools.wraps(fn)
    def renamed(self, *args, **kwargs):
        if "cache_params" in kwargs:
            kwargs["cache"] = kwargs.pop("cache_params")
        return fn(self, *args, **kwargs)

    return renamed


def model_kwargs(model, kwargs: dict) -> dict:
    """`kwargs` for `model`'s forward, with a `cache=` renamed to `past_key_values=` where the
    forward predates the `cache` name (before 5.24): those forwards take `**kwargs` and would
    drop it silently, running without the cache."""
    if "cache" not in kwargs or "past_key_values" in kwargs:
        return kwargs
    forward = getattr(type(model), "forward", None)
    if forward is None or "cache" in inspect.signature(forward).parameters:
        return kwargs
    kwargs = dict(kwargs)
    kwargs["past_key_values"] = kwargs.pop("cache")
    return kwargs


def cache_kwarg(kwargs: dict) -> Any:
    """The cache a GDN forward was called with: `cache`, or its pre-5.24 name `cache_params`."""
    return kwargs.get("cache", kwargs.get("cache_params"))


CHUNK_KERNEL_NAMES = ("torch_chunk_gated_delta_rule", "chunk_gated_delta_rule")


def undecorated(fn, name: str = "forward"):
    """`fn` (a method called `name`) without its decorators (HF's force_accelerate_hooks,
    deprecate_kwarg): through `__wrapped__` where the decorator used functools.wraps, else
    through the one closure cell holding a function (force_accelerate_hooks before 5.20 does
    not wrap)."""
    for _ in range(8):
        fn = inspect.unwrap(fn)
        if fn.__name__ == name:
            return fn
        inner = [c.cell_contents for c in (fn.__closure__ or ()) if inspect.isfunction(c.cell_contents)]
        if len(inner) != 1:
            return fn
        fn = inner[0]
    return fn
