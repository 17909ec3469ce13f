"""The fla lane (docs/kernels-fla.md). A package, so that its conftest.py is `kernels_fla.conftest`
and never shadows tests/conftest.py, which the main suite imports as `conftest`."""
