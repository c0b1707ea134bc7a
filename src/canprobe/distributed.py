"""Data parallelism over ``torch.distributed``: each process takes a contiguous shard of the images.

Launch any command under ``torchrun`` (or ``accelerate launch``), which sets RANK, WORLD_SIZE and
the rendezvous variables; ``init_from_env`` joins the group (NCCL when the process has a GPU, gloo
on CPU). Scoring all-reduces its per-neuron sums, so every rank ends with the scores of all images;
evaluation gathers each mask's per-image metrics in image order, so every rank takes the same
search decisions. Only rank 0 writes files. Without a process group every helper is a no-op and a
single process is world 0 of 1.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The process that writes files and prints results."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def shard(self, n: int) -> range:
        """This rank's contiguous block of ``n`` items (blocks in rank order give 0..n-1)."""
        return range(n * self.rank // self.size, n * (self.rank + 1) // self.size)

    def take(self, items: Sequence | None) -> list | None:
        """This rank's shard of ``items`` (None stays None)."""
        return None if items is None else [items[i] for i in self.shard(len(items))]


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_from_env(device: str | None = None) -> tuple[World, str | None]:
    """Join the process group the launcher describes (WORLD_SIZE > 1); return the world and the device to use.

    A process that sees a GPU takes ``cuda:LOCAL_RANK`` unless ``device`` says otherwise.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return world(), device
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        if use_cuda and device in (None, "cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        if use_cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if use_cuda else "gloo")
        # left to interpreter shutdown, gloo's threads can abort the process ("terminate called
        # without an active exception") after the work is done
        atexit.register(dist.destroy_process_group)
    return world(), device


def _device() -> torch.device:
    """Collectives run on GPU tensors under NCCL and CPU tensors under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over all ranks (the tensor itself when not parallel)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of ``tensor`` over all ranks (the tensor itself when not parallel)."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def _all_reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    if not world().parallel:
        return tensor
    buffer = tensor.to(_device())
    dist.all_reduce(buffer, op=op)
    return buffer.to(tensor.device)


def gather(items: Sequence) -> list:
    """Every rank's ``items`` concatenated in rank order (with ``World.shard``: the original order)."""
    if not world().parallel:
        return list(items)
    parts: list = [None] * world().size
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if not world().parallel:
        return obj
    box = [obj if world().main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
