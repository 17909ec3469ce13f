"""Differential testing (issue 27): hypothesis draws whole researcher workflows and checks each
against an independent reference that shares no code with the decomposed forward.

The reference of an edit is HF's UNPATCHED model with the same edit applied where HF's own
forward holds that value (`HFEdit`, below): the kernel's arguments (q, k, v, beta, g) and
results (o, S) through the modeling module's kernel names (as `reference.kernel_edit`), the
causal conv's result through its `causal_conv1d_forward`, the projections' outputs (pre-conv
q/k/v, beta and decay logits) and the gated norm's gate, output and the output projection
through hooks on HF's own modules. Where a feature has no HF counterpart the reference is HF's
model run another way (the state after a position: a cached run in segments, the state
overwritten in HF's cache between them), HF's own caches, or the patched model without the
feature under test (gradient checkpointing).

What is drawn (the strategies): family (every one `tests/models.py` builds), hv_ratio, T (1 to
300, the chunk edges 63/64/65/128/129 weighted; long sequences rare), batch 1-3 with left
padding, fp32/bf16, GDN layer, site, edit (zero, scale, add, replace from another prompt, copy
from another row; on positions and heads; in place or returned; a stateful callback that acts
on chosen firings only), and per path its own knobs. One checker per path:

    forward        prefill (+ a decode step reading the cache)   bitwise: logits, every cache field
    cached loop    prefill, then cached calls of 1 or more tokens (a recording cache keeping N
                   states included)                              bitwise, after every call
    generate       greedy, beam, prompt lookup, assisted          bitwise: tokens and step logits
    state_at       split after positions, state edits             1e-4 relative (see the checker)
    backward       with and without checkpointing, inside and after the block: bitwise against
                   the same model without checkpointing; against HF: the loss bitwise
    nnsight        a trace with 2-3 invokes, activation patching between them   bitwise
    pyvene         a VanillaIntervention (pos or h.pos) on a GDN component       bitwise
    analysis       effective attention / states / attribution with a given `cache=`: HF's own
                   kernel output, state and layer output (1e-5 relative fp32), the cache unchanged
    tracing        causal_trace vs attribution_patching on drawn layer orders: cells paired by
                   (site, layer, position), a causal-trace cell recomputed on HF's model, NaN only
                   where documented, strict JSON

Invariants of every example: no hook left behind (on either model), no `state_at` left open,
inference mode gives the no-grad numbers. Comparisons are bitwise where patched and reference
take the same kernel path (`same`), else a stated tolerance.

Profiles (tests/conftest.py): "ci" (the default: 40 examples in all per test, a fixed seed, about
a minute on 2 cores), "soak" (`pytest tests/test_differential.py --hypothesis-profile=soak`: 300,
new seeds each run, about 3 minutes) and "long" (2000: about half an hour). Each test takes its share of the
profile's `max_examples` (`examples`). Every failure this suite finds becomes a named test in
tests/test_regressions.py.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import json
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from conftest import cache_kw, ids_for  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from models import GQA, MODELS, VOCAB, build  # noqa: E402
from reference import KERNELS, hf_gdn  # noqa: E402

import gdn_intervene as gi  # noqa: E402
from gdn_intervene.hooking import scope  # noqa: E402


def _recording_cache() -> bool:
    from transformers import DynamicCache

    return hasattr(DynamicCache, "get_recurrent_states_to_keep")


# The references read HF's cache through the 5.25 API (recording caches, kept states, the
# per-layer token count); older releases keep their bitwise checks in the compat files.
pytestmark = pytest.mark.skipif(
    not _recording_cache(), reason="the differential suite's references need transformers 5.25's cache API"
)

NAMES = tuple(MODELS)
TORCH_KERNELS = {name: ("chunk" in name) for name in KERNELS}  # name -> is the chunk kernel
KERNEL_ARG = {"q": "q", "k": "k", "v": "v", "beta": "beta", "decay": "g"}
# The head axis of each site's value (None: no head axis), as the README's sites table states it.
HEAD_AXIS = {
    "q_pre_conv": 2, "k_pre_conv": 2, "v_pre_conv": 2, "conv": None, "q": 2, "k": 2, "v": 2, "beta_logit": 2,
    "beta": 2, "decay_logit": 2, "decay": 2, "state": 1, "recurrence": 2, "gate": 2, "norm": 2, "out_proj": None,
}  # fmt: skip
TIMED = tuple(s for s in HEAD_AXIS if s != "state")
# Sites HF computes inside one fused projection (Qwen3-Next's in_proj_qkvz / in_proj_ba): no HF
# module holds them alone, so they have no reference there.
FUSED = {"q_pre_conv", "k_pre_conv", "v_pre_conv", "beta_logit", "decay_logit"}


# ----------------------------------------------------------------------------- models, budget


@functools.cache
def _built(name: str, hv_ratio: int, dtype: torch.dtype):
    ref = build(name, hv_ratio=hv_ratio, dtype=dtype)
    patched = gi.patch(copy.deepcopy(ref))
    _BASELINE[id(patched)] = _hook_counts(patched)
    _BASELINE[id(ref)] = _hook_counts(ref)
    return patched, ref


_BASELINE: dict[int, list[int]] = {}  # id(model) -> its modules' hook counts when built


def _hook_counts(model) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def models(name: str, hv_ratio: int = 1, dtype: torch.dtype = torch.float32):
    """(patched, unpatched) tiny models of `name`, built once per process; no hook on either."""
    patched, ref = _built(name, hv_ratio, dtype)
    check_clean(patched, ref)
    fresh(patched, ref)
    return patched, ref


def fresh(*ms) -> None:
    """Forget per-call state a model keeps across calls (the multimodal Qwen3.5's mrope deltas)."""
    for model in ms:
        for m in model.modules():
            if getattr(m, "rope_deltas", None) is not None:
                m.rope_deltas = None


def check_clean(*ms) -> None:
    """The invariants every example leaves behind: no hook on any model beyond those it had when
    built, no global hook, no capture / intervention / state_at open, no split left set."""
    for model in ms:
        assert _hook_counts(model) == _BASELINE[id(model)], f"a hook was left on {type(model).__name__}"
        if any(isinstance(m, gi.layer.GDNMixin) for m in model.modules()):
            assert all(not gi.gdn_layer(model, l).state_positions for l in gi.gdn_layers(model))
    assert not torch.nn.modules.module._global_forward_hooks and not torch.nn.modules.module._global_forward_pre_hooks
    assert not scope.open_threads(), "a capture, intervention or state_at block was left open"


def examples(share: float):
    """`settings` with this test's share of the loaded profile's max_examples (40 in "ci",
    300 in "soak", 2000 in "long"), so `--hypothesis-profile=long` scales every test."""
    return settings(max_examples=max(1, round(settings.default.max_examples * share)))


# ----------------------------------------------------------------------------- the edit


@dataclass(frozen=True)
class Edit:
    """One edit a researcher writes for site `site` of GDN layer `layer`.

    kind: "zero", "scale" (by `amount`), "add" (`amount`), "replace" (by the value of another
    prompt, `src`, at the positions it has), "copy_row" (rows `rows` take row `from_row`'s value: activation patching
    inside one batch). positions: call-relative token positions (negative: from the end; None:
    all); heads, rows: None for all. firings: the firings it acts on (a stateful callback that
    counts them; None: every firing). in_place: the callback edits the value in place and
    returns None, else it returns a new tensor.
    """

    layer: int
    site: str
    kind: str
    amount: float = 0.0
    positions: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    rows: tuple[int, ...] | None = None
    from_row: int = 0
    firings: frozenset[int] | None = None
    in_place: bool = False

    def acts_on(self, firing: int) -> bool:
        return self.firings is None or firing in self.firings

    def mask(self, x: torch.Tensor, offset: int, T: int) -> torch.Tensor:
        """Where the edit lands in `x`, which holds positions [offset, offset + x.shape[1]) of a
        call of T tokens (a kernel call of HF's may hold a part of the layer call)."""
        m = torch.ones(x.shape, dtype=torch.bool)
        if self.site != "state" and self.positions is not None:
            t = torch.zeros(x.shape[1], dtype=torch.bool)
            for p in self.positions:
                if -T <= p < T and offset <= p % T < offset + x.shape[1]:
                    t[p % T - offset] = True
            m &= t.view(1, -1, *[1] * (x.dim() - 2))
        axis = HEAD_AXIS[self.site]
        if self.heads is not None and axis is not None:
            h = torch.zeros(x.shape[axis], dtype=torch.bool)
            h[[i for i in self.heads if i < x.shape[axis]]] = True
            m &= h.view(*[1] * axis, -1, *[1] * (x.dim() - axis - 1))
        if self.rows is not None:
            r = torch.zeros(x.shape[0], dtype=torch.bool)
            r[[i for i in self.rows if i < x.shape[0]]] = True
            m &= r.view(-1, *[1] * (x.dim() - 1))
        return m

    def apply(self, x: torch.Tensor, src: torch.Tensor | None = None, offset: int = 0, T: int | None = None):
        """The edited value (a new tensor). src: the other prompt's value of the whole call."""
        T = x.shape[1] if T is None else T
        if self.kind == "zero":
            new = torch.zeros_like(x)
        elif self.kind == "scale":
            new = x * self.amount
        elif self.kind == "add":
            new = x + self.amount
        elif self.kind == "replace":  # positions the other prompt has (a call may be longer)
            new = src if self.site == "state" else x.clone()
            if self.site != "state":
                n = max(0, min(x.shape[1], src.shape[1] - offset))
                new[:, :n] = src[:, offset : offset + n]
        elif self.kind == "copy_row":
            new = x[self.from_row : self.from_row + 1].expand_as(x)
        else:
            raise ValueError(self.kind)
        return torch.where(self.mask(x, offset, T), new, x)

    def write(self, x: torch.Tensor, src=None, offset: int = 0, T: int | None = None) -> torch.Tensor:
        """What the callback leaves: `x` itself, edited in place (its layout kept), or the new
        tensor it returns. The reference does the same to HF's value in HF's layout: the layout
        reaches the kernels, and their last bits depend on it."""
        y = self.apply(x, src, offset, T)
        return x.copy_(y) if self.in_place else y

    def callback(self, src: torch.Tensor | None = None) -> Callable:
        """The `gi.intervene` callback a researcher writes: counts the site's firings and edits
        those in `firings`."""
        count = itertools.count()

        def edit(x):
            if not self.acts_on(next(count)):
                return None
            y = self.write(x, src)
            return None if self.in_place else y

        return edit


# ----------------------------------------------------------------------------- the reference


def _cache_of(kwargs: dict):
    return next((kwargs[k] for k in ("cache", "cache_params", "past_key_values") if kwargs.get(k) is not None), None)


def _norm(mod):
    return mod.norm if hasattr(mod, "norm") else mod.o_norm


def _out(mod):
    return mod.out_proj if hasattr(mod, "out_proj") else mod.o_proj


def _projection(mod, site: str):
    """(HF's module whose output holds `site`, how to cut the site out of it, how to put it
    back): the pre-conv q/k/v and the beta and decay logits, read off HF's own projections."""
    B_T = lambda y: y.shape[:2]  # noqa: E731
    if site in ("beta_logit", "decay_logit"):
        if site == "beta_logit":
            m = getattr(mod, "in_proj_b", None) or mod.b_proj
        elif hasattr(mod, "forget_gate"):  # KDA: the forget gate's projection, before dt_bias
            fg = mod.forget_gate
            m = fg.f_b_proj if hasattr(fg, "f_b_proj") else fg.f_proj
        else:
            m = getattr(mod, "in_proj_a", None) or mod.a_proj
        heads = mod.num_v_heads if hasattr(mod, "num_v_heads") else mod.num_heads
        return m, (lambda y: y.view(*B_T(y), heads, -1) if y.shape[-1] != heads else y), (lambda y, e: e.view(y.shape))
    part = "qkv".index(site[0])
    if hasattr(mod, "in_proj_qkv"):  # one projection, [q | k | v]
        sizes = [mod.key_dim, mod.key_dim, mod.value_dim]
        dims = [mod.head_k_dim, mod.head_k_dim, mod.head_v_dim]
        start = sum(sizes[:part])

        def cut(y):
            return y[..., start : start + sizes[part]].reshape(*B_T(y), -1, dims[part])

        def put(y, e):
            return torch.cat([y[..., :start], e.reshape(*B_T(y), -1), y[..., start + sizes[part] :]], dim=-1)

        return mod.in_proj_qkv, cut, put
    m = (mod.q_proj, mod.k_proj, mod.v_proj)[part]
    dim = getattr(mod, "head_k_dim" if part < 2 else "head_v_dim", None) or mod.head_dim
    return m, (lambda y: y.view(*B_T(y), -1, dim)), (lambda y, e: e.reshape(y.shape))


class HFEdit:
    """HF's unpatched model with edits applied where HF's own forward holds each value, at GDN
    layer `layer`; also records those values (`record`: {site: [value per firing]}).

    The kernels are found by name in the layer's modeling module (`reference.KERNELS`), as HF's
    forward looks them up. HF's sequence per layer call: a decode step (cached, T = 1) runs the
    recurrent kernel; else the chunk kernel on the first T - N positions, then N recurrent steps
    (a recording cache keeping N states). So a kernel call holds positions [offset, offset + len)
    of the call, and the state HF returns fires as the patched `state` site's rule says: the
    recurrent step's in a decode, each kept step's with N > 0, else the chunk kernel's (None
    without a cache: HF asks for no state then, and nothing reads it). Token sites fire once per
    layer call."""

    def __init__(self, model, layer: int, edits=(), src: dict | None = None, record: bool = False):
        self.model, self.layer, self.edits, self.src = model, layer, list(edits), src or {}
        self.record: dict[str, list] = {} if record else None
        self.call: dict = {"active": False}
        self.firings: dict[str, int] = {}

    def _state(self, S):
        """A state HF's kernel returned that the layer keeps (one firing), edited."""
        n = self.firings.get("state", 0)
        self.firings["state"] = n + 1
        if S is None:  # HF asks for no state without a cache; the firing still counts
            return S
        if self.record is not None:
            self.record.setdefault("state", []).append(S.detach().clone())
        for e in self.edits:
            if e.site == "state" and e.acts_on(n):
                S = e.write(S, self.src.get("state"))
        return S

    def _pre(self, mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        cache, T = _cache_of(kwargs), x.shape[1]
        decode = cache is not None and T == 1 and cache.get_recurrent_state(self.layer) is not None
        keep = getattr(cache, "get_recurrent_states_to_keep", lambda l: 0)(self.layer) if cache is not None else 0
        N = 0 if cache is None or decode else min(keep, T)
        self.call = {"active": True, "T": T, "B": x.shape[0], "N": N, "decode": decode, "steps": 0, "parts": {}}
        for s in TIMED:  # token sites: one firing per layer call, counted once (kernel calls share it)
            self.call[s] = self.firings.get(s, 0)
            self.firings[s] = self.call[s] + 1

    def _post(self, *_):
        self.call["active"] = False
        for site, parts in self.call["parts"].items():  # a kernel argument or result held in parts
            self.record.setdefault(site, []).append(torch.cat([x for _, x in sorted(parts, key=lambda p: p[0])], 1))

    def _token(self, site: str, x, offset: int = 0):
        """A token site's value (or the part of it a kernel call holds), edited."""
        n = self.call[site]
        if self.record is not None:  # as the site sees it: before the edit
            self.call["parts"].setdefault(site, []).append((offset, x.detach().clone()))
        for e in self.edits:
            if e.site == site and e.acts_on(n):
                x = e.write(x, self.src.get(site), offset, self.call["T"])
        return x

    def _kernel(self, fn, chunk: bool):
        def kernel(q, k, v, **kw):
            if not self.call["active"]:
                return fn(q, k, v, **kw)
            c = self.call
            offset = 0 if chunk or c["decode"] else c["T"] - c["N"] + c["steps"]
            kw = dict(q=q, k=k, v=v, **kw)
            for site, arg in KERNEL_ARG.items():
                kw[arg] = self._token(site, kw[arg], offset)
            o, S = fn(kw.pop("q"), kw.pop("k"), kw.pop("v"), **kw)
            o = self._token("recurrence", o, offset)
            if not chunk and not c["decode"]:
                c["steps"] += 1
            if chunk != (c["decode"] or c["N"] > 0):  # this call's state is one the layer keeps
                S = self._state(S)
            return o, S

        return kernel

    def _conv(self, fn):
        def conv(*args, **kw):
            out = fn(*args, **kw)
            if not self.call["active"]:
                return out
            return self._token("conv", out.transpose(1, 2)).transpose(1, 2)  # HF's [B, C, T]

        return conv

    def _hooks(self, mod) -> list:
        handles = [
            mod.register_forward_pre_hook(self._pre, with_kwargs=True),
            mod.register_forward_hook(self._post),
        ]

        def flat(site):  # HF may hold a [B, T, HV, V] value flattened to [B * T * HV, V]
            def edit(y):
                B, T = self.call["B"], self.call["T"]
                return self._token(site, y.reshape(B, T, -1, y.shape[-1])).reshape(y.shape)

            return edit

        gate, norm = flat("gate"), flat("norm")
        handles.append(_norm(mod).register_forward_pre_hook(lambda m, a: (a[0], gate(a[1]), *a[2:])))
        handles.append(_norm(mod).register_forward_hook(lambda m, a, y: norm(y)))
        handles.append(_out(mod).register_forward_hook(lambda m, a, y: self._token("out_proj", y)))
        if not hasattr(mod, "in_proj_qkvz"):  # Qwen3-Next fuses these (FUSED)
            by_module: dict = {}
            for site in sorted(FUSED):
                m, cut, put = _projection(mod, site)
                by_module.setdefault(m, []).append((site, cut, put))
            for m, parts in by_module.items():

                def hook(_, a, y, parts=parts):
                    for site, cut, put in parts:
                        y = put(y, self._token(site, cut(y)))
                    return y

                handles.append(m.register_forward_hook(hook))
        return handles

    def __enter__(self):
        mod = hf_gdn(self.model, self.layer)
        if hasattr(mod, "in_proj_qkvz") and (fused := sorted({e.site for e in self.edits} & FUSED)):
            # no HF value to edit: a silently unedited reference would make the check vacuous
            raise ValueError(f"HFEdit: Qwen3-Next's fused projection holds no {fused} of its own")
        ns = vars(sys.modules[type(mod).__module__])
        self._saved = {n: ns[n] for n in (*KERNELS, "causal_conv1d_forward") if n in ns}
        for n, fn in self._saved.items():
            ns[n] = self._conv(fn) if n == "causal_conv1d_forward" else self._kernel(fn, "chunk" in n)
        self._ns, self._handles = ns, self._hooks(mod)
        return self

    def __exit__(self, *exc):
        self._ns.update(self._saved)
        for h in self._handles:
            h.remove()


@contextlib.contextmanager
def hf_edits(ref, edits, src: dict | None = None):
    """`HFEdit` for each layer the edits touch (src: {(layer, site): the other prompt's value})."""
    src = src or {}
    with contextlib.ExitStack() as stack:
        for layer in sorted({e.layer for e in edits}):
            mine = [e for e in edits if e.layer == layer]
            stack.enter_context(HFEdit(ref, layer, mine, {e.site: src.get((layer, e.site)) for e in mine}))
        yield


def intervene(patched, edits, src: dict | None = None):
    """`gi.intervene` with each edit's callback (what a researcher writes)."""
    src = src or {}
    return gi.intervene(patched, {(e.layer, e.site): e.callback(src.get((e.layer, e.site))) for e in edits})


# ----------------------------------------------------------------------------- comparisons


def same(a, b, what: str = "") -> None:
    """Bitwise: same shape, dtype and bits (NaN where the reference has NaN)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def cache_fields(cache) -> list[tuple[str, object]]:
    """Every field of every layer of a DynamicCache (tensors, ints, flags; dicts and lists walked
    in order): conv and recurrent states, kept states, the token count, attention keys/values."""
    out = []

    def walk(path, x):
        if isinstance(x, torch.Tensor):
            out.append((path, x.detach().clone()))
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(f"{path}[{k}]", x[k])
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{path}[{i}]", v)
        elif isinstance(x, (bool, int, float, str)) or x is None:
            out.append((path, x))

    for i, layer in enumerate(cache.layers):
        for k, v in sorted(vars(layer).items()):
            walk(f"layers[{i}].{k}", v)
    return out


def same_cache(a, b, what: str = "cache") -> None:
    fa, fb = (cache_fields(c) for c in (a, b))
    assert [p for p, _ in fa] == [p for p, _ in fb], what
    for (path, x), (_, y) in zip(fa, fb):
        if isinstance(x, torch.Tensor):
            same(x, y, f"{what} {path}")
        else:
            assert x == y, f"{what} {path}: {x!r} != {y!r}"


def new_cache(model):
    from conftest import new_cache as make

    return make(model)


def run(model, ids, mask=None, cache=None, **kw):
    """logits [B, T, vocab] of one call (`cache=` under the model's name for it)."""
    if cache is not None:
        kw[cache_kw(model)] = cache
        kw["use_cache"] = True
    else:
        kw.setdefault("use_cache", False)
    return model(input_ids=ids, attention_mask=mask, **kw).logits


# ----------------------------------------------------------------------------- strategies

EDGES = (1, 2, 63, 64, 65, 128, 129)


def lengths(max_T: int = 300, min_T: int = 1):
    """T: a chunk edge (1/4 of draws), short (1/2), anything up to max_T (1/4): long sequences
    are rare but present."""
    edges = [t for t in EDGES if min_T <= t <= max_T] or [min_T]
    short = st.integers(min_T, max(min_T, min(24, max_T)))
    return st.one_of(st.sampled_from(edges), short, short, st.integers(min_T, max_T))


@dataclass(frozen=True)
class Setup:
    """A family's tiny model and a batch of prompts: B rows of T tokens, row b left-padded by
    pads[b] tokens (a mask is passed where any row is padded)."""

    name: str
    hv_ratio: int
    dtype: torch.dtype
    T: int
    B: int
    pads: tuple[int, ...]
    seed: int

    def models(self):
        return models(self.name, self.hv_ratio, self.dtype)

    def ids(self, seed_offset: int = 0, T: int | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + seed_offset)
        return torch.randint(3, VOCAB, (self.B, self.T if T is None else T), generator=g)

    def mask(self) -> torch.Tensor | None:
        if not any(self.pads):
            return None
        m = torch.ones(self.B, self.T, dtype=torch.long)
        for b, n in enumerate(self.pads):
            m[b, :n] = 0
        return m

    def __repr__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return (
            f"Setup({self.name}, hv={self.hv_ratio}, {dt}, T={self.T}, B={self.B}, pads={self.pads}, seed={self.seed})"
        )


@st.composite
def setups(draw, max_T: int = 300, min_T: int = 1, max_B: int = 3, dtypes=(torch.float32, torch.bfloat16),
           names=NAMES, pad: bool = True):  # fmt: skip
    name = draw(st.sampled_from(names))
    hv = draw(st.sampled_from((1, 2))) if name in GQA else 1
    T = draw(lengths(max_T, min_T))
    B = draw(st.integers(1, max_B))
    pads = tuple(draw(st.lists(st.integers(0, T - 1), min_size=B, max_size=B))) if pad else (0,) * B
    if pad and draw(st.booleans()):
        pads = (0,) * B  # unpadded batches half the time
    return Setup(name, hv, draw(st.sampled_from(dtypes)), T, B, pads, draw(st.integers(0, 2**16)))


def sites_for(name: str, among=tuple(HEAD_AXIS)) -> list[str]:
    """The sites of `among` with a reference in this family (`FUSED`)."""
    return [s for s in among if not (name == "qwen3_next" and s in FUSED)]


@st.composite
def edits(draw, setup: Setup, layers, sites=tuple(HEAD_AXIS), kinds=("zero", "scale", "add", "replace", "copy_row"),
          n=(1, 2), firings: int = 1, positions_in: int | None = None):  # fmt: skip
    """1-2 edits at distinct (layer, site): kind, positions (call-relative; negative from the
    end), heads, rows, the firings a stateful callback acts on (among the first `firings`), in
    place or returned."""
    T = setup.T if positions_in is None else positions_in
    keys = draw(
        st.lists(
            st.tuples(st.sampled_from(sorted(layers)), st.sampled_from(sites_for(setup.name, sites))),
            min_size=n[0], max_size=n[1], unique=True,
        )
    )  # fmt: skip
    out = []
    for layer, site in keys:
        kind = draw(st.sampled_from([k for k in kinds if not (k == "copy_row" and setup.B == 1)
                                     and not (k == "add" and site == "beta")]))  # fmt: skip
        amount = 0.0
        if kind == "scale":
            amount = draw(st.sampled_from((0.5, 0.25) if site == "beta" else (0.5, 2.0, -1.0)))
        elif kind == "add":
            amount = draw(st.sampled_from((-0.5, -2.0) if site == "decay" else (-0.5, 0.25)))
        positions = None
        if site != "state" and draw(st.booleans()):
            positions = tuple(draw(st.lists(st.integers(-2, max(0, T - 1)), min_size=1, max_size=3, unique=True)))
        heads = draw(st.one_of(st.none(), st.sampled_from(((0,), (1,), (0, 1)))))
        rows = from_row = None
        if kind == "copy_row":
            from_row = draw(st.integers(0, setup.B - 1))
            rows = (draw(st.sampled_from([r for r in range(setup.B) if r != from_row])),)
        elif setup.B > 1 and draw(st.booleans()):
            rows = (draw(st.integers(0, setup.B - 1)),)
        fire = None
        if kind == "replace":
            fire = frozenset({0})  # the other prompt's value belongs to the prefill
        elif firings > 1 and draw(st.booleans()):
            fire = frozenset(draw(st.lists(st.integers(0, firings - 1), min_size=1, max_size=firings, unique=True)))
        out.append(Edit(layer, site, kind, amount, positions, heads, rows, from_row or 0, fire, draw(st.booleans())))
    return out


def sources(setup: Setup, edits, patched, ref, mask) -> tuple[dict, dict]:
    """The other prompt's values the "replace" edits put in, each model's own: the patched
    model's from `gi.capture`, HF's from its own forward (`HFEdit(record=True)`); they must
    agree bitwise (a read check). {(layer, site): value of the prefill}."""
    keys = sorted({(e.layer, e.site) for e in edits if e.kind == "replace"})
    if not keys:
        return {}, {}
    other = setup.ids(seed_offset=1)
    layers, names = sorted({l for l, _ in keys}), sorted({s for _, s in keys})
    with torch.no_grad(), gi.capture(patched, sites=names, layers=layers) as cap:
        run(patched, other, mask, cache=new_cache(patched))
    mine, theirs = {}, {}
    for layer in layers:
        with torch.no_grad(), HFEdit(ref, layer, record=True) as h:
            run(ref, other, mask, cache=new_cache(ref))
        for l, s in keys:
            if l == layer:
                mine[l, s], theirs[l, s] = cap[l, s][0], h.record[s][0]
                same(mine[l, s], theirs[l, s], f"layer {l} {s} read from the other prompt")
    return mine, theirs


GRAD_MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


# ============================================================================= paths
# ----------------------------------------------------------------------------- forward, cached loop


def check_calls(setup: Setup, edits, continuation=(), cached: bool = False, keep: int = 0, mode: str = "no_grad"):
    """A prefill, then cached calls of `continuation` tokens each (a recording cache keeping
    `keep` states from the second call on, as assisted generation and prompt lookup make),
    with `edits` open throughout. Reference: HF's model, the same edits at HF's values
    (`hf_edits`), always under no_grad. Bitwise: logits and every cache field after every call."""
    patched, ref = setup.models()
    mask, ids = setup.mask(), setup.ids()
    src_p, src_r = sources(setup, edits, patched, ref, mask)
    more = [setup.ids(seed_offset=2 + i, T=n) for i, n in enumerate(continuation)]

    def drive(model):
        cache = new_cache(model) if cached or more else None
        m, outs = mask, [run(model, ids, mask, cache)]
        fields = [cache_fields(cache) if cache is not None else []]
        if keep:
            cache.activate_past_recording(recurrent_states_to_keep=keep)
        for x in more:
            m = None if m is None else torch.cat([m, torch.ones_like(x)], 1)
            outs.append(run(model, x, m, cache))
            fields.append(cache_fields(cache))
        return outs, fields

    with GRAD_MODES[mode](), intervene(patched, edits, src_p):
        got, got_fields = drive(patched)
    with torch.no_grad(), hf_edits(ref, edits, src_r):
        want, want_fields = drive(ref)
    check_clean(patched, ref)
    for i, (a, b) in enumerate(zip(got, want)):
        same(a, b, f"logits of call {i}")
    for i, (fa, fb) in enumerate(zip(got_fields, want_fields)):
        assert [p for p, _ in fa] == [p for p, _ in fb]
        for (path, x), (_, y) in zip(fa, fb):
            if isinstance(x, torch.Tensor):
                same(x, y, f"cache after call {i}: {path}")
            else:
                assert x == y, f"cache after call {i}: {path}: {x!r} != {y!r}"
    return got, want


def _layers(setup: Setup):
    return tuple(gi.gdn_layers(setup.models()[0]))


@st.composite
def forward_workflows(draw):
    setup = draw(setups())
    cached = draw(st.booleans())
    return dict(
        setup=setup,
        edits=draw(edits(setup, _layers(setup), firings=2)),
        continuation=(1,) if cached else (),
        cached=cached,
        mode=draw(st.sampled_from(sorted(GRAD_MODES))),
    )


@examples(1.0)
@given(forward_workflows())
def test_forward(w):
    """A prefill with 1-2 edits (and with a cache, one decode step that reads the edited cache),
    under no_grad or inference_mode; reference: HF's model with the same edits."""
    check_calls(**w)


@st.composite
def loop_workflows(draw):
    setup = draw(setups(max_T=140))
    continuation = tuple(draw(st.lists(st.one_of(st.just(1), st.just(1), st.integers(2, 6)), min_size=1, max_size=4)))
    return dict(
        setup=setup,
        edits=draw(edits(setup, _layers(setup), firings=1 + len(continuation))),
        continuation=continuation,
        cached=True,
        keep=draw(st.sampled_from((0, 0, 1, 2, 3))),
        mode=draw(st.sampled_from(sorted(GRAD_MODES))),
    )


@examples(1.0)
@given(loop_workflows())
def test_cached_loop(w):
    """A prefill, then 1-4 cached calls of 1 token (decode steps) or 2-6 (continuations), by
    hand; the cache records N = 0-3 kept states from the second call on; stateful callbacks act
    on chosen firings. Reference: HF's model, the same edits, its own cache."""
    check_calls(**w)


# ----------------------------------------------------------------------------- generate


@functools.cache
def _assistants(name: str, hv_ratio: int, dtype: torch.dtype):
    """(patched, unpatched) assistant of another seed, for assisted generation."""
    ref = build(name, hv_ratio=hv_ratio, dtype=dtype, seed=1)
    patched = gi.patch(copy.deepcopy(ref))
    _BASELINE[id(patched)], _BASELINE[id(ref)] = _hook_counts(patched), _hook_counts(ref)
    return patched, ref


GENERATE = ("greedy", "beam", "prompt_lookup", "assisted")


@st.composite
def generate_workflows(draw):
    how = draw(st.sampled_from(GENERATE))
    one = how in ("prompt_lookup", "assisted")  # HF's candidate generators take one row
    setup = draw(setups(max_T=70, max_B=1 if one else 3))
    kinds = ("zero", "scale", "add", "copy_row") if how == "beam" else ("zero", "scale", "add", "replace", "copy_row")
    return dict(
        setup=setup,
        how=how,
        new=draw(st.integers(1, 6)),
        beams=draw(st.integers(2, 3)),
        edits=draw(edits(setup, _layers(setup), kinds=kinds, firings=4)),
    )


@examples(1.0)
@given(generate_workflows())
def test_generate(w):
    """`generate` (greedy, beam search, prompt lookup, assisted by a model of another seed) with
    edits open: every prefill, decode step and verify forward of the target is edited (a
    stateful callback: the chosen firings). Reference: HF's generate of the unpatched model
    (and unpatched assistant) with the same edits. Bitwise: tokens and every step's logits."""
    setup, how, new, beams, edits = (w[k] for k in ("setup", "how", "new", "beams", "edits"))
    patched, ref = setup.models()
    mask, ids = setup.mask(), setup.ids()
    if how == "prompt_lookup":  # a prompt that repeats itself, so lookups find candidates
        half = ids[:, : (setup.T + 1) // 2]
        ids = torch.cat([half, half], 1)[:, : setup.T]
    src_p, src_r = sources(setup, edits, patched, ref, mask)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True, attention_mask=mask)  # fmt: skip
    extra = {"beam": lambda a: dict(num_beams=beams), "prompt_lookup": lambda a: dict(prompt_lookup_num_tokens=3),
             "assisted": lambda a: dict(assistant_model=a), "greedy": lambda a: {}}[how]  # fmt: skip
    helpers = _assistants(setup.name, setup.hv_ratio, setup.dtype) if how == "assisted" else (None, None)
    fresh(patched, ref, *[h for h in helpers if h is not None])
    with torch.no_grad(), intervene(patched, edits, src_p):
        got = patched.generate(ids, **kw, **extra(helpers[0]))
    with torch.no_grad(), hf_edits(ref, edits, src_r):
        want = ref.generate(ids, **kw, **extra(helpers[1]))
    check_clean(patched, ref, *[h for h in helpers if h is not None])
    same(got.sequences, want.sequences, "tokens")
    assert len(got.logits) == len(want.logits)
    for i, (a, b) in enumerate(zip(got.logits, want.logits)):
        same(a, b, f"logits of step {i}")


# ----------------------------------------------------------------------------- state_at


def rel_close(a, b, tol: float, what: str, atol: float = 1e-6) -> float:
    """||a - b|| <= tol ||b|| + atol (float64 norms over the finite elements), non-finite values
    (an edit that makes the decay grow, g > 0, overflows in HF's model too) in the same places
    and equal there; returns the ratio."""
    a, b = a.double(), b.double()
    bad = ~b.isfinite()
    assert torch.equal(bad, ~a.isfinite()) and torch.equal(a[bad].nan_to_num(), b[bad].nan_to_num()), (
        f"{what}: non-finite in other places ({int((~a.isfinite()).sum())} vs {int(bad.sum())} elements)"
    )
    a, b = a.masked_fill(bad, 0), b.masked_fill(bad, 0)
    err, size = (a - b).norm().item(), b.norm().item()
    assert err <= tol * size + atol, f"{what}: ||a - b|| = {err:.3g}, ||b|| = {size:.3g} (tolerance {tol:g} relative)"
    return err / max(size, 1e-30)


# Splitting the prefill moves the chunk kernel's boundaries, and HF's reference runs every layer
# in cached segments (its conv from the cached conv state, its attention over cached keys, a
# one-token segment on the recurrent kernel): the same math in another order, float32 rounding
# apart (measured: at most 6e-7 relative on these models). In bf16 a value that lands next to a
# rounding boundary flips by one bf16 step (2^-8 relative) in that element.
SPLIT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _firing_positions(P, T) -> list[int]:
    """The README's rule for `state` inside state_at(P): after each listed position, then the
    final state unless T - 1 is listed."""
    return list(P) + ([] if P[-1] == T - 1 else [T - 1])


@st.composite
def state_at_workflows(draw):
    setup = draw(setups(max_T=140, min_T=2))
    layers = _layers(setup)
    split = draw(st.one_of(st.none(), st.sampled_from([(l,) for l in layers])))
    # HF's reference runs in cached segments, and HF masks no padding in a one-token call (it
    # takes it for a decode step) and nothing sensible in a call of pads only: segments of one
    # token hold no pad, the first segment some row's token (else HF's logits move by 1e-2).
    pads = setup.pads

    def valid(P):
        ends = [p + 1 for p in P] + ([] if P[-1] == setup.T - 1 else [setup.T])
        return P[0] >= min(pads) and all(e - s > 1 or s >= max(pads) for s, e in zip([0, *ends], ends))

    P = draw(
        st.lists(st.integers(0, setup.T - 1), min_size=1, max_size=3, unique=True)
        .map(lambda ps: tuple(sorted(ps)))
        .filter(valid)
    )
    fired = len(_firing_positions(P, setup.T))
    chosen = draw(
        edits(setup, split or layers, sites=("state",), kinds=("zero", "scale", "add", "replace", "copy_row"), n=(0, 2),
              firings=fired)
    )  # fmt: skip
    return dict(setup=setup, split=split, positions=P, edits=chosen, mode=draw(st.sampled_from(sorted(GRAD_MODES))))


def _state_sources(setup, edits, patched, ref, mask, p: int) -> tuple[dict, dict]:
    """The other prompt's state after p at each layer a "replace" edit touches: the patched
    model's from a capture inside state_at([p]), HF's from its cache after p + 1 tokens."""
    layers = sorted({e.layer for e in edits if e.kind == "replace"})
    if not layers:
        return {}, {}
    other = setup.ids(seed_offset=1)
    with torch.no_grad(), gi.capture(patched, sites=["state"], layers=layers) as cap, gi.state_at(patched, [p], layers):
        run(patched, other, mask)
    cache = new_cache(ref)
    with torch.no_grad():
        run(ref, other[:, : p + 1], None if mask is None else mask[:, : p + 1], cache)
    mine = {(l, "state"): cap.state_after(l, p) for l in layers}
    theirs = {(l, "state"): cache.get_recurrent_state(l).clone() for l in layers}
    for key in mine:
        rel_close(mine[key], theirs[key], SPLIT_TOL[setup.dtype], f"the other prompt's state after {p}, layer {key[0]}")
    return mine, theirs


@examples(1.0)
@given(state_at_workflows())
def test_state_at(w):
    """`gi.state_at(model, P, layers)` with 0-2 state edits (stateful: chosen firings), a
    capture of the state, a cache. Reference: HF's model run in cached segments ending after
    each p in P, each edit applied to HF's cached state between segments (the state after p),
    to `SPLIT_TOL`: logits (at tokens, not pads), every state the capture recorded (the state after p before the
    edit, per `Capture.firings` / `state_after`), the final cached states. The firings follow
    the documented rule."""
    setup, split, P, edits = w["setup"], w["split"], w["positions"], w["edits"]
    patched, ref = setup.models()
    mask, ids, T, tol = setup.mask(), setup.ids(), setup.T, SPLIT_TOL[setup.dtype]
    src_p, src_r = _state_sources(setup, edits, patched, ref, mask, P[0])
    layers = list(split or gi.gdn_layers(patched))
    cache_p = new_cache(patched)
    with GRAD_MODES[w["mode"]]():
        with gi.capture(patched, sites=["state"], layers=layers) as cap, gi.state_at(patched, P, split):
            with intervene(patched, edits, src_p):
                got = run(patched, ids, mask, cache_p)
    check_clean(patched, ref)
    fired = _firing_positions(P, T)
    for l in layers:
        assert [f.position for f in cap.firings(l)] == fired
        assert [f.final for f in cap.firings(l)] == [p == T - 1 for p in fired]

    cache_r, want, before = new_cache(ref), [], {}
    bounds = [0] + [p + 1 for p in fired]
    with torch.no_grad():
        for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            want.append(run(ref, ids[:, s:e], None if mask is None else mask[:, :e], cache_r))
            for l in layers:
                S = cache_r.get_recurrent_state(l)
                before[l, fired[i]] = S.clone()
                for edit in edits:
                    if edit.layer == l and edit.acts_on(i):
                        S.copy_(edit.apply(S, src_r.get((l, "state"))))
    real = slice(None) if mask is None else mask.bool()  # a segment of pads only is HF's garbage
    rel_close(got[real], torch.cat(want, 1)[real], tol, "logits at the tokens (pads aside)")
    for (l, p), S in before.items():
        rel_close(cap.state_after(l, p).to(S.dtype), S, tol, f"the state after {p}, layer {l}")
    for l in gi.gdn_layers(patched):
        S = cache_r.get_recurrent_state(l)
        rel_close(cache_p.get_recurrent_state(l).to(S.dtype), S, tol, f"the cached state, layer {l}")


# ----------------------------------------------------------------------------- backward


@functools.cache
def _train(name: str):
    """(checkpointed patched, plain patched, unpatched) copies of one tiny model in train mode
    (dropout off): transformers' non-reentrant gradient checkpointing on the first."""
    ref = build(name).train()
    for m in ref.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    plain, ckpt = gi.patch(copy.deepcopy(ref)), gi.patch(copy.deepcopy(ref))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # 5.25 renames it activation_checkpointing_enable
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.modules())
    for m in (ckpt, plain, ref):
        _BASELINE[id(m)] = _hook_counts(m)
    return ckpt, plain, ref


def _grads(model) -> dict:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@st.composite
def backward_workflows(draw):
    setup = draw(setups(max_T=80, max_B=2, dtypes=(torch.float32,)))
    layers = _layers(setup)
    chosen = draw(edits(setup, layers, kinds=("zero", "scale", "add", "replace", "copy_row")))
    split = None
    if any(e.site == "state" for e in chosen) and setup.T > 1 and draw(st.booleans()):
        split = (draw(st.integers(0, setup.T - 2)),)  # the state after p feeds the rest of the call
    return dict(setup=setup, edits=chosen, split=split, after_block=draw(st.booleans()))


@examples(0.6)
@given(backward_workflows())
def test_backward(w):
    """Loss and every parameter gradient with edits (in place or returned; a split for state
    edits), under non-reentrant gradient checkpointing, backward inside the block or after it
    closed (the recomputation replays the forward's values). References: the same patched
    model without checkpointing, bitwise (same ops, same values); HF's unpatched model with the
    same edits returned (HF's own tensors, edited in place, would break HF's backward), its loss
    bitwise where no edit is in place and no split is made (else `SPLIT_TOL`), its gradients
    to 1e-5 relative per parameter (a listened site hands autograd its gradient in its own
    layout, which moves the last bits of sums over positions, README "Gradients")."""
    setup, edits, split = w["setup"], w["edits"], w["split"]
    ckpt, plain, ref = _train(setup.name)
    fresh(ckpt, plain, ref)
    mask, ids = setup.mask(), setup.ids()
    src_p, src_r = sources(setup, edits, plain, ref, mask)
    results = []
    for model in (ckpt, plain):
        with contextlib.ExitStack() as block:
            block.enter_context(intervene(model, edits, src_p))
            if split:
                block.enter_context(gi.state_at(model, split, sorted({e.layer for e in edits})))
            loss = run(model, ids, mask).float().pow(2).mean()
            if not w["after_block"] or model is plain:
                loss.backward()
        if w["after_block"] and model is ckpt:
            loss.backward()  # the hooks are gone: checkpointing replays what they made
        results.append((loss.detach(), _grads(model)))
    check_clean(ckpt, plain, ref)
    (loss_c, grads_c), (loss_p, grads_p) = results
    same(loss_c, loss_p, "loss, checkpointed")
    assert grads_c.keys() == grads_p.keys() and grads_p
    for n in grads_p:
        same(grads_c[n], grads_p[n], f"gradient of {n}, checkpointed")
    if split:
        return  # HF has no split; test_state_at covers the forward
    with hf_edits(ref, [replace(e, in_place=False) for e in edits], src_r):
        loss_r = run(ref, ids, mask).float().pow(2).mean()
    loss_r.backward()
    grads_r = _grads(ref)
    if any(e.in_place for e in edits):
        rel_close(loss_p, loss_r.detach(), SPLIT_TOL[torch.float32], "loss, HF (returned edits)")
    else:
        same(loss_p, loss_r.detach(), "loss, HF")
    assert grads_p.keys() == grads_r.keys()
    for n in grads_r:
        rel_close(grads_p[n], grads_r[n], 1e-5, f"gradient of {n}, HF")


# ----------------------------------------------------------------------------- nnsight


@functools.cache
def _nnsight(name: str, hv_ratio: int, dtype: torch.dtype):
    """(nnsight model over its own patched copy, unpatched): nnsight wraps the modules it
    traces, so it gets a copy the other paths do not share."""
    from gdn_intervene import nnsight as gnn

    ref = build(name, hv_ratio=hv_ratio, dtype=dtype)
    lm = gnn.load(gi.patch(copy.deepcopy(ref)))  # no tokenizer: token ids in, as the tests give
    _BASELINE[id(lm._module)], _BASELINE[id(ref)] = _hook_counts(lm._module), _hook_counts(ref)
    return lm, ref


@st.composite
def nnsight_workflows(draw):
    setup = draw(setups(max_T=70, max_B=1, pad=False, names=NAMES))
    invokes = draw(st.integers(2, 3))
    site = draw(st.sampled_from(sites_for(setup.name, TIMED)))
    layer = draw(st.sampled_from(_layers(setup)))
    one = replace(setup, B=invokes)  # the batch nnsight makes of the invokes
    per = []
    for i in range(1, invokes):  # invoke 0 is the source: read, never edited
        (e,) = draw(edits(one, (layer,), sites=(site,), kinds=("zero", "scale", "add", "replace"), n=(1, 1)))
        per.append(replace(e, rows=None, from_row=0, firings=None))
    return dict(setup=one, layer=layer, site=site, edits=per)


@examples(0.6)
@given(nnsight_workflows())
def test_nnsight(w):
    """An nnsight trace with 2-3 invokes of one prompt each: invoke 0 is read (`.output.save()`),
    each later one edits the same site at drawn positions and heads (zero, scale, add, or
    activation patching: invoke 0's value put in), in place or by assignment. Reference: HF's
    model on the invokes' prompts as one batch with those edits on their rows (`copy_row` from
    row 0 for patching). Bitwise: each invoke's logits, and the value invoke 0 read."""
    from gdn_intervene import nnsight as gnn

    setup, layer, site, edits = w["setup"], w["layer"], w["site"], w["edits"]
    lm, ref = _nnsight(setup.name, setup.hv_ratio, setup.dtype)
    fresh(lm._module, ref)
    ids = setup.ids()
    node = gnn.site(lm, layer, site)
    logits, read = [], []
    with torch.no_grad(), lm.trace() as tracer:
        barrier = tracer.barrier(setup.B)
        for i in range(setup.B):
            with tracer.invoke(ids[i : i + 1]):
                if i == 0:
                    src = node.output
                    read.append(src.save())
                    barrier()
                else:
                    barrier()
                    e = edits[i - 1]
                    new = e.apply(node.output, src)
                    if e.in_place:
                        node.output[:] = new
                    else:
                        node.output = new
                logits.append(lm.output.logits.save())
    check_clean(lm._module, ref)
    rows = [
        replace(e, kind="copy_row", from_row=0, rows=(i + 1,)) if e.kind == "replace" else replace(e, rows=(i + 1,))
        for i, e in enumerate(edits)
    ]
    with torch.no_grad(), HFEdit(ref, layer, rows, record=True) as h:
        # nnsight's trace calls the model as a user does, use_cache unset: the config's (True for
        # every model here), so with a cache; at T = 1 some families then take the recurrent
        # kernel, so the reference runs with one too
        want = run(ref, ids, torch.ones_like(ids), use_cache=True)
    check_clean(ref)
    same(read[0], h.record[site][0][:1], f"{site} read in invoke 0")
    for i, got in enumerate(logits):
        same(got, want[i : i + 1], f"logits of invoke {i}")


# ----------------------------------------------------------------------------- pyvene


@functools.cache
def _pyvene(name: str, hv_ratio: int, dtype: torch.dtype):
    """(patched copy for pyvene, unpatched): pyvene freezes the parameters of the model it wraps."""
    ref = build(name, hv_ratio=hv_ratio, dtype=dtype)
    patched = gi.patch(copy.deepcopy(ref))
    _BASELINE[id(patched)], _BASELINE[id(ref)] = _hook_counts(patched), _hook_counts(ref)
    return patched, ref


@st.composite
def pyvene_workflows(draw):
    setup = draw(setups(max_T=70, max_B=3))
    site = draw(st.sampled_from(sites_for(setup.name)))
    layer = draw(st.sampled_from(_layers(setup)))
    heads = None
    if HEAD_AXIS[site] is not None and draw(st.booleans()):
        heads = tuple(draw(st.lists(st.integers(0, 1), min_size=1, max_size=2, unique=True)))
    positions = None if site == "state" else tuple(
        sorted(draw(st.lists(st.integers(0, setup.T - 1), min_size=1, max_size=3, unique=True)))
    )  # fmt: skip
    # pyvene writes the source's value into the hooked tensor in place
    edit = Edit(layer, site, "replace", positions=positions, heads=heads, firings=frozenset({0}), in_place=True)
    return dict(setup=setup, edit=edit)


@examples(0.6)
@given(pyvene_workflows())
def test_pyvene(w):
    """A pyvene VanillaIntervention on a GDN component (`linear_attn_<site>`, unit "pos"; or
    `head_linear_attn_<site>`, unit "h.pos"), base and source prompts of B rows: the source's
    value at the drawn positions (heads) put into the base run (the state: position 0, the state
    after the call, which reaches the cache). Reference: HF's model with the source's value put
    in at those positions and heads. Bitwise: logits and the cache."""
    import pyvene as pv

    import gdn_intervene.pyvene as gp

    gp.register()
    setup, e = w["setup"], w["edit"]
    patched, ref = _pyvene(setup.name, setup.hv_ratio, setup.dtype)
    fresh(patched, ref)
    mask, base, source = setup.mask(), setup.ids(), setup.ids(seed_offset=1)
    with torch.no_grad(), HFEdit(ref, e.layer, record=True) as h:
        run(ref, source, mask, new_cache(ref))
    src = h.record[e.site][0]
    name = next(
        c.name for c in gp.COMPONENTS.values() if c.site is not None and c.site.name == e.site and (c.heads is None) == (e.heads is None)
    )  # fmt: skip
    unit = "pos" if e.heads is None else "h.pos"
    ps = [0] if e.positions is None else list(e.positions)
    # pyvene's locations per intervention: positions per row ("pos"); heads and positions per row ("h.pos")
    loc = [ps] * setup.B if e.heads is None else [[[*e.heads]] * setup.B, [ps] * setup.B]
    iv = pv.IntervenableModel([{"layer": e.layer, "component": name, "unit": unit}], patched)
    base_in, src_in = {"input_ids": base, "attention_mask": mask}, {"input_ids": source, "attention_mask": mask}
    try:
        with torch.no_grad():
            _, got = iv(base_in, [src_in], {"sources->base": ([loc], [loc])})
    finally:
        for p in patched.parameters():
            p.requires_grad_(True)
    cache_r = new_cache(ref)
    with torch.no_grad(), HFEdit(ref, e.layer, [e], {e.site: src}):
        want = run(ref, base, mask, cache_r)
    check_clean(patched, ref)
    same(got.logits, want, "logits")
    same_cache(got.past_key_values, cache_r)


# ----------------------------------------------------------------------------- analysis with a cache


ANALYSIS = ("effective_attention", "states_at", "attribution")


@st.composite
def analysis_workflows(draw):
    setup = draw(setups(max_T=100, dtypes=(torch.float32,)))  # the prefix in the cache
    T = draw(st.one_of(st.integers(1, 3), st.integers(1, 20)))  # the analysed continuation
    P = tuple(sorted(draw(st.lists(st.integers(0, T - 1), min_size=1, max_size=3, unique=True))))
    return dict(setup=setup, T=T, positions=P, keep=draw(st.sampled_from((0, 0, 1, 3))),
                tool=draw(st.sampled_from(ANALYSIS)), seed=draw(st.integers(0, 99)))  # fmt: skip


@examples(0.8)
@given(analysis_workflows())
def test_analysis_with_a_cache(w):
    """The analysis tools on a cached continuation (`cache=` holding a padded prefix, recording
    N kept states or not). References, HF's unpatched model continued from its own copy of the
    prefix cache: effective attention reconstructs HF's kernel output o from HF's v, M v + C (the
    state term from the cache), to 1e-5 relative; `states_at` equals HF's cached state after
    p + 1 tokens (another kernel sequence: 1e-5 relative); attribution's `value` is HF's layer
    output projected on the direction, and the parts sum to it (1e-5). The caller's cache is
    unchanged, bitwise."""
    from gdn_intervene import analysis as an

    setup, T, P, keep, tool = w["setup"], w["T"], w["positions"], w["keep"], w["tool"]
    patched, ref = setup.models()
    mask, prefix = setup.mask(), setup.ids()
    cont = setup.ids(seed_offset=3, T=T)
    cmask = None if mask is None else torch.cat([mask, torch.ones_like(cont)], 1)
    cache_p, cache_r = new_cache(patched), new_cache(ref)
    with torch.no_grad():
        run(patched, prefix, mask, cache_p)
        run(ref, prefix, mask, cache_r)
    if keep:
        cache_p.activate_past_recording(recurrent_states_to_keep=keep)
    before = cache_fields(cache_p)
    kw = dict(attention_mask=cmask, cache=cache_p, use_cache=True)
    layers = list(gi.gdn_layers(patched))

    def hf_run(n: int | None = None, recording: bool = bool(keep)):
        """HF's record of each GDN layer for `cont` (its first n tokens) from a copy of the cache."""
        c = copy.deepcopy(cache_r)
        if recording:
            c.activate_past_recording(recurrent_states_to_keep=keep)
        x, m = (cont, cmask) if n is None else (cont[:, :n], None if cmask is None else cmask[:, : mask.shape[1] + n])
        with torch.no_grad(), contextlib.ExitStack() as stack:
            hs = {l: stack.enter_context(HFEdit(ref, l, record=True)) for l in layers}
            run(ref, x, m, c)
        return {l: h.record for l, h in hs.items()}, c

    if tool == "effective_attention":
        rows = None if w["seed"] % 2 else list(P)
        att = an.effective_attention_for(patched, cont, rows=rows, **kw)
        hf, _ = hf_run()
        for l in layers:
            o, v = hf[l]["recurrence"][0], hf[l]["v"][0]
            o = o if rows is None else o[:, rows]
            M, C = att[l].matrix, att[l].state_term
            assert C is not None  # the prefix left a state
            rel_close(
                torch.einsum("bhrs,bshv->brhv", M.double(), v.double()) + C.double(), o, 1e-5, f"M v + C, layer {l}"
            )
    elif tool == "states_at":
        S = an.states_at(patched, cont, list(P), **kw)
        for i, p in enumerate(P):
            _, c = hf_run(p + 1, recording=False)
            for l in layers:
                rel_close(S[l][:, i], c.get_recurrent_state(l), 1e-5, f"the state after {p}, layer {l}")
    else:
        g = torch.Generator().manual_seed(w["seed"])
        d = torch.randn(patched.config.get_text_config().hidden_size, generator=g)
        a = an.attribution_for(patched, cont, positions=list(P), direction=d, **kw)
        hf, _ = hf_run()
        for i, l in enumerate(a.layers):
            y = hf[l]["out_proj"][0][:, list(P)].double()  # [B, R, D]: HF's layer output
            rel_close(a.value[:, i], y @ d.double(), 1e-6, f"projected output, layer {l}")
        rel_close(a.total(), a.value, 1e-5, "the parts' sum")
    check_clean(patched, ref)
    after = cache_fields(cache_p)
    assert [p for p, _ in before] == [p for p, _ in after]
    for (path, x), (_, y) in zip(before, after):
        (same if isinstance(x, torch.Tensor) else lambda a, b, w: (a == b) or pytest.fail(w))(
            x, y, f"the caller's {path}"
        )


# ----------------------------------------------------------------------------- tracing


def _strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as a strict parser does."""

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@st.composite
def tracing_workflows(draw):
    name = draw(st.sampled_from(NAMES))
    T = draw(st.integers(3, 10))
    setup = Setup(name, draw(st.sampled_from((1, 2))) if name in GQA else 1, torch.float32, T, 1, (0,),
                  draw(st.integers(0, 2**16)))  # fmt: skip
    layers = _layers(setup)
    corrupted = draw(st.lists(st.integers(0, T - 1), min_size=1, max_size=2, unique=True))
    sites = draw(st.lists(st.sampled_from(tuple(HEAD_AXIS)), min_size=1, max_size=4, unique=True))
    atp_layers = draw(st.one_of(st.none(), st.permutations(layers), st.sampled_from([[l] for l in layers])))
    answers = draw(st.lists(st.integers(3, VOCAB - 1), min_size=2, max_size=2, unique=True))
    cell_site = draw(st.sampled_from(sites_for(name, sites) or ["out_proj"]))
    return dict(
        setup=setup, corrupted=corrupted, sites=sites, atp_layers=atp_layers, answers=tuple(answers),
        patch=draw(st.sampled_from(("clean_into_corrupt", "clean_into_corrupt", "corrupt_into_clean"))),
        steps=draw(st.sampled_from((1, 1, 2))), verify=draw(st.integers(0, 3)),
        cell=(cell_site, draw(st.sampled_from(layers)), draw(st.integers(0, T - 1))),
        write=draw(st.sampled_from((False, False, False, True))),
    )  # fmt: skip


def _hf_restored(ref, clean, corrupt, answers, cell) -> float:
    """HF's unpatched model: logit[a] - logit[b] at the last position of the corrupted run with
    the cell's value restored from the clean run (the state after p: the run in two cached
    segments, HF's cached state overwritten between them)."""
    site, layer, p = cell
    a, b = answers
    if site == "state":
        states = []
        for ids in (clean, corrupt):
            c = new_cache(ref)
            with torch.no_grad():
                run(ref, ids[:, : p + 1], None, c)
            states.append(c)
        states[1].get_recurrent_state(layer).copy_(states[0].get_recurrent_state(layer))
        with torch.no_grad():
            last = run(ref, corrupt[:, p + 1 :], None, states[1])[0, -1].float()
    else:
        with torch.no_grad(), HFEdit(ref, layer, record=True) as h:
            run(ref, clean)
        edit = Edit(layer, site, "replace", positions=(p,), firings=frozenset({0}))
        with torch.no_grad(), HFEdit(ref, layer, [edit], {site: h.record[site][0]}):
            last = run(ref, corrupt)[0, -1].float()
    return float(last[a] - last[b])


@examples(0.6)
@given(tracing_workflows())
def test_tracing(w):
    """`causal_trace` and `attribution_patching` (drawn sites, AtP's layers in a drawn order or
    a subset, either direction, 1-2 integration steps, verify=K) on a prompt pair with 1-2
    corrupted tokens. Checks: a drawn cell's restored logit difference equals HF's unpatched model
    with that value restored (a token site: HF's value put in at p; the state after p: HF run in
    cached segments, its state overwritten; 1e-5: the trace batches cells as rows); `agreement`
    pairs cells by (site, layer, position): its Pearson equals a pairing by hand from each
    result's own layer list; every score finite but the final state's column (NaN, the
    documented rule); every JSON strict (`to_json`, `outputs.write`); AtP's verified cells equal
    the trace's scores of those cells."""
    import tempfile

    from gdn_intervene import outputs, tracing

    setup, answers = w["setup"], w["answers"]
    patched, ref = setup.models()
    clean = setup.ids()
    corrupt = clean.clone()
    for p in w["corrupted"]:
        corrupt[0, p] = (clean[0, p] + 7) % (VOCAB - 3) + 3
    sites = tuple(w["sites"])
    trace = tracing.causal_trace(patched, clean, corrupt, sites=sites, answers=answers)
    atp = tracing.attribution_patching(patched, clean, corrupt, sites=sites, answers=answers, layers=w["atp_layers"],
                                       patch=w["patch"], steps=w["steps"], verify=w["verify"])  # fmt: skip
    check_clean(patched, ref)

    # the NaN rule: the final state cannot reach the last logits; every other score is finite
    for res in (trace, atp):
        for s in res.sites:
            sc = res.scores[s]
            assert sc.shape == (len(res.layers), setup.T)
            if s == "state":
                assert sc[:, -1].isnan().all() and sc[:, :-1].isfinite().all(), (res.method, s, sc)
            else:
                assert sc.isfinite().all(), (res.method, s, sc)
        _strict_json(json.dumps(res.to_json(), allow_nan=False))

    # a cell of the trace, recomputed on HF's model
    site, layer, p = w["cell"]
    if site in sites and not (site == "state" and p == setup.T - 1):
        want = _hf_restored(ref, clean, corrupt, answers, (site, layer, p))
        got = trace.score(tracing.Cell(site, layer, p)) * (trace.clean_diff - trace.corrupt_diff) + trace.corrupt_diff
        assert abs(got - want) <= 1e-5 * (1 + abs(want)), (site, layer, p, got, want)
        check_clean(ref)

    if w["patch"] != trace.patch:
        with pytest.raises(ValueError, match="different patching directions"):
            tracing.agreement(atp, trace)
        return
    xs, ys = [], []  # pairing by hand
    for s in atp.sites:
        for i, L in enumerate(atp.layers):
            for q in range(setup.T):
                x, y = float(atp.scores[s][i, q]), float(trace.scores[s][trace.layers.index(L), q])
                if x == x and y == y:
                    xs.append(x)
                    ys.append(y)
    stats = tracing.agreement(atp, trace)
    assert stats["all"].cells == len(xs)
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    pearson = float((x * y).sum()) / den if den > 0 else math.nan
    assert (math.isnan(pearson) and math.isnan(stats["all"].pearson)) or abs(stats["all"].pearson - pearson) <= 1e-12
    # verify patches in batches of its own size, the trace in one of every cell: the logit
    # differences agree to rounding (1e-5 relative), the scores to that over the span
    span = trace.clean_diff - trace.corrupt_diff
    for cell, measured in atp.verified.items():
        got, want = (x * span + trace.corrupt_diff for x in (measured, trace.score(cell)))
        assert abs(got - want) <= 1e-5 * (1 + abs(want)), (cell, measured, trace.score(cell), span)
    if w["write"]:
        with tempfile.TemporaryDirectory() as folder:
            outputs.write(folder, trace, atp=atp)
            data = _strict_json(open(f"{folder}/trace.json").read())
            assert data["agreement"]["all"]["cells"] == len(xs)


# ----------------------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("name", NAMES)
def test_the_reference_reads_every_site_and_its_edits_take_effect(name):
    """What the suite rests on, per family: `HFEdit` reads from HF's own forward, for every site
    with a reference, the values the patched sites hold (bitwise; a prefill, a decode step and a
    call keeping 2 states, whose kernel calls hold parts of the call), and an edit through it
    changes HF's output (the state's: the next call's), so no differential check is vacuous."""
    patched, ref = models(name, 2 if name in GQA else 1)
    sites = sites_for(name)
    ids, step, more = ids_for(9), ids_for(1, seed=1), ids_for(4, seed=2)
    layers = list(gi.gdn_layers(patched))
    cache_p, cache_r = new_cache(patched), new_cache(ref)
    with torch.no_grad(), gi.capture(patched, sites=sites) as cap:
        for x, keep in ((ids, 0), (step, 0), (more, 2)):
            if keep:
                cache_p.activate_past_recording(recurrent_states_to_keep=keep)
            run(patched, x, None, cache_p)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        hs = {l: stack.enter_context(HFEdit(ref, l, record=True)) for l in layers}
        for x, keep in ((ids, 0), (step, 0), (more, 2)):
            if keep:
                cache_r.activate_past_recording(recurrent_states_to_keep=keep)
            run(ref, x, None, cache_r)
    for l in layers:
        for s in sites:
            assert len(cap[l, s]) == len(hs[l].record[s]), (l, s)
            for i, (a, b) in enumerate(zip(cap[l, s], hs[l].record[s])):
                same(a, b, f"layer {l} {s}, firing {i}")
    check_clean(patched, ref)
    with torch.no_grad():
        plain_cache = new_cache(ref)
        plain = [run(ref, ids, None, plain_cache), run(ref, step, None, plain_cache)]
    for s in sites:
        edit = Edit(layers[0], s, "add" if s in ("decay_logit", "decay") else "scale", -0.5 if "decay" in s else 0.5)
        c = new_cache(ref)
        with torch.no_grad(), HFEdit(ref, layers[0], [edit]):
            got = [run(ref, ids, None, c), run(ref, step, None, c)]
        assert not torch.equal(got[1], plain[1]), f"{s}: the edit changed nothing"
        if s != "state":
            assert not torch.equal(got[0], plain[0]), f"{s}: the edit changed nothing in its own call"
    check_clean(ref)
