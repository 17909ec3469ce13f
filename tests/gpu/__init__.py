"""Tests of benchmarks/gpu_check.py. A package, so that its conftest.py is `gpu.conftest` and
never shadows tests/conftest.py, which the main suite imports as `conftest`."""
