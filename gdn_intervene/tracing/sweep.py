"""Sweeps across processes: the batches of a sweep split between the ranks of an existing
`torch.distributed` process group (started by `torchrun` or `accelerate launch`), each rank a
model replica, and the scores gathered on every rank.

A rank runs whole batches, each the very rows one process would run, so the gathered result
equals one process's bit for bit. Every rank must call with the same arguments.

    torchrun --nproc-per-node 2 trace.py       # in trace.py:
    torch.distributed.init_process_group("gloo")   # "nccl" on GPUs, one device per rank
    result = tracing.causal_trace(model, clean, corrupt, process_group=torch.distributed.group.WORLD)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

__all__ = ["gather", "share"]

B = TypeVar("B")


def _rank_world(group) -> tuple[int, int]:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialized (init_process_group first)")
    return dist.get_rank(group), dist.get_world_size(group)


def share(batches: Sequence[B], group) -> list[B]:
    """This rank's batches (round robin); all of them without a group."""
    if group is None:
        return list(batches)
    rank, world = _rank_world(group)
    return list(batches[rank::world])


def gather(mine: dict, keys: Sequence, group) -> dict:
    """{key: value} for every key of `keys`, from every rank's `mine` (all of it without a group),
    on every rank, in the order of `keys`."""
    if group is None:
        return {k: mine[k] for k in keys}
    import torch.distributed as dist

    _, world = _rank_world(group)
    parts = [None] * world
    dist.all_gather_object(parts, list(mine.items()), group=group)
    merged = {k: v for part in parts for k, v in part}
    missing = [k for k in keys if k not in merged]
    if missing:
        raise RuntimeError(
            f"gdn_intervene: {len(missing)} cells came back from no rank (e.g. {missing[0]}); "
            "did every rank call with the same arguments?"
        )
    return {k: merged[k] for k in keys}
