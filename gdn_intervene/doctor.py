"""`gdn-intervene doctor`: what is installed, what each GDN layer's kernels run, and whether the
first-call self-check passes, as one plain-text report to paste into bug reports.

    from gdn_intervene import doctor
    print(doctor.report())                 # the bundled toy, loaded on CPU
    print(doctor.report("path/or/hub-id")) # a checkpoint, loaded on CPU
    print(doctor.report(model))            # a model in memory (patched in place, where it is)

Versions are read from package metadata: nothing optional is imported. A kernel's route is
what the layer's handle says (`GDNLayer.kernel_routes`: the objects HF's forward calls, for the
layer's device); a layout it does not know reads "unknown (...)" instead of failing. The report
reads the process and changes nothing in it: the self-check runs afresh (`GDNLayer.self_check`)
without touching what this process recorded (a `patch(selfcheck=False)` stays so).
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

__all__ = ["PACKAGES", "report", "versions", "routes", "self_check"]

# (import name, distribution): the versions block, in this order
PACKAGES = (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("nnsight", "nnsight"),
    ("pyvene", "pyvene"),
    ("kernels", "kernels"),
    ("fla", "flash-linear-attention", "fla-core"),  # fla-core alone ships `fla` (what HF's route imports)
    ("causal_conv1d", "causal-conv1d"),
)
_IDS = list(range(1, 9))  # the self-check forward's tokens (selfcheck.TOKENS of them)


def _version(*distributions: str) -> tuple[str, str | None]:
    """(distribution, installed version) of the first of `distributions` that is installed, else
    (the first, None)."""
    for dist in distributions:
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return distributions[0], None


def _verdict(package: str, version: str) -> str:
    from ._compat import RUNTIME_CHECKED, TESTED, install_hint, install_spec, parse_version
    from ._compat.versions import torch_verdict

    if package == "torch":
        return torch_verdict(version)
    if package not in TESTED:
        return "no tested range"
    lo, hi = TESTED[package]
    v = parse_version(version)
    if package not in RUNTIME_CHECKED:
        if parse_version(lo) <= v < parse_version(hi):
            return f"tested (>={lo},<{hi})"
        return f"UNTESTED (tested: >={lo},<{hi})"
    if v < parse_version(lo):
        return f"UNSUPPORTED, patch refuses it ({install_hint(package)})"
    if v[:2] <= parse_version(hi)[:2]:  # the install's cap: the newest tested minor series
        return f"tested ({install_spec(package).removeprefix(package)})"
    return f"UNTESTED, newer than {hi}: runs behind the first-call self-check ({install_hint(package)})"


def versions() -> list[str]:
    """One line per package of `PACKAGES`: version and tested verdict, or "not installed"."""
    lines = []
    for package, *dists in PACKAGES:
        dist, v = _version(*dists)
        name = dist if package == dist.replace("-", "_") else f"{dist} ({package})"
        lines.append(f"  {name:<29} {'not installed' if v is None else f'{v:<14} {_verdict(package, v)}'}")
    return lines


# ------------------------------------------------------------------ kernel routing


def routes(model) -> list[str]:
    """Per GDN layer: family, HF class, device, and what each of its kernels routes to there."""
    from .hooking.locate import gdn_layer, gdn_layers

    lines = []
    for idx, m in gdn_layers(model).items():
        layer = gdn_layer(m)
        p = next(m.parameters(), None)
        device = p.device if p is not None else None
        lines.append(f"  layer {idx}: {layer.family.name}, {layer.hf_class.__name__} on {device}")
        kernels = layer.kernel_routes(getattr(device, "type", "cpu"))
        width = max(map(len, kernels), default=0)
        lines += [f"    {n:<{width}}  {route}" for n, route in kernels.items()]
    return lines


# ------------------------------------------------------------------ self-check


def self_check(model) -> list[str]:
    """Run one forward of a few tokens and, per patched class, compare HF's forward and the
    decomposed one bit for bit on its first layer's input (the check run afresh, recording
    nothing: a class skipped with `patch(selfcheck=False)` or checked before stays so)."""
    import torch

    from . import selfcheck as sc
    from .hooking import scope
    from .hooking.locate import as_module, gdn_layer, gdn_layers

    firsts = {}  # patched class -> its first layer
    for m in gdn_layers(model).values():
        firsts.setdefault(type(m), m)
    if os.environ.get(sc.ENV):
        return [f"  {c.__name__}: skipped ({sc.ENV} set)" for c in firsts]
    module = as_module(scope.dispatched(model))  # a lazy nnsight model checks its real weights
    inputs = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, kw, c=c: inputs.setdefault(c, a[0] if a else kw["hidden_states"]),
                                           with_kwargs=True) for c, m in firsts.items()]  # fmt: skip
    p = next(module.parameters(), None)
    emb = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    ids = torch.tensor([_IDS]) % getattr(emb, "num_embeddings", 1 << 30)
    problem = ""
    try:
        with torch.no_grad(), sc.suspended():
            module(ids.to(p.device if p is not None else "cpu"))
    except Exception as e:
        problem = f"not run: the forward failed: {type(e).__name__}: {' '.join(str(e).split())}"
    finally:
        for h in handles:
            h.remove()
    lines = []
    for c, m in firsts.items():
        if c not in inputs:
            lines.append(f"  {c.__name__}: {problem or 'not run'}")
            continue
        try:
            gdn_layer(m).self_check(inputs[c])
            lines.append(f"  {c.__name__}: passed")
        except sc.SelfCheckError as e:
            lines.append(f"  {c.__name__}: {e}")
    return lines


# ------------------------------------------------------------------ the report


def _load(model):
    """(patched model, its name): the bundled toy or a checkpoint on CPU, or `model` itself."""
    if model is None or isinstance(model, str):
        from .checkpoints import load

        m, _, name = load(model, tokenizer=False)
        return m, name
    from .hooking import scope
    from .patching import patch

    return patch(scope.dispatched(model)), "a model in memory"  # a lazy nnsight model: real weights, real devices


def report(model=None) -> str:
    """The doctor's report: `model` is None (the bundled toy), a checkpoint directory or hub id
    (loaded on CPU), or a model in memory (patched in place)."""
    import torch

    import gdn_intervene as gi

    from .hooking.locate import as_module

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
