"""Which releases of transformers, nnsight and pyvene are tested, and the refusal of the others."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

# package -> (lowest tested, first untested); for transformers (lowest supported, newest
# tested): releases below are refused, newer ones run behind the first-call self-check
# (gdn_intervene.selfcheck). pyproject.toml caps the install at the newest tested minor series
# (`install_spec`), so a fresh install never lands on an untested release. Keep in step with
# pyproject.toml and the README's matrix (tests/test_registry.py checks both).
TESTED: dict[str, tuple[str, str]] = {
    "transformers": ("4.57.0", "5.25.0"),
    "nnsight": ("0.8.1", "0.9.0"),
    "pyvene": ("0.1.8", "0.1.9"),
}
#: torch releases the whole suite ran on, and how: torch is not refused outside them (the
#: install asks for torch>=2.6), but `gdn-intervene doctor` says where a version stands. Keep in
#: step with the README's Install section and docs/install.md.
#: CI runs the CPU build (.ci/run); the hand runs used PyPI's default (CUDA) build on a CPU.
TESTED_TORCH: dict[str, str] = {"2.13.0": "in CI", "2.14.1": "by hand", "2.15.0": "by hand"}
_SKIP_ENV = "GDN_INTERVENE_SKIP_VERSION_CHECK"
# Packages whose newer releases are not refused: a run-time check guards them instead.
RUNTIME_CHECKED = frozenset({"transformers"})


class UnsupportedVersionError(RuntimeError):
    """A dependency is outside the tested range."""


def parse_version(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def check_version(package: str, version: str | None = None) -> None:
    """Raise `UnsupportedVersionError` if `package` is outside the tested range.

    transformers: only releases below the lowest supported one are refused; newer releases
    than the newest tested run, and each patched class checks itself on its first call
    (`gdn_intervene.selfcheck`). Set GDN_INTERVENE_SKIP_VERSION_CHECK=1 to proceed anyway.
    """
    if version is None:
        version = importlib.import_module(package).__version__
    lo, hi = TESTED[package]
    if os.environ.get(_SKIP_ENV):
        return
    if package in RUNTIME_CHECKED:
        if parse_version(version) < parse_version(lo):
            raise UnsupportedVersionError(
                f"gdn_intervene supports {package} >={lo} (newest tested: {hi}); found {package} {version}. "
                f"Install {package}>={lo}, or set {_SKIP_ENV}=1 to try anyway."
            )
    elif not (parse_version(lo) <= parse_version(version) < parse_version(hi)):
        raise UnsupportedVersionError(
            f"gdn_intervene is tested with {package} >={lo},<{hi}; found {package} {version}. "
            f"Install a tested release, or set {_SKIP_ENV}=1 to try anyway."
        )


def modeling_module(name: str) -> ModuleType | None:
    """The transformers modeling module `name`, or None where this release does not have it
    (a family newer than the installed release)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name):
            return None
        raise


def install_spec(package: str = "transformers") -> str:
    """The requirement that installs a tested release: `transformers>=4.57,<5.26`."""
    lo, hi = TESTED[package]
    if package in RUNTIME_CHECKED:
        major, minor = parse_version(hi)[:2]
        return f"{package}>={'.'.join(map(str, parse_version(lo)[:2]))},<{major}.{minor + 1}"
    return f"{package}>={lo},<{hi}"


def install_hint(package: str = "transformers") -> str:
    """One clause for an error message: the tested range and the pip command that works."""
    lo, hi = TESTED[package]
    return f'tested: {package} {lo} to {hi}; pip install "{install_spec(package)}"'


def torch_verdict(version: str) -> str:
    """Where a torch version stands against `TESTED_TORCH`: "tested (...)" for a tested release
    or another patch release of a tested minor series, else "UNTESTED (...)"."""
    by_how: dict[str, list[str]] = {}
    for t, how in TESTED_TORCH.items():
        by_how.setdefault(how, []).append(t)
    runs = "; ".join(f"{', '.join(ts)} {how}" for how, ts in by_how.items())
    v = parse_version(version)
    if any(v == parse_version(t) for t in TESTED_TORCH):
        return f"tested ({runs})"
    if any(v[:2] == parse_version(t)[:2] for t in TESTED_TORCH):
        return f"tested minor series ({runs})"
    return f"UNTESTED (tested: {runs})"
