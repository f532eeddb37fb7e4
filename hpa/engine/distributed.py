"""torchrun process groups: join, rank and world size, barriers, broadcasting one object.

Waiting for rank 0's long work: a barrier of the default process group times out after 30
minutes (gloo; NCCL's watchdog even sooner), but rank 0 may spend hours building a field or
crop cache for 21,806 fields while the other ranks wait. :func:`main_first` runs such work on
rank 0 while the others wait on a barrier of a separate gloo group with a timeout of
:data:`WAIT_TIMEOUT` (a week); training's own collectives keep the default group and its timeout.
If rank 0 fails, torchrun stops the other ranks, so nobody waits for nothing.
"""

from __future__ import annotations

import datetime
import os
from typing import Callable, TypeVar

import torch

T = TypeVar("T")

#: How long a rank waits for rank 0's long work (:func:`main_first`).
WAIT_TIMEOUT = datetime.timedelta(days=7)
_WAIT_GROUP = None


def init_distributed(device: str = "cpu", timeout: datetime.timedelta | None = None) -> tuple[int, int]:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    Returns ``(rank, world_size)``; ``(0, 1)`` for an ordinary single process. Backend:
    nccl for CUDA devices, gloo otherwise; ``timeout``: the default group's (None: torch's
    default). Also makes the long-wait gloo group of :func:`main_first`. Safe to call twice.
    """
    global _WAIT_GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, **({"timeout": timeout} if timeout is not None else {}))
    if _WAIT_GROUP is None:
        _WAIT_GROUP = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of this process (``(0, 1)`` outside a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return dist_info()[0] == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist_info()[1] > 1:
        torch.distributed.barrier()


def wait_barrier() -> None:
    """A barrier that waits up to :data:`WAIT_TIMEOUT` (no-op in a single process)."""
    if dist_info()[1] > 1:
        if _WAIT_GROUP is None:
            raise RuntimeError("wait_barrier() needs init_distributed() first")
        torch.distributed.barrier(group=_WAIT_GROUP)


def main_first(fn: Callable[[], T]) -> T | None:
    """Run ``fn()`` on rank 0 while the other ranks wait (up to :data:`WAIT_TIMEOUT`); returns
    ``fn()``'s result on rank 0, None elsewhere. In a single process: just ``fn()``."""
    rank, world = dist_info()
    if world == 1:
        return fn()
    out = fn() if rank == 0 else None  # an error on rank 0 ends the job: torchrun stops the waiting ranks
    wait_barrier()
    return out


def local_device(device: str) -> str:
    """``cuda`` -> ``cuda:LOCAL_RANK`` under torchrun; anything else unchanged."""
    if device == "cuda" and dist_info()[1] > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def broadcast_object(obj):
    if dist_info()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
