"""The training loop, in plain PyTorch: one loop for every task (causal LMs, encoders, any
``nn.Module``); what is specific to a task is the :class:`~distill.train.task.TrainTask` given.

Map of one optimizer step:
  1. ``task.draw_window(grad_accum)``: this rank's micro-batches (causal LM: its rows of each
     global micro-batch, some continued by the student on-policy); ``task.count`` of each,
     summed over the window and all ranks, is the normaliser (a window without any target
     raises :class:`~distill.errors.DistillError`, unless it is on-policy: redrawn, up to 8
     in a row);
  2. per micro-batch: ``loss_sum, parts = task.terms(batch, step)`` (causal LM: teacher logits
     under no_grad, student forward, loss from the output head, intermediate terms),
     ``backward(loss_sum / window_count)``; so batch 8 x 1 == batch 2 x 4, and N ranks == 1;
  3. sum the gradients over ranks (``task.replicated``: one flat all-reduce; FSDP shards were
     reduce-scattered during backward), clip the global gradient norm (``clip_gradients``),
     AdamW step, schedule step, one metrics.jsonl record (rank 0): ``step, loss, <parts>, lr,
     grad_norm, <unit>, <unit>_per_s, elapsed_s, comm_s`` plus the window's ``info`` (the
     parts as ``task.record_fields`` gives them: per-teacher fields with several teachers);
  4. every ``checkpoint.every`` steps and at the end, a checkpoint (student, optimizer, schedule,
     ``task.state_dict()``, every rank's RNG states, the history, the elapsed time).
Before step 1 of a fresh run, ``on_warmup`` gets one timed warm-up micro-batch's measurements.
After each optimizer step (3), ``on_step(step)`` may return a dict merged into that step's record
(a held-out evaluation, for example); a step it returns something for is always logged.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from distill.config import TrainConfig
from distill.errors import DistillError
from distill.io import append_jsonl, atomic_write_text
from distill.sysinfo import peak_rss_bytes
from distill.train.checkpoint import latest_checkpoint, rng_state, save_checkpoint, set_rng_state
from distill.train.distributed import DistContext, all_reduce_gradients, all_reduce_sum
from distill.train.optim import build_optimizer
from distill.train.sharding import clip_gradients
from distill.train.task import TrainTask

__all__ = ["CheckpointPlan", "TrainState", "measure_warmup", "train"]

log = logging.getLogger(__name__)

# On-policy windows whose continuations all ended at once, redrawn in a row before giving up.
_MAX_EMPTY_WINDOWS = 8


@dataclass
class TrainState:
    """What the loop has done so far: the step reached and one record per logged step."""

    step: int = 0
    history: list[dict] = field(default_factory=list)


@dataclass
class CheckpointPlan:
    """Where and how often ``train`` checkpoints, and whether it resumes from there."""

    directory: Path
    every: int = 0
    keep: int = 2
    resume: bool = False


def measure_warmup(task: TrainTask, batch: Any) -> dict[str, float]:
    """Time a forward + backward of ``batch`` and read the process's peak RSS afterwards.

    Runs it twice and times the second: the first call pays one-time allocation costs. Gradients
    are discarded and the torch RNG state restored, so the run is unchanged by it.
    """
    state = torch.get_rng_state()
    for _ in range(2):
        start = time.perf_counter()
        loss_sum, _ = task.terms(batch, 0)
        (loss_sum / max(task.count(batch), 1)).backward()
        seconds = time.perf_counter() - start
        task.trainable.zero_grad(set_to_none=True)
    torch.set_rng_state(state)
    return {"micro_batch_seconds": seconds, "peak_rss_bytes": float(peak_rss_bytes())}


def train(
    task: TrainTask,
    train_config: TrainConfig,
    *,
    metrics_path: Path | None = None,
    description: str = "distill",
    checkpoints: CheckpointPlan | None = None,
    context: DistContext | None = None,
    on_warmup: Callable[[dict[str, float]], None] | None = None,
    on_step: Callable[[int], dict[str, Any] | None] | None = None,
) -> TrainState:
    """Train ``task``'s modules in place for ``train_config.steps`` steps; see the module map.

    Only rank 0 writes metrics and checkpoints. ``checkpoints.resume`` continues from the newest
    valid checkpoint (bit-identical on CPU to an uninterrupted run, with as many processes as
    wrote it) and rewrites ``metrics_path`` to its history, so no step is logged twice or
    missed; without a checkpoint there, the run starts afresh. ``train.max_seconds`` stops
    early (rank 0's clock decides for all ranks).

    ``on_step(step)`` is called on every rank after the optimizer step (the step number just
    completed, 1-based); a dict it returns is merged into that step's record, which is then
    logged whatever ``train.log_every`` says. It must leave the run as it found it (no change
    to the weights, the modules' train mode or any RNG state), so a resumed run stays
    bit-identical, and it must not time the step (its seconds are not in ``<unit>_per_s``).
    It may run collectives only if it does so on every rank; an evaluation that needs the
    whole model must return ``None`` on ranks other than 0 and is not possible under FSDP
    (each rank holds a shard), where the caller should not pass one.
    """
    context = context or DistContext()
    task.start(context, train_config.steps)
    optimizer, scheduler = build_optimizer(task.trainable, train_config)
    state = TrainState()
    elapsed_before = 0.0
    if checkpoints is not None and checkpoints.resume:
        elapsed_before = _resume(
            state, task, optimizer, scheduler, checkpoints, metrics_path, context
        )
    elif on_warmup is not None and (probe := task.warmup_batch()) is not None:
        on_warmup(measure_warmup(task, probe))
    bar = tqdm(
        total=train_config.steps,
        initial=state.step,
        desc=description,
        unit="step",
        dynamic_ncols=True,
        **({} if context.is_main else {"disable": True}),  # TQDM_DISABLE still applies on rank 0
    )
    run_start = time.perf_counter() - elapsed_before
    empty_windows = 0
    while state.step < train_config.steps and not _out_of_time(
        run_start, train_config, context, started=state.step > 0
    ):
        step_start = time.perf_counter()
        window = task.draw_window(train_config.grad_accum)
        count, size = (
            int(total)
            for total in all_reduce_sum(
                [sum(task.count(batch) for batch in window.batches), window.size], context
            )
        )
        if count == 0:
            # The student may end every continuation at once: draw again (bounded), no step.
            empty_windows += 1
            if window.info.get("onpolicy_fraction") and empty_windows < _MAX_EMPTY_WINDOWS:
                log.warning("step %d: an on-policy window without targets; redrawn", state.step + 1)
                continue
            raise DistillError(
                f"step {state.step + 1}: the accumulation window holds no targets (every "
                "micro-batch is prompt, padding or unlabelled); check the data"
            )
        empty_windows = 0
        totals: dict[str, float] = {"loss": 0.0}
        for batch in window.batches:
            loss_sum, parts = task.terms(batch, state.step)
            (loss_sum / count).backward()
            totals["loss"] += loss_sum.item() / count
            for name, value in parts.items():
                totals[name] = totals.get(name, 0.0) + float(value) / count
        comm_start = time.perf_counter()
        all_reduce_gradients(task.replicated, context)
        comm_seconds = time.perf_counter() - comm_start
        totals = dict(zip(totals, all_reduce_sum(list(totals.values()), context), strict=True))
        grad_norm = clip_gradients(list(task.trainable.parameters()), train_config.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        seconds = time.perf_counter() - step_start
        record = {
            "step": state.step,
            **task.record_fields(totals, count),
            "lr": lr,
            "grad_norm": grad_norm,
            task.unit: size,
            f"{task.unit}_per_s": size / seconds,
            "elapsed_s": time.perf_counter() - run_start,
            "comm_s": comm_seconds,
            **window.info,
        }
        extra = on_step(state.step) if on_step is not None else None
        if extra:
            record.update(extra)
        if extra or state.step % train_config.log_every == 0 or state.step == train_config.steps:
            state.history.append(record)
            if metrics_path is not None and context.is_main:
                append_jsonl(metrics_path, record)
        if checkpoints is not None and (
            state.step == train_config.steps
            or (checkpoints.every and state.step % checkpoints.every == 0)
        ):
            _save(state, task, optimizer, scheduler, checkpoints, context, record["elapsed_s"])
        bar.set_postfix(loss=f"{totals['loss']:.4f}", rate=f"{record[f'{task.unit}_per_s']:.0f}")
        bar.update(1)
    bar.close()
    task.finish(context)
    return state


def _out_of_time(
    run_start: float, train_config: TrainConfig, context: DistContext, started: bool
) -> bool:
    """Whether ``train.max_seconds`` of training have passed (rank 0's clock decides for all)."""
    if not train_config.max_seconds or not started:
        return False
    elapsed = time.perf_counter() - run_start
    if context.enabled:  # every rank must stop at the same step
        elapsed = all_reduce_sum([elapsed if context.is_main else 0.0], context)[0]
    return elapsed >= train_config.max_seconds


def _save(state, task, optimizer, scheduler, checkpoints, context, elapsed_s: float) -> None:
    """Rank 0 writes the checkpoint in the unsharded format (FSDP: gathered from all ranks)."""
    rng_states = [rng_state()]
    if context.enabled:
        rng_states = [None] * context.world_size
        torch.distributed.all_gather_object(rng_states, rng_state())
    trainer_state = {
        "scheduler": scheduler.state_dict(),
        "rng": rng_states,
        "history": state.history,
        "elapsed_s": elapsed_s,
        **task.state_dict(),
    }
    model, optimizer_state = task.checkpoint_state(optimizer)
    if context.is_main:
        save_checkpoint(
            checkpoints.directory,
            state.step,
            model,
            optimizer_state,
            trainer_state,
            checkpoints.keep,
        )
    if context.enabled:
        torch.distributed.barrier()


def _resume(state, task, optimizer, scheduler, checkpoints, metrics_path, context) -> float:
    """Restore the newest valid checkpoint (if any); return the elapsed seconds it had trained."""
    checkpoint = latest_checkpoint(checkpoints.directory)
    if checkpoint is None:
        if metrics_path is not None and context.is_main and metrics_path.exists():
            metrics_path.unlink()
        return 0.0
    saved = task.load_checkpoint(checkpoint, optimizer)
    scheduler.load_state_dict(saved["scheduler"])
    task.load_state_dict(saved)
    rng_states = saved["rng"]
    if len(rng_states) != context.world_size:
        raise DistillError(
            f"checkpoint {checkpoint} was written by {len(rng_states)} process(es); resume it "
            f"with the same number, not {context.world_size}"
        )
    set_rng_state(rng_states[context.rank])
    state.step = saved["step"]
    state.history = list(saved["history"])
    if metrics_path is not None and context.is_main:
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in state.history))
    log.info("resumed from %s at step %d", checkpoint, state.step)
    return saved["elapsed_s"]
