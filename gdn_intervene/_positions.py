"""One validator for token positions, shared by the core, `ops` and `analysis` (pure: imports
nothing of the package)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["as_positions", "check_positions"]

Positions = int | Sequence[int] | torch.Tensor


def as_positions(
    positions: Positions,
    where: str | None,
    *,
    name: str = "positions",
    size: int | None = None,
    what: str = "",
    increasing: bool = False,
    scalar: bool = True,
) -> list[int]:
    """Indices (token positions, rows, heads) as a non-empty list of ints, or a ValueError that
    starts with `where` (if given) and names them `name`.

    Accepts an int (if `scalar`), a sequence of ints or a 1-D integer tensor. `size`: each must
    lie in [0, size) (`what` says what size counts, e.g. "sequence length T=12").
    `increasing`: strictly increasing, no repeats (state positions)."""
    at = f"{where}: {name}" if where else name
    if isinstance(positions, torch.Tensor):
        if (
            positions.dim() > 1
            or positions.dtype.is_floating_point
            or positions.dtype.is_complex
            or positions.dtype == torch.bool
        ):
            raise ValueError(
                f"{at} must be ints or a 1-D integer tensor; got a {positions.dtype} tensor of shape {list(positions.shape)}"
            )
        ps = positions.reshape(-1).tolist()
    elif scalar and hasattr(positions, "__index__") and not isinstance(positions, bool):
        ps = [positions]
    elif isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence):
        raise ValueError(f"{at} must be a sequence of ints or a 1-D integer tensor; got {type(positions).__name__}")
    else:
        ps = list(positions)
    if not ps:
        raise ValueError(f"{at} must not be empty")
    if any(isinstance(p, (bool, float)) or not hasattr(p, "__index__") for p in ps):
        raise ValueError(f"{at} must be ints; got {ps}")
    ps = [p.__index__() for p in ps]
    if size is not None:
        bad = [p for p in ps if not 0 <= p < size]
        if bad:
            raise ValueError(f"{at} out of range: {bad}; valid are 0..{size - 1}" + (f" ({what})" if what else ""))
    elif min(ps) < 0:
        raise ValueError(f"{at} must be non-negative indices; got {ps}")
    if increasing and any(b <= a for a, b in zip(ps, ps[1:])):
        raise ValueError(f"{at} must be strictly increasing (sorted, no repeats); got {ps}")
    return ps


def check_positions(positions: Positions, where: str) -> list[int]:
    """State positions: strictly increasing, non-negative ints (an int, a sequence or a 1-D
    integer tensor), or a ValueError that starts with `where`."""
    return as_positions(positions, where, increasing=True)
