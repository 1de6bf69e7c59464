"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for a student and a teacher that do not fit one
device, and the mixed-precision settings of both strategies.

Layout: every decoder layer is its own FSDP unit, then the root takes what is left (embeddings,
final norm, output head; tied embeddings stay one parameter). FSDP gathers a unit's parameters
only inside that unit's ``forward``, so the student is wrapped in :class:`Objective`, whose forward
runs a whole callable (decoder, head, loss, teacher) on the student with the root's parameters
gathered. Gradients are **summed** over ranks (divide factor 1, as the DDP path does): each
rank's loss is already divided by the token count of the whole window over all ranks.

The teacher is frozen (no gradients, so no optimizer state and no gradient communication),
sharded the same way, and gathers one layer at a time during its forward (its root too is
resharded right after the forward; nothing of it stays gathered between batches).

Checkpoints keep the single-process format: the full state dicts are gathered on rank 0 and the
optimizer state is keyed by parameter index, exactly as ``optimizer.state_dict()`` of an unsharded
model, so a run can be resumed under the other strategy too (``--force``: the key differs).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from distill.errors import ConfigError

__all__ = [
    "Objective",
    "autocast",
    "clip_gradients",
    "decoder_layers",
    "device_mesh",
    "full_model_state",
    "full_optimizer_state",
    "is_sharded",
    "load_full_model_state",
    "load_full_optimizer_state",
    "mixed_precision_policy",
    "shard_student",
    "shard_teacher",
]

log = logging.getLogger(__name__)


class Objective(nn.Module):
    """The student as a submodule; ``objective(fn, *args)`` = ``fn(student, *args)`` inside one
    forward, so FSDP gathers the root's parameters (the output head included) for all of it."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.student, *args, **kwargs)


def is_sharded(module: nn.Module | None) -> bool:
    return isinstance(module, FSDPModule)


def _low_precision_wanted(setting: str, device: torch.device) -> bool:
    if setting == "no":
        return False
    if device.type != "cuda":
        log.warning(
            "parallel.mixed_precision=%s is ignored on %s (bfloat16 matmuls are slow there): "
            "training in float32",
            setting,
            device.type,
        )
        return False
    return True


def mixed_precision_policy(setting: str, device: torch.device) -> MixedPrecisionPolicy:
    """FSDP2's policy: bf16 gathered parameters and compute, float32 gradient reduction (and
    float32 sharded master weights and optimizer state); the default policy elsewhere."""
    if not _low_precision_wanted(setting, device):
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def autocast(setting: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The data-parallel path's mixed precision: bf16 autocast on GPU, nothing elsewhere."""
    if not _low_precision_wanted(setting, device):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def device_mesh(world_size: int) -> DeviceMesh:
    """A 1-D mesh over all ranks on this process's device: CUDA under NCCL (``train.device``
    chose a GPU, see :func:`distill.train.distributed.init_distributed`), else CPU."""
    nccl = torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl"
    return init_device_mesh("cuda" if nccl else "cpu", (world_size,))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: modules of the classes the model names in
    ``_no_split_modules`` (Hugging Face models), else the children of ``base_model.layers``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers, prefixes = [], []
    for name, module in model.named_modules():
        outer = any(name.startswith(prefix) for prefix in prefixes)  # inside a kept block
        if module is not model and type(module).__name__ in names and not outer:
            layers.append(module)
            prefixes.append(name + ".")
    if layers:
        return layers
    stack = getattr(getattr(model, "base_model", model), "layers", None)
    if isinstance(stack, nn.ModuleList):
        return list(stack)
    raise ConfigError(
        f"parallel.strategy=fsdp: cannot find the decoder layers of {type(model).__name__} "
        "(no _no_split_modules, no base_model.layers)"
    )


def shard_student(student: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy) -> Objective:
    """Shard ``student`` in place (its layers, then an :class:`Objective` root around it) with
    summed gradient reduction; returns the root."""
    objective = Objective(student)
    for layer in decoder_layers(student):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(objective, mesh=mesh, mp_policy=policy)
    for module in objective.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum, not mean: the loss is pre-normalised
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (no PREMUL_SUM: gloo)
    # Hugging Face ``generate`` then keeps every rank decoding until all ranks are done
    # (synced_gpus), so on-policy sampling issues the same collectives on every rank.
    student._is_fsdp_managed_module = True
    return objective


def shard_teacher(teacher: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy) -> None:
    """Freeze and shard ``teacher`` in place; its root forward gathers, and then frees, each unit."""
    teacher.eval().requires_grad_(False)
    for layer in decoder_layers(teacher):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # Not the root's default (kept gathered after forward, for a backward): no backward comes.
    fully_shard(teacher, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    teacher._is_fsdp_managed_module = True


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank calls it; rank 0 gets the full state dict on CPU, the others an empty dict."""
    return get_model_state_dict(module, options=_FULL)


def load_full_model_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every rank passes the same full state dict; each keeps its own shards."""
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in ``optimizer.state_dict()``'s index order."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every rank calls it; rank 0 gets the state as an unsharded optimizer's ``state_dict()``
    (parameters by index, full CPU tensors), the others an empty dict."""
    by_name = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    groups = []
    for group in by_name["param_groups"]:
        groups.append({**group, "params": [index[name] for name in group["params"]]})
    return {
        "state": {index[name]: value for name, value in by_name["state"].items()},
        "param_groups": groups,
    }


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Every rank passes the same index-keyed full state (from :func:`full_optimizer_state` or an
    unsharded optimizer); each keeps its own shards."""
    names = _parameter_names(model, optimizer)
    by_name = {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [names[i] for i in group["params"]]}
            for group in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(
        model, optimizer, by_name, options=StateDictOptions(full_state_dict=True)
    )


def _local(grads: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    for grad in grads:
        yield grad.to_local() if isinstance(grad, DTensor) else grad


def clip_gradients(parameters: list[nn.Parameter], max_norm: float) -> float:
    """Clip to the global gradient norm (sharded gradients: the norm over all ranks' shards) and
    return that norm; ``max_norm`` 0 only measures it."""
    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    if not sharded:  # the unsharded path, bit for bit as before
        if max_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
        return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in plain])))
    norm = torch.nn.utils.get_total_norm(sharded)
    norms = [norm.full_tensor() if isinstance(norm, DTensor) else norm]  # all-reduce of squares
    if plain:
        norms.append(torch.nn.utils.get_total_norm(plain).to(norms[0].device))
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    if max_norm > 0:
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in _local(grads):
            grad.mul_(coefficient.to(grad.device, grad.dtype))
    return float(total)
