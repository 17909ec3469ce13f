"""The examples run offline on the bundled model and write what the README says they write
(smoke tests; their numbers are tested elsewhere)."""

import runpy
import sys

import pytest
from conftest import needs_toy

# The examples run on the bundled toy, a Qwen3.5 checkpoint (transformers 5.5 on).
pytestmark = needs_toy

EXAMPLES = [
    ("beta_decay_stats.py", [], None),
    ("nnsight_quickstart.py", ["--out", "{tmp}/q.png"], "q.png"),
    ("nnsight_generation_steering.py", [], None),
    ("pyvene_activation_patching.py", ["--out", "{tmp}/p.png"], "p.png"),
]


@pytest.mark.parametrize("script, args, png", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_runs(script, args, png, tmp_path, monkeypatch, capsys):
    from PIL import Image

    examples = f"{__file__.rsplit('/tests/', 1)[0]}/examples"
    path = f"{examples}/{script}"
    monkeypatch.syspath_prepend(examples)  # examples import each other
    monkeypatch.setattr(sys, "argv", [path] + [a.format(tmp=tmp_path) for a in args])
    runpy.run_path(path, run_name="__main__")
    assert capsys.readouterr().out.strip()
    if png:
        assert min(Image.open(tmp_path / png).info["dpi"]) >= 150


def test_readme_lists_every_example():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    for script in sorted(p.name for p in (root / "examples").glob("*.py")):
        assert f"python examples/{script}" in readme, script
