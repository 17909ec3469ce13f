"""How attribution patching integrates its gradient: the paths, the points and the defaults
(no torch here: the command line's --help reads them)."""

from __future__ import annotations

__all__ = ["ACTIVATIONS", "DEFAULT_PATH", "DEFAULT_STEPS", "INPUTS", "path_points"]

#: `path=`: interpolate the residual entering the first decoder layer, or each site's own value.
INPUTS, ACTIVATIONS = "inputs", "activations"
#: The defaults of `attribution_patching` (README, "Attribution patching": why these).
DEFAULT_STEPS, DEFAULT_PATH = 8, INPUTS


def path_points(steps: int) -> list[float]:
    """The K points a_k = k / K (k = 0..K-1) the gradient is averaged over; a_0 = 0 is the base
    run itself, so one step is first-order attribution patching."""
    return [k / steps for k in range(steps)]
