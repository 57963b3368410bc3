"""Running the same training on several processes (GPUs or nodes) with torch.distributed.

Start it with `torchrun --nproc-per-node N ...`: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT, and `init_distributed` joins the process group from them. With
WORLD_SIZE unset or 1 everything here is a no-op, so the single-process path is the same code.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only this process logs progress and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment variables.

    Uses NCCL when `device` is a CUDA device, gloo otherwise. Safe to call twice (a group that
    exists is reused). Returns DistInfo(rank 0, world 1) when WORLD_SIZE is unset or 1.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        log.info("rank %d of %d joined the %s process group", rank, world_size, backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def make_sampler(dataset, info: DistInfo, *, shuffle: bool, seed: int) -> DistributedSampler:
    """Each rank's share of the dataset. One process uses it too (num_replicas=1), so the order
    of samples for a given (seed, epoch) is the same with one process or many; call
    `set_epoch` every epoch."""
    return DistributedSampler(
        dataset,
        num_replicas=info.world_size,
        rank=info.rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=False,
    )


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `model` when running on several processes, else `model`.

    Every trainable parameter must get a gradient each step (no find_unused_parameters, which
    costs an extra graph traversal)."""
    if not info.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank: a cancel seen by one process stops
    all of them at the same step, so none waits forever in an all-reduce."""
    if not info.enabled:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "DistInfo",
    "any_rank",
    "barrier",
    "cleanup",
    "init_distributed",
    "make_sampler",
    "unwrap",
    "wrap_model",
]
