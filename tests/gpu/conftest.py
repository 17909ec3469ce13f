"""Registers the `gpu` marker for the tests of this directory (the lead may move it to
pyproject.toml's markers): tests that need a CUDA device and skip without one."""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (benchmarks/gpu_check.py); skipped without one")
