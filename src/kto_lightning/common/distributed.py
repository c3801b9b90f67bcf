"""Collectives that work the same with one process or many (DDP, FSDP, DeepSpeed)."""

from __future__ import annotations

from typing import TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def collective_device() -> torch.device:
    """Where a tensor must be for a collective: the rank's GPU under NCCL, the CPU otherwise."""
    if _active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank. Nothing in one process."""
    if _active():
        dist.barrier()


def gather_objects(value: T) -> list[T]:
    """Every rank's `value` (anything picklable), in rank order. [value] in one process."""
    if not _active():
        return [value]
    gathered: list[T | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return cast(list[T], gathered)  # every slot filled


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over ranks (a new tensor; the input is untouched). Identity in one process."""
    if not _active():
        return tensor
    reduced = tensor.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


def gather_cat(tensor: Tensor) -> Tensor:
    """Concatenate a 1-D tensor of any per-rank length across ranks, in rank order."""
    if not _active():
        return tensor
    size = torch.tensor([tensor.numel()], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.numel()] = tensor
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes, strict=True)])
