"""Data parallelism over ``torch.distributed``: each process takes a contiguous shard of the images.

Launch any command under ``torchrun`` (or ``accelerate launch``), which sets RANK, WORLD_SIZE and
the rendezvous variables; ``init_from_env`` joins the group (NCCL when the process has a GPU, gloo
on CPU). Scoring all-reduces its per-neuron sums, so every rank ends with the scores of all images;
evaluation gathers each mask's per-image metrics in image order, so every rank takes the same
search decisions. Only rank 0 writes files. Without a process group every helper is a no-op and a
single process is world 0 of 1.

The ranks end together (``Ending``): on success they meet at a barrier and tear the group down in
the command's own ``finally``; when one rank fails, it posts its one-line message in the launcher's
store, and every other rank, wherever it is (even blocked in a collective), reads it from a
watcher thread and leaves with the same exit code, rank 0 printing the line once.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

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
    if not launched() or not dist.is_available():
        return world(), device
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        if use_cuda and device in (None, "cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        if use_cuda:
            torch.cuda.set_device(torch.device(device))
        # torch.distributed.fsdp (imported by transformers' modeling_utils) keeps references to the
        # default group when it is imported after the group exists; destroy_process_group then leaves
        # gloo's threads alive, and interpreter shutdown can abort the rank with "terminate called
        # without an active exception". Imported first, it holds none.
        importlib.import_module("torch.distributed.fsdp")

        store, rank, size = Ending.current().store, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group("nccl" if use_cuda else "gloo", store=store, rank=rank, world_size=size)
    return world(), device


def launched() -> bool:
    """Started by torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Ending:
    """How the ranks of one command end together: a barrier on success, the first failure for all.

    Made once per process by the command line before any work (``Ending.start``), so that a rank
    failing even before it joins the group reaches the others through the launcher's store.
    """

    POLL_S = 0.2
    WAIT_S = 20.0  # how long a leaving rank waits for the others to have seen the failure

    _current: Ending | None = None

    def __init__(self, store, rank: int, size: int):
        self.store, self.rank, self.size = store, rank, size
        # keys unique to this launch: torchrun keeps its store across restarts
        self.prefix = (
            f"canprobe/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        )
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="canprobe-ending", daemon=True)
        self._watcher.start()

    @classmethod
    def start(cls) -> Ending | None:
        """Meet the launcher's store (None when not launched with several processes)."""
        if not launched() or not dist.is_available():
            return None
        if cls._current is None:
            store, rank, size = next(dist.rendezvous("env://", timeout=timedelta(minutes=30)))
            cls._current = cls(store, rank, size)
        return cls._current

    @classmethod
    def current(cls) -> Ending:
        return cls._current or cls.start()

    def succeed(self) -> None:
        """Meet every rank after the last collective, then tear the group down, before interpreter shutdown."""
        if dist.is_initialized():
            dist.barrier()  # the watcher still runs: a rank failing instead of arriving ends this one
        self._stop.set()
        self._watcher.join()
        if dist.is_initialized():
            dist.destroy_process_group()
        Ending._current = None

    def fail(self, code: int, line: str) -> None:
        """Post this rank's failure for the others (the first one posted wins) and leave with ``code``.

        The process leaves through ``os._exit``: peers may sit in a collective that no teardown
        could finish.
        """
        self._stop.set()
        self._watcher.join()
        key = f"{self.prefix}/failed"
        try:
            first = self.store.compare_set(key, "", json.dumps({"code": code, "line": line}))
            failure = json.loads(first) or {"code": code, "line": line}
        except (RuntimeError, ValueError):  # the store is gone: the other ranks have left already
            failure = {"code": code, "line": line}
        self._leave(failure)

    def _watch(self) -> None:
        key = f"{self.prefix}/failed"
        while not self._stop.wait(self.POLL_S):
            try:
                if self.store.check([key]):
                    self._leave(json.loads(self.store.get(key)))
            except RuntimeError:  # the store's host has left: nothing more to learn from it
                return

    def _leave(self, failure: dict) -> None:
        """Rank 0 prints the line and leaves last: under a plain launch it hosts the store the others read."""
        key = self.prefix + "/left/{}"
        try:
            if self.rank == 0:
                print(failure["line"], file=sys.stderr, flush=True)
                self.store.set(key.format(0), "1")
                others = [key.format(r) for r in range(1, self.size)]
                self.store.wait(others, timedelta(seconds=self.WAIT_S))
            else:  # leave after rank 0 has printed, so that the launcher stops nobody before
                self.store.wait([key.format(0)], timedelta(seconds=self.WAIT_S))
                self.store.set(key.format(self.rank), "1")
        except RuntimeError:  # a rank did not answer in time, or the store's host has gone
            pass
        sys.stdout.flush()
        os._exit(failure["code"])


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
