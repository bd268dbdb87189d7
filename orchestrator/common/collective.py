"""Reductions across the data-parallel workers of one training run, over torch.distributed (the
process group Ray Train's TorchTrainer sets up); in a single process they return their input."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def reduced(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """`op` (sum, MIN, MAX) over every worker's `tensor`: a new tensor, or `tensor` itself in a single process."""
    if world_size() == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=op)
    return tensor


def sum_across_workers(values: list[float], op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
    """`op` over every worker's `values`, element by element."""
    return reduced(torch.tensor(values, dtype=torch.float64), op).tolist()


def mean_across_workers(value: torch.Tensor) -> torch.Tensor:
    return reduced(value) / world_size()
