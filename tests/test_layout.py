"""The package's layout rules (docs/internals.md, "Import floors"), read from the source: no
import cycle between the package's modules (lazy imports inside functions included), and no
module reads another module's private names (`from .x import _y`, or `x._y` on an imported
module): it asks the owner through a public name."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "gdn_intervene"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


MODULES = _modules()


def _imports(name: str, f: Path):
    """(module imported, names taken from it, the node) of every package-internal import of `name`."""
    package = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
    for n in ast.walk(ast.parse(f.read_text())):
        if isinstance(n, ast.ImportFrom) and n.level:
            base = ".".join(package[: len(package) - (n.level - 1)] + ([n.module] if n.module else []))
            for a in n.names:
                full = f"{base}.{a.name}"
                yield (full, [], a.asname or a.name) if full in MODULES else (base, [a.name], None)
        elif isinstance(n, ast.Import):
            for a in n.names:
                if a.name in MODULES:
                    yield a.name, [], a.asname


def test_no_import_cycle():
    graph = {m: {d for d, _, _ in _imports(m, f) if d != m} for m, f in MODULES.items()}
    for start in graph:  # depth-first from each module; a path back to a module on it is a cycle
        stack = [(start, (start,))]
        while stack:
            u, path = stack.pop()
            for v in graph.get(u, ()):
                assert v not in path, f"import cycle: {' -> '.join(path[path.index(v) :] + (v,))}"
                stack.append((v, path + (v,)))


def test_no_module_reads_another_modules_private_names():
    found = []
    for m, f in MODULES.items():
        aliases = set()
        for dep, names, alias in _imports(m, f):
            found += [f"{m}: from {dep} import {n}" for n in names if n.startswith("_") and not n.startswith("__")]
            if alias:
                aliases.add(alias)
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases:
                if n.attr.startswith("_") and not n.attr.startswith("__"):
                    found.append(f"{m}: {n.value.id}.{n.attr} (line {n.lineno})")
    assert not found, "\n".join(found)


def test_public_names_keep_their_meaning_once_every_submodule_is_imported():
    """A lazily exported name that is also a submodule's name turns into that module as soon as
    anything imports the submodule (the import system sets the package attribute): `tracing.
    agreement(...)` was once "'module' object is not callable" after the demo drew its scatter.
    In a fresh interpreter: each package's public names resolved first, then every submodule
    imported, then resolved again: the same objects."""
    import subprocess
    import sys

    packages = sorted(n for n, f in MODULES.items() if f.name == "__init__.py")
    code = f"""
import importlib, pkgutil
packages = {packages!r}
before = {{(p, n): getattr(importlib.import_module(p), n) for p in packages for n in getattr(importlib.import_module(p), "__all__", ())}}
for p in packages:
    for m in pkgutil.iter_modules(importlib.import_module(p).__path__):
        if not m.name.startswith("__"):
            importlib.import_module(f"{{p}}.{{m.name}}")
changed = [f"{{p}}.{{n}}" for (p, n), v in before.items() if getattr(importlib.import_module(p), n) is not v]
print(changed)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-2000:]
