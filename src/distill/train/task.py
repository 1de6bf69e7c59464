"""What :func:`distill.train.loop.train` is given: a :class:`TrainTask`, the part of a run that is
specific to its models and data. The loop owns the step (normalisation, gradient sum over
ranks, clipping, optimizer and schedule), the metrics and the checkpoints; a task owns the
modules, the micro-batches, how they are counted and what their loss is.

Two tasks: :class:`~distill.train.causal_lm.CausalLMTask` (decoder LMs: FSDP/DDP, mixed
precision, on-policy batches, intermediate-layer terms) and :class:`ModuleTask` (any
``nn.Module``: a terms function, a count function and a re-iterable loader; the classifier and
encoder runs).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from distill.config import LossConfig
from distill.errors import ConfigError
from distill.losses.schedule import LossSchedule, LossSettings
from distill.train.checkpoint import load_checkpoint
from distill.train.distributed import DistContext
from distill.train.loader import LoaderPosition

__all__ = ["ModuleTask", "TermsFn", "TrainTask", "Window", "refuse_torchrun"]


def refuse_torchrun(what: str) -> None:
    """Raise :class:`ConfigError` when launched by torchrun with more than one process:
    ``what`` (module and encoder runs) trains in one process only."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"{what} trains in one process: run it without torchrun")


@dataclass
class Window:
    """This rank's micro-batches of one optimizer step, their ``size`` (the record's ``tokens`` or
    ``items``, summed over ranks by the loop) and extra record fields (on-policy statistics)."""

    batches: list[Any]
    size: int
    info: dict[str, float | None] = field(default_factory=dict)


class TrainTask(Protocol):
    """The task-specific half of a training run (see the module docstring)."""

    unit: str  # what ``Window.size`` counts: "tokens" or "items" (metrics.jsonl keys)
    student: nn.Module  # the unsharded student: checkpointed and trained in place
    trainable: nn.Module  # every module the optimizer steps (sharded or not)
    replicated: nn.Module | None  # trainable modules whose gradients the loop sums over ranks

    def start(self, context: DistContext, total_steps: int) -> None:
        """Before the optimizer is built: shard / move the modules, set the training mode."""

    def draw_window(self, grad_accum: int) -> Window: ...

    def count(self, batch: Any) -> int:
        """Targets (tokens, labelled items) of a micro-batch: the window's normaliser."""

    def terms(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's summed loss (with grad) and its named summed parts (logged) at
        optimizer step ``step`` (0-based)."""

    def warmup_batch(self) -> Any | None:
        """A micro-batch to time before the first step (None: no warm-up measurement)."""

    def record_fields(self, totals: dict[str, float], count: int) -> dict[str, Any]:
        """The step record's loss fields from the window's parts (``loss`` and the named parts
        of :meth:`terms`, summed over the window and the ranks, each divided by the window's
        target ``count``): the totals as they are, or a task's own view of them."""

    def checkpoint_state(
        self, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer | dict]:
        """The student and optimizer (state) to save, gathered whole (collective under FSDP)."""

    def load_checkpoint(self, checkpoint: Path, optimizer: torch.optim.Optimizer) -> dict:
        """Restore student and optimizer from ``checkpoint``; return its trainer state."""

    def state_dict(self) -> dict[str, Any]:
        """The data position (and the task's own state), merged into the trainer state."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def finish(self, context: DistContext) -> None:
        """After the last step: the trained weights into ``student`` (FSDP), evaluation mode."""


# (micro-batch, the step's loss settings) -> its summed objective and named summed parts (0-d).
TermsFn = Callable[[Any, LossSettings], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class ModuleTask:
    """Any ``nn.Module`` on a re-iterable ``loader``: ``terms_fn(batch, settings)`` gives the
    micro-batch's summed loss and named parts at the step's :class:`LossSettings` (``loss``
    with its schedules applied), ``count_fn(batch)`` the number of items those sums run over.
    One process only: under torchrun :meth:`start` refuses before any training.

    The data position is a :class:`LoaderPosition` (epoch, batches drawn, the loader's RNG
    states), so a resumed run draws the same batches as an uninterrupted one.
    """

    unit = "items"

    def __init__(
        self,
        student: nn.Module,
        loader: Iterable,
        terms_fn: TermsFn,
        count_fn: Callable[[Any], int],
        loss: LossConfig,
    ) -> None:
        self.student = self.trainable = self.replicated = student
        self.batches = LoaderPosition(loader)
        self.terms_fn = terms_fn
        self.count_fn = count_fn
        self.loss = loss
        self.schedule: LossSchedule | None = None

    def start(self, context: DistContext, total_steps: int) -> None:
        refuse_torchrun("a module task")
        if context.enabled:
            raise ConfigError("a module task trains in one process: pass no process group")
        self.schedule = LossSchedule(self.loss, total_steps)
        self.student.train()

    def draw_window(self, grad_accum: int) -> Window:
        batches = [self.batches.next() for _ in range(grad_accum)]
        return Window(batches, sum(self.count(batch) for batch in batches))

    def count(self, batch: Any) -> int:
        return int(self.count_fn(batch))

    def terms(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.terms_fn(batch, self.schedule.at(step))

    def warmup_batch(self) -> None:
        return None

    def record_fields(self, totals: dict[str, float], count: int) -> dict[str, Any]:
        return totals

    def checkpoint_state(self, optimizer: torch.optim.Optimizer):
        return self.student, optimizer

    def load_checkpoint(self, checkpoint: Path, optimizer: torch.optim.Optimizer) -> dict:
        return load_checkpoint(checkpoint, self.student, optimizer)

    def state_dict(self) -> dict[str, Any]:
        generators = [g.get_state() for g in self.batches.generators()]
        return {"data": self.batches.state_dict(), "loader_rng": generators}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The position, then the loader's generators as they were at the checkpoint (the loop
        restores the process RNGs afterwards)."""
        self.batches.restore(state["data"])
        generators = self.batches.generators()
        if len(generators) != len(state["loader_rng"]):
            raise ValueError(
                f"loader: the checkpoint holds {len(state['loader_rng'])} loader generator "
                f"state(s), this loader has {len(generators)}; resume with the same kind of loader"
            )
        for generator, saved in zip(generators, state["loader_rng"], strict=True):
            generator.set_state(saved)

    def finish(self, context: DistContext) -> None:
        self.student.eval()
