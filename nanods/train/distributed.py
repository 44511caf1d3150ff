"""Data parallelism under torchrun: process group, rank-0-first setup, DDP or FSDP2 wrapping.

Kept out of the model files: the model never knows it is distributed.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nanods.errors import NanodsError


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max(self, value: float, device: torch.device) -> float:
        """The largest `value` over all ranks, on every rank."""
        if not self.distributed:
            return value
        t = torch.tensor([float(value)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def min(self, value: float, device: torch.device) -> float:
        """The smallest `value` over all ranks, on every rank."""
        return -self.max(-value, device)

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when `flag` is true on any rank (a stop request on one rank stops all)."""
        return bool(self.max(float(flag), device)) if self.distributed else flag

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (building caches); the others wait, then reuse its work."""
        if self.distributed and not self.is_main:
            dist.barrier()
        yield
        if self.distributed and self.is_main:
            dist.barrier()


def shutdown(together: bool = True) -> None:
    """Leave the process group, after a barrier when every rank got here (exiting with live gloo
    threads aborts a rank); a rank that failed alone must not wait for the others."""
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def init_world(device: torch.device) -> tuple[World, torch.device]:
    """Join torchrun's process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World(), device
    if device.type == "mps":
        raise NanodsError("multi-process training runs on cpu or cuda, not mps")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), world_size, local_rank), device


def wrap(model: nn.Module, world: World, parallel: str) -> nn.Module:
    """DDP (buffers not broadcast: expert_bias is updated identically on every rank) or FSDP2."""
    if not world.distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.local_rank] if next(model.parameters()).is_cuda else None
        with warnings.catch_warnings():  # torch 2.13 deprecates it, but its replacement still syncs buffers at init
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def full_state_dict(model: nn.Module, world: World, parallel: str) -> dict[str, torch.Tensor]:
    """The whole, unsharded model state on CPU (every rank must call it under FSDP)."""
    if world.distributed and parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
