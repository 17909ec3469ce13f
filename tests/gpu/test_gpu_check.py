"""benchmarks/gpu_check.py, the one-shot check of the fused-kernel path on a CUDA machine.

Without CUDA its `--dry-run` runs every section on the CPU with tiny models (no fla): the JSON
must be strict (no NaN / infinity), hold every section, and report patched = unpatched bitwise
for every family. The tests marked `gpu` run the real thing and skip without a CUDA device.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import MODELS

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
SECTIONS = ("environment", "parity", "prefill", "memory", "decode", "capture", "nnsight", "atp", "attention")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# The check installs and targets the newest release (its docstring's wheels): its environment and
# real-size sections read Qwen3.5 and Kimi Linear, which older releases lack.
newest = pytest.mark.skipif(
    not {"qwen3_5", "kimi_linear"} <= set(MODELS),
    reason="the GPU check targets the newest transformers (Qwen3.5 and Kimi Linear); this release lacks one",
)


def _run(tmp_path, *args, timeout):
    out = tmp_path / "check.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()

    def refuse(name):
        raise AssertionError(f"not strict JSON: {name}")

    return proc, json.loads(text, parse_constant=refuse)


def _check(result, proc):
    assert not result["errors"], result["errors"]
    assert result["skipped"] == []
    for name in SECTIONS:
        assert result.get(name), f"section {name} is missing or empty"
    assert {r["family"] for r in result["parity"]} == set(MODELS)
    assert result["parity_all_bitwise"] is True, [r for r in result["parity"] if not r["bitwise"]]
    for name in ("prefill", "decode", "capture", "nnsight"):
        assert all(r["bitwise_equal"] for r in result[name]), name
    assert all(r["reconstruction_error"] < 1e-4 for r in result["attention"])
    assert all(r["scores_finite"] for r in result["atp"])
    assert proc.returncode == 0, proc.stdout[-2000:]


@newest
def test_dry_run_on_the_cpu_writes_every_section_as_strict_json(tmp_path):
    pytest.importorskip("nnsight")
    proc, result = _run(tmp_path, "--dry-run", timeout=300)
    _check(result, proc)
    assert result["settings"]["dry_run"] is True and result["environment"]["device_type"] == "cpu"
    assert "layer 0" in result["environment"]["routes"]["qwen3_5"]


def test_refuses_to_run_without_cuda_unless_dry_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "no CUDA device: run with --dry-run" in proc.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.gpu
@needs_cuda
def test_fused_path_full_check(tmp_path):
    """The full run on CUDA (< 8 min): every section, parity bitwise on fla's kernels."""
    pytest.importorskip("fla")
    proc, result = _run(tmp_path, timeout=600)
    _check(result, proc)
    routes = result["environment"]["routes"]
    assert all(" fla" in text for text in routes.values()), routes
    assert result["total_s"] < 480


@pytest.mark.gpu
@needs_cuda
def test_doctor_shows_fla_on_cuda():
    pytest.importorskip("fla")
    from models import build

    import gdn_intervene as gi
    from gdn_intervene import doctor

    text = doctor.report(gi.patch(build("qwen3_5").cuda()))
    lines = [line.split() for line in text.splitlines()]
    assert ["torch_chunk_gated_delta_rule", "fla"] in lines and ["torch_recurrent_gated_delta_rule", "fla"] in lines, (
        text
    )
