"""Multi-process data parallelism on torch.distributed, launched by ``torchrun``.

Each rank holds a full student replica and takes its own rows of every global micro-batch. The
loss of each rank is its token sum divided by the token count of the whole window over all ranks,
so summing the gradients over ranks (one flat all-reduce per optimizer step) gives exactly the
single-process gradient of the same global batch. ``parallel.strategy=fsdp`` shards instead
(:mod:`distill.train.sharding`), with the same normalisation and summed gradients.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from distill.errors import ConfigError

__all__ = [
    "DistContext",
    "init_distributed",
    "resolve_device",
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


def resolve_device(setting: object = "auto", local_rank: int = 0) -> torch.device:
    """The device that ``train.device`` names for this process.

    ``setting`` is a :class:`~distill.config.TrainConfig` (its ``device``) or the string itself:
    ``auto`` = ``cuda:<local_rank>`` when torch sees a GPU, else CPU; ``cpu``; ``cuda`` =
    ``cuda:<local_rank>``; ``cuda:N`` = that GPU. A GPU that is not there is a
    :class:`ConfigError` (one line, exit 2), raised before any model is loaded.
    """
    name = str(getattr(setting, "device", setting))
    if name == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda", local_rank) if available else torch.device("cpu")
    if name != "cuda" and not name.startswith("cuda:"):
        raise ConfigError(f"train.device={name}: expected auto, cpu, cuda or cuda:N")
    if not available:
        build = "built without CUDA" if torch.version.cuda is None else "sees no GPU"
        raise ConfigError(
            f"train.device={name}: this torch {torch.__version__} {build}; "
            "use train.device=cpu (or auto)"
        )
    index = local_rank if name == "cuda" else int(name.split(":", 1)[1])
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"train.device={name}: GPU {index} does not exist ({count} visible: 0..{count - 1})"
        )
    return torch.device("cuda", index)


def init_distributed(backend: str = "auto", device: object = "auto") -> DistContext:
    """Join the process group that torchrun describes in the environment; one process otherwise.

    ``backend`` auto is NCCL when this rank trains on a GPU (``device``, see
    :func:`resolve_device`), else gloo."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = str(getattr(device, "device", device))
    if name.startswith("cuda:"):
        raise ConfigError(
            f"train.device={name} names one GPU for all {world_size} ranks: under torchrun use "
            "train.device=cuda (rank i takes GPU LOCAL_RANK) or auto"
        )
    placed = resolve_device(device, local_rank)
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if placed.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        atexit.register(_leave_process_group)
    if placed.type == "cuda":
        torch.cuda.set_device(placed)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)


def _leave_process_group() -> None:
    """Tear the group down before the interpreter does: gloo's threads destroyed at interpreter
    teardown can abort the process after a finished run."""
    if dist.is_initialized():
        dist.destroy_process_group()


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
