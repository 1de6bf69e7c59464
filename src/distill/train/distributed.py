"""Multi-process data parallelism on torch.distributed, launched by ``torchrun``.

Each rank holds a full student replica and takes its own rows of every global micro-batch. The
loss of each rank is its token sum divided by the token count of the whole window over all ranks,
so summing the gradients over ranks (one flat all-reduce per optimizer step) gives exactly the
single-process gradient of the same global batch. ``parallel.strategy=fsdp`` shards instead
(:mod:`distill.train.sharding`), with the same normalisation and summed gradients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = [
    "DistContext",
    "init_distributed",
    "all_reduce_sum",
    "all_reduce_gradients",
    "broadcast_parameters",
]


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str = "auto") -> DistContext:
    """Join the process group that torchrun describes in the environment; one process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)


def all_reduce_sum(values: list[float], context: DistContext) -> list[float]:
    """Sum a few Python numbers over all ranks (identity on one process)."""
    if not context.enabled:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_gradients(model: torch.nn.Module | None, context: DistContext) -> None:
    """Sum every parameter's gradient over ranks in one flat buffer."""
    if not context.enabled or model is None:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(reduced)


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (no-op without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)
