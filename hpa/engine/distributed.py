"""torchrun process groups: join, rank and world size, barriers, broadcasting one object.
"""

from __future__ import annotations

import os

import torch


def init_distributed(device: str = "cpu") -> tuple[int, int]:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    Returns ``(rank, world_size)``; ``(0, 1)`` for an ordinary single process. Backend:
    nccl for CUDA devices, gloo otherwise. Safe to call twice.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
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
