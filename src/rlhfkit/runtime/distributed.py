"""One training loop for one process or many: set-up and helpers for torchrun / accelerate launch.

Launchers export RANK, WORLD_SIZE and LOCAL_RANK; when they are absent we run as a single process.
Backend: nccl on CUDA, gloo on CPU. Only rank 0 writes files and prints progress.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str = "cpu") -> DistInfo:
    """Join the process group when launched by torchrun/accelerate; otherwise a single-process DistInfo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        # On GPUs, NCCL for CUDA tensors and gloo for the small CPU tensors of metrics and statistics.
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return DistInfo(rank, world, local)


T = TypeVar("T")


def run_on_ranks(body: Callable[[DistInfo], T], device: torch.device) -> T:
    """Join the process group (if launched by torchrun/accelerate), run `body`, always leave the group."""
    info = init_distributed(device.type)
    try:
        result = body(info)
    except BaseException:
        cleanup()  # no barrier: the other ranks may be inside a collective this rank will never join
        raise
    # Free what the run left in reference cycles (a DDP reducer among them) while the group still
    # exists: a reducer destroyed after destroy_process_group can hang in its process group's teardown.
    gc.collect()
    cleanup(synchronize=True)
    return result


def local_rank_from_env() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def cleanup(synchronize: bool = False) -> None:
    """Leave the process group; after a successful run, first wait until every rank got here (a rank
    that tears down while another still finishes its last collective can abort the other)."""
    if dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (returns a new tensor; a no-op copy on one process)."""
    out = value.detach().clone()
    if info.enabled:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Send a picklable object from rank 0 to every rank (used for small control messages only)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: object, info: DistInfo) -> list[object]:
    """Every rank's picklable object, in rank order, on every rank (small messages only)."""
    if not info.enabled:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def print0(info: DistInfo, *args: object) -> None:
    if info.is_main:
        print(*args, flush=True)
