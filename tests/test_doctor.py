"""`gdn-intervene doctor`: versions with their verdicts, each GDN layer's kernel routes, the
self-check, and the command line (one line `error: ...` before any work on a bad --model)."""

import sys
import types

import pytest
import torch
from conftest import needs_toy
from models import ANY_GDN, build, present

import gdn_intervene as gi
from gdn_intervene import _compat, cli, doctor
from gdn_intervene import selfcheck as sc
from gdn_intervene.selfcheck import ENV


def test_versions_name_each_package_with_a_verdict(monkeypatch):
    lines = doctor.versions()
    assert len(lines) == len(doctor.PACKAGES)
    for (_, *dists), line in zip(doctor.PACKAGES, lines):
        assert line.split()[0] in dists
        verdicts = ("not installed", "tested (", "UNTESTED", "UNSUPPORTED", "no tested range")
        assert any(w in line for w in verdicts), line
    transformers_line = next(line for line in lines if line.split()[0] == "transformers")
    assert "tested (" in transformers_line and "UNTESTED" not in transformers_line

    real, real_version = doctor._version, doctor.metadata.version
    monkeypatch.setattr(doctor, "_version", lambda *d: (d[0], "99.0.0") if d[0] == "transformers" else real(*d))
    line = next(line for line in doctor.versions() if line.split()[0] == "transformers")
    assert "99.0.0" in line and "UNTESTED, newer than" in line and "pip install" in line
    monkeypatch.setattr(doctor, "_version", lambda *d: (d[0], None) if d[0] == "nnsight" else real(*d))
    assert next(line for line in doctor.versions() if line.split()[0] == "nnsight").endswith("not installed")
    # fla: either distribution that ships the `fla` module (fla-core alone is what HF's route needs)
    monkeypatch.setattr(doctor.metadata, "version", lambda d: "0.6.0" if d == "fla-core" else real_version(d))
    line = next(line for line in doctor.versions() if "(fla)" in line)
    assert line.split()[:3] == ["fla-core", "(fla)", "0.6.0"], line


def _layer_blocks(text: str) -> dict[int, list[str]]:
    """{layer: [its header line, its kernel lines]} of a report."""
    blocks, current = {}, None
    for line in text.splitlines():
        if line.startswith("  layer "):
            current = blocks.setdefault(int(line.split()[1].rstrip(":")), [line])
        elif line.startswith("    ") and current is not None:
            current.append(line)
        else:
            current = None
    return blocks


@pytest.mark.parametrize("name", present("qwen3_5", "kimi_linear"))
def test_every_layer_with_its_family_and_torch_kernels_on_cpu(name):
    model = gi.patch(build(name))
    text = doctor.report(model)
    assert text.startswith("gdn-intervene doctor: paste this whole output into bug reports\n")
    layers = gi.gdn_layers(model)
    blocks = _layer_blocks(text)
    assert set(blocks) == set(layers)
    for idx, m in layers.items():
        header, *kernels = blocks[idx]
        h = gi.gdn_layer(m)
        assert f"{h.family.name}, {h.hf_class.__name__} on cpu" in header
        assert {k.split()[0] for k in kernels} >= set(h.family.kernels)
        assert all(k.split()[1:] == ["torch"] for k in kernels), kernels
    assert f"  {type(next(iter(layers.values()))).__name__}: passed" in text


def test_a_hub_kernel_is_named_with_its_repo():
    model = gi.patch(build(ANY_GDN))
    idx, m = next(iter(gi.gdn_layers(model).items()))
    if "_kernel_funcs" not in m.__dict__:
        pytest.skip("this transformers release has no per-instance kernels (before 5.25)")
    chunk = vars(sys.modules[gi.gdn_layer(m).hf_class.__module__])["torch_chunk_gated_delta_rule"]
    kf = m._kernel_funcs[chunk.kernel_layer_name]  # "chunk_gated_delta_rule"
    kf.forward = types.MethodType(lambda self, *a, **k: None, kf)  # what kernels' kernelize binds
    kf.__dict__["_kernel_repo"] = "kernels-community/fake"
    block = _layer_blocks("\n".join(doctor.routes(model)))[idx]
    routes = {line.split()[0]: " ".join(line.split()[1:]) for line in block[1:]}
    assert routes["torch_chunk_gated_delta_rule"] == "hub (kernels-community/fake)"
    assert routes["torch_recurrent_gated_delta_rule"] == "torch"


def test_a_package_kernel_runs_only_on_its_devices(monkeypatch):
    """HF's own fallback wrapper around a stand-in flash-linear-attention: fla on cuda; on cpu
    torch where the release runs package kernels only on their devices (5.25), else fla."""
    hub = pytest.importorskip("transformers.integrations.hub_kernels")
    if not hasattr(hub, "use_kernel_func_from_hub_with_fallback"):
        pytest.skip("this release has no fallback wrapper around package kernels")
    use_kernel_func_from_hub_with_fallback = hub.use_kernel_func_from_hub_with_fallback
    on_cpu = "torch" if hasattr(hub, "_PACKAGE_SUPPORTED_DEVICES") else "fla"

    fla = types.ModuleType("fla")
    fla.chunk_gated_delta_rule = lambda query, key, value, **kw: None
    fla.chunk_gated_delta_rule.__module__ = "fla.ops.gated_delta_rule.chunk"
    monkeypatch.setitem(sys.modules, "fla", fla)

    @use_kernel_func_from_hub_with_fallback("chunk_gated_delta_rule", "fla")
    def chunk(query, key, value, **kw):
        pass

    assert (_compat.kernel_route(chunk, "cuda"), _compat.kernel_route(chunk, "cpu")) == ("fla", on_cpu)
    assert _compat.kernel_route(None, "cpu") == "torch" and _compat.kernel_route(42, "cpu") == "unknown (42)"


def test_a_failed_selfcheck_is_reported_with_its_message(monkeypatch):
    model = gi.patch(build(ANY_GDN))
    cls = type(next(iter(gi.gdn_layers(model).values())))

    def fail(module, *a, **k):
        raise sc.SelfCheckError("gdn_intervene self-check of X: outputs differ")

    monkeypatch.setattr(sc, "_run", fail)
    assert doctor.self_check(model) == [f"  {cls.__name__}: gdn_intervene self-check of X: outputs differ"]
    assert cls not in sc._FAILED  # the report records nothing: the class's own first call still checks it


def test_selfcheck_skipped_by_the_environment(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    model = gi.patch(build(ANY_GDN))
    assert all(line.endswith(f"skipped ({ENV} set)") for line in doctor.self_check(model))


@needs_toy
def test_cli_doctor_on_the_toy(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gdn-intervene doctor:") and "model: bundled MQAR toy" in out
    assert "  layer 0: qwen3_5, Qwen3_5GatedDeltaNet on cpu" in out and ": passed" in out


def test_cli_doctor_refuses_a_missing_model_before_any_work(capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the doctor ran before the error")

    monkeypatch.setattr(doctor, "report", boom)
    capsys.readouterr()
    assert cli.main(["doctor", "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --model '/nonexistent' is neither a directory nor a hub id (owner/name)"]


def test_the_report_leaves_the_process_as_it_found_it(monkeypatch):
    """A read-only report: a class opted out with `patch(selfcheck=False)` stays opted out, and
    a class never checked is still checked on its own first call (before, the report cleared the
    opt-out of every model of the class)."""
    monkeypatch.delenv(ENV, raising=False)
    sc.reset()
    runs = []
    real = sc._run
    monkeypatch.setattr(sc, "_run", lambda module, *a: runs.append(type(module)) or real(module, *a))
    try:
        model = gi.patch(build(ANY_GDN), selfcheck=False)
        cls = type(next(iter(gi.gdn_layers(model).values())))
        text = doctor.report(model)
        assert f"  {cls.__name__}: passed" in text and runs == [cls]  # the report checks afresh
        assert cls in sc._DONE and cls not in sc._FAILED
        model(torch.tensor([[3, 4, 5]]))
        assert runs == [cls]  # still opted out: the forward did not check
        sc.reset()
        fresh = gi.patch(build(ANY_GDN))
        doctor.report(fresh)
        assert cls not in sc._DONE  # the report recorded nothing
        fresh(torch.tensor([[3, 4, 5]]))
        assert runs == [cls, cls, cls] and cls in sc._DONE  # the first call checked
    finally:
        sc.reset()
