"""`gdn-intervene doctor`: what is installed, what each GDN layer's kernels run, and whether the
first-call self-check passes, as one plain-text report to paste into bug reports.

    from gdn_intervene import doctor
    print(doctor.report())                 # the bundled toy, loaded on CPU
    print(doctor.report("path/or/hub-id")) # a checkpoint, loaded on CPU
    print(doctor.report(model))            # a model in memory (patched in place, where it is)

Versions are read from package metadata: nothing optional is imported. A kernel's route is read
from the objects HF's forward calls (kernels' per-instance `_kernel_funcs` on transformers 5.25,
module-level functions or instance attributes before), for the layer's device; a layout this
file does not know reads "unknown (...)" instead of failing.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

__all__ = ["PACKAGES", "report", "versions", "routes", "self_check"]

# (import name, distribution): the versions block, in this order
PACKAGES = (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("nnsight", "nnsight"),
    ("pyvene", "pyvene"),
    ("kernels", "kernels"),
    ("fla", "flash-linear-attention"),
    ("causal_conv1d", "causal-conv1d"),
)
# Besides the family's delta-rule kernels: the conv kernels HF's forward reaches.
_CONV = ("causal_conv1d_forward", "causal_conv1d_fn", "causal_conv1d_update")
_ORIGINS = (("fla", "fla"), ("causal_conv1d", "causal-conv1d"))  # module prefix -> route name
_IDS = list(range(1, 9))  # the self-check forward's tokens (selfcheck.TOKENS of them)


def _version(distribution: str) -> str | None:
    """The installed version of `distribution`, or None."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _verdict(package: str, version: str) -> str:
    from ._compat import RUNTIME_CHECKED, TESTED, _parse, install_hint, install_spec

    if package not in TESTED:
        return "no tested range"
    lo, hi = TESTED[package]
    v = _parse(version)
    if package not in RUNTIME_CHECKED:
        if _parse(lo) <= v < _parse(hi):
            return f"tested (>={lo},<{hi})"
        return f"UNTESTED (tested: >={lo},<{hi})"
    if v < _parse(lo):
        return f"UNSUPPORTED, patch refuses it ({install_hint(package)})"
    if v[:2] <= _parse(hi)[:2]:  # the install's cap: the newest tested minor series
        return f"tested ({install_spec(package).removeprefix(package)})"
    return f"UNTESTED, newer than {hi}: runs behind the first-call self-check ({install_hint(package)})"


def versions() -> list[str]:
    """One line per package of `PACKAGES`: version and tested verdict, or "not installed"."""
    lines = []
    for package, dist in PACKAGES:
        name = dist if package == dist.replace("-", "_") else f"{dist} ({package})"
        v = _version(dist)
        lines.append(f"  {name:<29} {'not installed' if v is None else f'{v:<14} {_verdict(package, v)}'}")
    return lines


# ------------------------------------------------------------------ kernel routing


def _closure(fn) -> dict:
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    return dict(zip(code.co_freevars, (c.cell_contents for c in cells))) if code else {}


def _origin(fn) -> str:
    module = getattr(fn, "__module__", None) or ""
    return next((name for prefix, name in _ORIGINS if module.split(".")[0] == prefix), "torch")


def _route(obj, device_type: str) -> str:
    """What calling kernel object `obj` runs for inputs on `device_type`."""
    from torch import nn

    try:
        if obj is None:  # an absent optional kernel: HF's torch path
            return "torch"
        if isinstance(obj, nn.Module):  # kernels' Func: a hub kernel bound by kernelize, or the function it wraps
            if "forward" in obj.__dict__:
                repo = obj.__dict__.get("_kernel_repo")
                return f"hub ({repo if isinstance(repo, str) else getattr(repo, '_repo_id', None) or repo})"
            obj = _closure(type(obj).forward)["func"]
        c = _closure(obj)  # transformers' use_kernel_func_from_hub_with_fallback wrapper
        if "implementation" in c and "torch_function" in c:
            devices = c.get("supported_devices")
            if c["implementation"] is c["torch_function"] or (devices is not None and device_type not in devices):
                return "torch"
            obj = c["implementation"]
        if not callable(obj):
            raise TypeError
        return _origin(obj)
    except Exception:
        return f"unknown ({obj!r})"


def _kernels(module) -> dict:
    """{name: the kernel object HF's forward of `module` calls under that name}."""
    ns = vars(sys.modules[module._gdn_hf_class.__module__])
    on_instance = getattr(getattr(module, "_gdn_convention", None), "kernels_on_instance", False)
    funcs = module.__dict__.get("_kernel_funcs") or {}  # transformers 5.25: per-instance copies
    out = {}
    for name in (*module._gdn_family.kernels, *_CONV):
        key = name.removeprefix("torch_")
        if on_instance and key in module.__dict__:  # 4.57-5.14: bound in __init__ (None: torch path)
            out[name] = module.__dict__[key]  # listed under the module-level name, as on every release
        elif name in ns:
            obj = ns[name]
            out[name] = funcs.get(getattr(obj, "kernel_layer_name", None), obj)
    return out


def routes(model) -> list[str]:
    """Per GDN layer: family, HF class, device, and what each of its kernels routes to there."""
    from .patching import gdn_layers

    lines = []
    for idx, m in gdn_layers(model).items():
        p = next(m.parameters(), None)
        device = p.device if p is not None else None
        lines.append(f"  layer {idx}: {m._gdn_family.name}, {m._gdn_hf_class.__name__} on {device}")
        kernels = _kernels(m)
        width = max(map(len, kernels), default=0)
        lines += [f"    {n:<{width}}  {_route(k, getattr(device, 'type', 'cpu'))}" for n, k in kernels.items()]
    return lines


# ------------------------------------------------------------------ self-check


def self_check(model) -> list[str]:
    """Run one forward of a few tokens (the check run afresh for each patched class) and say,
    per patched class, whether HF's forward and the decomposed one agreed bit for bit."""
    import torch

    from . import selfcheck as sc
    from .capturing import _dispatched
    from .patching import as_module, gdn_layers

    classes = list(dict.fromkeys(type(m) for m in gdn_layers(model).values()))
    if os.environ.get(sc.ENV):
        return [f"  {c.__name__}: skipped ({sc.ENV} set)" for c in classes]
    for c in classes:  # forget an earlier result (or patch(selfcheck=False)): check now
        sc._DONE.discard(c)
        sc._FAILED.pop(c, None)
    module = as_module(_dispatched(model))  # a lazy nnsight model checks its real weights
    p = next(module.parameters(), None)
    emb = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    ids = torch.tensor([_IDS]) % getattr(emb, "num_embeddings", 1 << 30)
    problem = ""
    try:
        with torch.no_grad():
            module(ids.to(p.device if p is not None else "cpu"))
    except sc.SelfCheckError:
        pass  # recorded in sc._FAILED
    except Exception as e:
        problem = f"not run: the forward failed: {type(e).__name__}: {' '.join(str(e).split())}"
    return [
        f"  {c.__name__}: "
        + ("passed" if c in sc._DONE else str(sc._FAILED[c]) if c in sc._FAILED else problem or "not run")
        for c in classes
    ]


# ------------------------------------------------------------------ the report


def _load(model):
    """(patched model, its name): the bundled toy or a checkpoint on CPU, or `model` itself."""
    import torch

    import gdn_intervene as gi

    if model is None:
        from .toy import load_toy

        return gi.patch(load_toy(dtype=torch.float32)[0]), "bundled MQAR toy"
    if isinstance(model, str):
        return gi.from_pretrained(model, dtype=torch.float32).eval(), model
    from .capturing import _dispatched

    return gi.patch(_dispatched(model)), "a model in memory"  # a lazy nnsight model: real weights, real devices


def report(model=None) -> str:
    """The doctor's report: `model` is None (the bundled toy), a checkpoint directory or hub id
    (loaded on CPU), or a model in memory (patched in place)."""
    import torch

    import gdn_intervene as gi
    from .patching import as_module

    m, name = _load(model)
    cuda = "no CUDA"
    if torch.cuda.is_available():
        cuda = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)"
    lines = [
        "gdn-intervene doctor: paste this whole output into bug reports",
        f"gdn_intervene {gi.__version__}, Python {platform.python_version()}, {platform.platform(terse=True)}, {cuda}",
        "",
        "versions:",
        *versions(),
        "",
        f"model: {name} ({type(as_module(m)).__name__})",
        *routes(m),
        "",
        f"first-call self-check ({len(_IDS)} tokens):",
        *self_check(m),
    ]
    return "\n".join(lines) + "\n"
