"""The fla lane (docs/kernels-fla.md): run only with GDN_FLA_LANE=1, in its own process.

    GDN_FLA_LANE=1 python -m pytest -q tests/kernels_fla

This file must run before anything imports transformers' modeling modules: `fla_lane.setup()`
turns on the Triton interpreter, opens HF's device gate for fla on the CPU and installs the
interpreter shims. `tests/kernels_fla/pytest.ini` makes pytest load it before tests/conftest.py when the
lane is run as above. Without GDN_FLA_LANE=1 (the main suite) it does nothing, and every module
here skips at import, saying why.
"""

import sys

from kernels_fla import fla_lane

fla_lane.setup()

if fla_lane.LANE and "torch" in sys.modules:
    sys.modules["torch"].set_num_threads(1)  # tiny models: threads only add contention
