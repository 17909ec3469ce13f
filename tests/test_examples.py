"""The examples run offline on the bundled model (smoke tests; their numbers are tested elsewhere)."""

import runpy
import sys

import pytest

EXAMPLES = [
    ("beta_decay_stats.py", []),
    ("nnsight_quickstart.py", ["--out", "{tmp}/q.png"]),
    ("nnsight_generation_steering.py", []),
    ("pyvene_activation_patching.py", ["--out", "{tmp}/p.png"]),
]


@pytest.mark.parametrize("script, args", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_runs(script, args, tmp_path, monkeypatch, capsys):
    examples = f"{__file__.rsplit('/tests/', 1)[0]}/examples"
    path = f"{examples}/{script}"
    monkeypatch.syspath_prepend(examples)  # examples import each other
    monkeypatch.setattr(sys, "argv", [path] + [a.format(tmp=tmp_path) for a in args])
    runpy.run_path(path, run_name="__main__")
    assert capsys.readouterr().out.strip()
