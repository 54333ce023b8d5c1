"""Single-process or torchrun data-parallel context (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as td
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Context:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            td.barrier()

    def shard(self, items: list) -> list:
        """This rank's share; every rank gets the same count so collective calls stay in step."""
        usable = len(items) - len(items) % self.world
        return items[self.rank : usable : self.world]

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, model: torch.nn.Module, sync: bool):
        """Skip the gradient all-reduce on all but the last accumulated batch."""
        if sync or not isinstance(model, DistributedDataParallel):
            return contextlib.nullcontext()
        return model.no_sync()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        td.all_reduce(t)
        return t.tolist()

    def broadcast_flag(self, flag: bool) -> bool:
        """The main rank's decision, seen by every rank."""
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.device)
        td.broadcast(t, src=0)
        return bool(t.item())

    def close(self) -> None:
        if self.distributed and td.is_initialized():
            td.destroy_process_group()


def setup(device: str = "auto") -> Context:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("nmt-train: error: --device cuda, but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context(0, 1, torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    td.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return Context(rank, world, dev)
