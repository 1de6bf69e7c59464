"""The distillation training loop, in plain PyTorch.

Map of one optimizer step:
  1. draw ``grad_accum`` micro-batches, take this rank's rows, replace a batch by the student's
     own continuations with probability ``onpolicy.lambda``, and count the target tokens of the
     window over all ranks (the normaliser);
  2. per micro-batch: teacher logits under no_grad, student logits, summed loss terms (all
     inside one forward of the :class:`~distill.train.sharding.Objective` around the student),
     ``backward(loss_sum / window_tokens)``;
  3. sum the gradients over ranks (ddp: one flat all-reduce; fsdp: reduce-scattered during
     backward), clip the global gradient norm, AdamW step, schedule step, one metrics.jsonl
     record.
Before step 1 of the run, one warm-up micro-batch is timed and measured for the plan.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from distill.config import LossConfig, ParallelConfig, TrainConfig
from distill.data import Batch, BlockBatches
from distill.errors import DistillError
from distill.io import append_jsonl, atomic_write_text
from distill.losses import IGNORE_INDEX, LossTerms
from distill.losses.objective import head_distillation_loss
from distill.losses.schedule import scheduled_alpha_temperature
from distill.sysinfo import peak_rss_bytes
from distill.teacher import LiveTeacher, Teacher
from distill.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from distill.train.distributed import (
    DistContext,
    all_reduce_gradients,
    all_reduce_sum,
    broadcast_parameters,
)
from distill.train.loader import LoaderPosition
from distill.train.onpolicy import OnPolicy
from distill.train.optim import build_optimizer
from distill.train.sharding import (
    Objective,
    autocast,
    clip_gradients,
    device_mesh,
    full_model_state,
    full_optimizer_state,
    is_sharded,
    load_full_model_state,
    load_full_optimizer_state,
    mixed_precision_policy,
    shard_student,
    shard_teacher,
)

__all__ = [
    "CheckpointPlan",
    "TrainState",
    "student_logits",
    "train",
    "labels_for",
    "measure_warmup",
    "TrainHistory",
    "train_module",
]

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What the loop has done so far: the step reached and one record per logged step."""

    step: int = 0
    history: list[dict] = field(default_factory=list)


def labels_for(input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with the logits: ``labels[:, t] = input_ids[:, t + 1]``.

    The last position has no target (``IGNORE_INDEX``). Shape ``[B, T]``.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def student_logits(
    student: PreTrainedModel, input_ids: torch.Tensor, vocab_rows: int
) -> torch.Tensor:
    """Student logits ``[B, T, vocab_rows]``: decoder hidden states, then the output head rows."""
    hidden = student.base_model(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, H)
    return torch.nn.functional.linear(hidden, *output_head(student, vocab_rows))


def output_head(
    student: PreTrainedModel, vocab_rows: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection's first ``vocab_rows`` rows ``[V, H]`` and its bias ``[V]`` (or None)."""
    head = student.get_output_embeddings()
    bias = head.bias[:vocab_rows] if getattr(head, "bias", None) is not None else None
    return head.weight[:vocab_rows], bias


def micro_batch_terms(
    student: PreTrainedModel,
    teacher: Teacher | None,
    input_ids: torch.Tensor,
    loss_config: LossConfig,
    vocab_rows: int,
    *,
    labels: torch.Tensor | None = None,
    on_policy: bool = False,
    step: int = 0,
    total_steps: int = 1,
    upcast: bool = False,
) -> LossTerms:
    """Summed loss terms of one micro-batch ``[B, T]`` at optimizer step ``step`` (0-based).

    ``labels`` ``[B, T]`` default to every next token (packed text). An ``on_policy`` batch
    (student-written targets) takes the divergence alone (alpha = 0). The student forward stops
    before its head: the loss takes the hidden states and the head (fused: the ``[B*T, V]``
    student logits are never built) and dispatches on the targets' kind. A batch without any
    target gives zero terms (its rows were all prompt or padding). ``upcast`` (mixed precision)
    computes the head and the loss in float32 from the bf16 decoder's hidden states.
    """
    cfg = loss_config
    alpha, temperature = scheduled_alpha_temperature(cfg, step, total_steps)
    alpha = 0.0 if on_policy else alpha
    labels = labels_for(input_ids) if labels is None else labels
    hidden = student.base_model(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, H)
    needs_teacher = alpha < 1.0 and teacher is not None
    if not bool((labels != IGNORE_INDEX).any()):
        if needs_teacher and is_sharded(getattr(teacher, "model", None)):
            teacher.soft_targets(input_ids)  # a sharded teacher's forward is collective: run it
        zero = hidden.sum() * 0.0  # keeps every parameter in the graph (gradients of zero)
        return LossTerms(zero, zero.detach(), zero.detach(), 0)
    targets = teacher.soft_targets(input_ids) if needs_teacher else None
    weight, bias = output_head(student, vocab_rows)
    precision = contextlib.nullcontext()
    if upcast:
        hidden, weight = hidden.float(), weight.float()
        bias = bias.float() if bias is not None else None
        precision = torch.autocast(hidden.device.type, enabled=False)
    with precision:
        return _head_loss(hidden, weight, bias, targets, labels, cfg, temperature, alpha)


def _head_loss(hidden, weight, bias, targets, labels, cfg, temperature, alpha) -> LossTerms:
    return head_distillation_loss(
        hidden.reshape(-1, hidden.shape[-1]),  # (B*T, H)
        weight,
        bias,
        targets,
        labels.reshape(-1),
        temperature=temperature,
        alpha=alpha,
        divergence=cfg.divergence,
        beta=cfg.beta,
        skew=cfg.skew,
        scale_by_t2=cfg.scale_by_t2,
        fused=cfg.fused,
        chunk_size=cfg.chunk_size,
        memory_budget_mb=cfg.memory_budget_mb,
        sparse=cfg.sparse,
    )


def measure_warmup(
    student: PreTrainedModel,
    teacher: Teacher | None,
    input_ids: torch.Tensor,
    loss_config: LossConfig,
    vocab_rows: int,
    *,
    forward: Callable[[torch.Tensor], LossTerms] | None = None,
) -> dict[str, float]:
    """Time a forward + backward micro-batch and read the process's peak RSS afterwards.

    Runs it twice and times the second: the first call pays one-time allocation costs. Gradients
    are discarded and the RNG state restored, so the run is unchanged by it. ``forward(input_ids)``
    replaces :func:`micro_batch_terms` (the loop passes its own: sharded, mixed precision).
    """
    rng_state = torch.get_rng_state()
    for _ in range(2):
        start = time.perf_counter()
        if forward is None:
            terms = micro_batch_terms(student, teacher, input_ids, loss_config, vocab_rows)
        else:
            terms = forward(input_ids)
        (terms.loss_sum / max(terms.n_tokens, 1)).backward()
        seconds = time.perf_counter() - start
        student.zero_grad(set_to_none=True)
    torch.set_rng_state(rng_state)
    return {"micro_batch_seconds": seconds, "peak_rss_bytes": float(peak_rss_bytes())}


@dataclass
class CheckpointPlan:
    """Where and how often ``train`` checkpoints, and whether it resumes from there."""

    directory: Path
    every: int = 0
    keep: int = 2
    resume: bool = False


def train(
    student: PreTrainedModel,
    teacher: Teacher | None,
    batches: BlockBatches,
    loss_config: LossConfig,
    train_config: TrainConfig,
    *,
    vocab_rows: int,
    metrics_path: Path | None = None,
    description: str = "distill",
    on_warmup: Callable[[dict[str, float]], None] | None = None,
    checkpoints: CheckpointPlan | None = None,
    context: DistContext | None = None,
    extra_terms: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None,
    onpolicy: OnPolicy | None = None,
    parallel: ParallelConfig | None = None,
) -> TrainState:
    """Train ``student`` in place for ``train_config.steps`` optimizer steps; see the module map.

    ``batches`` yields global micro-batches (per-device batch x world size): token blocks (every
    next token a target) or :class:`~distill.data.Batch` es with their own labels; each rank
    trains on its own rows. ``onpolicy`` (with lambda > 0) turns micro-batches into the
    student's own continuations. Only rank 0 writes metrics and checkpoints.
    ``extra_terms(input_ids)``, called after each micro-batch's forward, returns more summed loss
    terms (intermediate layers) that are added to the loss and logged under their names; an
    ``nn.Module`` one has its own parameters trained (a projection) and checkpointed too.

    ``parallel.strategy=fsdp`` in a process group shards a copy of the student and, in place, a
    live teacher's model (frozen) with FSDP2; at the end rank 0's ``student`` receives the
    trained weights (the other ranks' copy keeps its initial weights), and the teacher stays
    sharded (usable only by all ranks together).
    """
    context = context or DistContext()
    trainee = _prepare(student, teacher, extra_terms, parallel or ParallelConfig())
    optimizer, scheduler = build_optimizer(trainee.trainable, train_config)
    state = TrainState()
    elapsed_before = 0.0

    def forward(batch: Batch, on_policy: bool = False) -> tuple[LossTerms, dict]:
        """This micro-batch's loss terms and intermediate terms, inside the objective's forward."""
        with trainee.precision():
            return trainee.objective(
                _micro_batch,
                teacher,
                batch,
                loss_config,
                vocab_rows,
                on_policy=on_policy,
                step=state.step,
                total_steps=train_config.steps,
                upcast=trainee.upcast,
                extra_terms=extra_terms,
            )

    if checkpoints is not None and checkpoints.resume:
        elapsed_before = _resume(
            state,
            trainee,
            optimizer,
            scheduler,
            batches,
            checkpoints,
            metrics_path,
            context,
            onpolicy,
        )
    elif on_warmup is not None:
        probe = _rank_rows(batches.blocks[: batches.batch_size], context).to(trainee.device)
        on_warmup(
            measure_warmup(
                trainee.trainable,  # its gradients (the projection's too) are discarded
                teacher,
                probe,
                loss_config,
                vocab_rows,
                forward=lambda ids: _with_extra(*forward(Batch.from_blocks(ids, 1))),
            )
        )
    prompt_tokens = onpolicy.config.prompt_tokens if onpolicy is not None else 1
    bar = tqdm(
        total=train_config.steps,
        initial=state.step,
        desc=description,
        unit="step",
        dynamic_ncols=True,
        **({} if context.is_main else {"disable": True}),  # TQDM_DISABLE still applies on rank 0
    )
    run_start = time.perf_counter() - elapsed_before
    while state.step < train_config.steps and not _out_of_time(
        run_start, train_config, context, started=state.step > 0
    ):
        step_start = time.perf_counter()
        local_batches, on_policy_flags, generated = _draw_window(
            trainee, batches, train_config.grad_accum, prompt_tokens, onpolicy, context
        )
        window_tokens, tokens = (
            int(count)
            for count in all_reduce_sum(
                [
                    sum(batch.n_targets for batch in local_batches),
                    sum(batch.input_ids.numel() for batch in local_batches),
                ],
                context,
            )
        )
        totals = {"loss": 0.0, "ce": 0.0, "kl": 0.0}
        for batch, on_policy in zip(local_batches, on_policy_flags, strict=True):
            terms, extra = forward(batch, on_policy)
            ((terms.loss_sum + sum(extra.values())) / window_tokens).backward()
            for name, value in extra.items():
                totals[name] = totals.get(name, 0.0) + value.item() / window_tokens
                totals["loss"] += value.item() / window_tokens
            totals["loss"] += terms.loss_sum.item() / window_tokens
            totals["ce"] += terms.ce_sum.item() / window_tokens
            totals["kl"] += terms.kl_sum.item() / window_tokens
        comm_start = time.perf_counter()
        # FSDP reduced the sharded gradients during backward; what is replicated is summed here.
        all_reduce_gradients(trainee.extra if trainee.sharded else trainee.trainable, context)
        comm_seconds = time.perf_counter() - comm_start
        totals = dict(zip(totals, all_reduce_sum(list(totals.values()), context), strict=True))
        grad_norm = clip_gradients(list(trainee.trainable.parameters()), train_config.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        seconds = time.perf_counter() - step_start
        record = {
            "step": state.step,
            **totals,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "elapsed_s": time.perf_counter() - run_start,
            "comm_s": comm_seconds,
        }
        if onpolicy is not None and onpolicy.config.lambda_ > 0:
            record["onpolicy_fraction"] = sum(on_policy_flags) / len(on_policy_flags)
            record["generated_tokens_mean"] = sum(generated) / len(generated) if generated else None
        if state.step % train_config.log_every == 0 or state.step == train_config.steps:
            state.history.append(record)
            if metrics_path is not None and context.is_main:
                append_jsonl(metrics_path, record)
        if checkpoints is not None and (
            state.step == train_config.steps
            or (checkpoints.every and state.step % checkpoints.every == 0)
        ):
            _save(state, trainee, optimizer, scheduler, batches, checkpoints, context, onpolicy)
        bar.set_postfix(loss=f"{totals['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
    bar.close()
    if trainee.sharded:  # the trained weights into rank 0's unsharded student
        trainee.gather_student(context)
    student.eval()
    return state


@dataclass
class _Trainee:
    """What one ``train`` call trains: the caller's ``student``, the module actually trained
    (``model``: the student itself, or its FSDP-sharded copy), the objective root that runs the
    loss on it, the optimizer's modules (plus the intermediate terms' projection, ``extra``)."""

    student: PreTrainedModel
    model: torch.nn.Module
    objective: torch.nn.Module
    trainable: torch.nn.Module
    extra: torch.nn.Module | None
    sharded: bool
    mixed_precision: str
    device: torch.device

    def precision(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for the data-parallel path on GPU; FSDP casts through its policy."""
        if self.sharded:
            return contextlib.nullcontext()
        return autocast(self.mixed_precision, self.device)

    @property
    def upcast(self) -> bool:
        """The head and loss in float32 when the decoder runs in bf16 (GPU only)."""
        return self.mixed_precision != "no" and self.device.type == "cuda"

    def gather_student(self, context: DistContext) -> None:
        """All ranks gather the sharded weights; rank 0 loads them into its unsharded student."""
        weights = full_model_state(self.model)
        if context.is_main:
            self.student.load_state_dict(weights)


def _prepare(
    student: PreTrainedModel,
    teacher: Teacher | None,
    extra_terms: object,
    parallel: ParallelConfig,
) -> _Trainee:
    extra = extra_terms if isinstance(extra_terms, torch.nn.Module) else None
    sharded = parallel.strategy == "fsdp" and torch.distributed.is_initialized()
    if parallel.strategy == "fsdp" and not sharded:
        log.warning("parallel.strategy=fsdp needs torchrun (a process group): training unsharded")
    if sharded:
        mesh = device_mesh(torch.distributed.get_world_size())
        cuda = mesh.device_type == "cuda"
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        policy = mixed_precision_policy(parallel.mixed_precision, device)
        model = copy.deepcopy(student)  # sharded in place; ``student`` stays whole for saving
        objective = shard_student(model, mesh, policy)  # moves the shards to ``device``
        if isinstance(teacher, LiveTeacher) and not is_sharded(teacher.model):
            shard_teacher(teacher.model, mesh, policy)
    else:
        model = student
        objective = Objective(student)
        device = next(student.parameters()).device
    if extra is not None:  # replicated on every rank: rank 0's initial values, beside the student
        broadcast_parameters(extra.to(device))
    model.train()
    trainable = model if extra is None else torch.nn.ModuleList([model, extra])
    return _Trainee(
        student, model, objective, trainable, extra, sharded, parallel.mixed_precision, device
    )


def _micro_batch(
    student: PreTrainedModel,
    teacher: Teacher | None,
    batch: Batch,
    loss_config: LossConfig,
    vocab_rows: int,
    *,
    extra_terms: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None,
    **options,
) -> tuple[LossTerms, dict[str, torch.Tensor]]:
    """:func:`micro_batch_terms`, then the intermediate-layer terms (weighted sums from this
    forward's hooks, logged apart)."""
    terms = micro_batch_terms(
        student, teacher, batch.input_ids, loss_config, vocab_rows, labels=batch.labels, **options
    )
    extra = extra_terms(batch.input_ids) if extra_terms else {}
    return terms, extra


def _with_extra(terms: LossTerms, extra: dict[str, torch.Tensor]) -> LossTerms:
    return terms._replace(loss_sum=terms.loss_sum + sum(extra.values()))


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


def _rank_rows(global_batch: torch.Tensor, context: DistContext) -> torch.Tensor:
    """This rank's rows of a global micro-batch ``[world * b, T]`` -> ``[b, T]``."""
    if not context.enabled:
        return global_batch
    per_rank = global_batch.shape[0] // context.world_size
    return global_batch[context.rank * per_rank : (context.rank + 1) * per_rank]


def _draw_window(
    trainee: _Trainee,
    batches: BlockBatches,
    grad_accum: int,
    prompt_tokens: int,
    onpolicy: OnPolicy | None,
    context: DistContext,
) -> tuple[list[Batch], list[bool], list[int]]:
    """This rank's micro-batches of one optimizer step, whether each is on-policy, and the
    lengths of the continuations the student wrote."""
    local_batches, flags, generated = [], [], []
    for _ in range(grad_accum):
        drawn = batches.next_batch()
        if isinstance(drawn, torch.Tensor):
            drawn = Batch.from_blocks(drawn, prompt_tokens)
        per_rank = drawn.input_ids.shape[0] // context.world_size
        batch = drawn.rows(context.rank * per_rank, (context.rank + 1) * per_rank)
        on_policy = onpolicy is not None and onpolicy.draw()
        if on_policy:  # through the objective: a sharded student generates on all ranks at once
            with trainee.precision():
                batch, lengths = trainee.objective(onpolicy.continue_batch, batch)
            generated.extend(lengths)
        local_batches.append(_to_device(batch, trainee.device))
        flags.append(on_policy)
    return local_batches, flags, generated


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if batch.input_ids.device == device and batch.labels.device == device:
        return batch
    return Batch(batch.input_ids.to(device), batch.labels.to(device), batch.prompt_lengths)


def _trainer_state(
    state: TrainState,
    scheduler,
    batches: BlockBatches,
    context: DistContext,
    onpolicy: OnPolicy | None,
) -> dict:
    rng_states = [rng_state()]
    if context.enabled:
        rng_states = [None] * context.world_size
        torch.distributed.all_gather_object(rng_states, rng_state())
    return {
        "scheduler": scheduler.state_dict(),
        "data": batches.state_dict(),
        "rng": rng_states,
        "history": state.history,
        "onpolicy": onpolicy.state_dict() if onpolicy is not None else None,
    }


def _save(state, trainee, optimizer, scheduler, batches, checkpoints, context, onpolicy) -> None:
    """Rank 0 writes the checkpoint in the unsharded format (FSDP: gathered from all ranks)."""
    trainer_state = _trainer_state(state, scheduler, batches, context, onpolicy)
    if trainee.extra is not None:  # the intermediate terms' projection (replicated)
        trainer_state["extra"] = {
            name: value.detach().cpu().clone() for name, value in trainee.extra.state_dict().items()
        }
    optimizer_state: torch.optim.Optimizer | dict = optimizer
    if trainee.sharded:
        trainee.gather_student(context)
        optimizer_state = full_optimizer_state(trainee.trainable, optimizer)
    if context.is_main:
        save_checkpoint(
            checkpoints.directory,
            state.step,
            trainee.student,
            optimizer_state,
            trainer_state,
            checkpoints.keep,
        )
    if context.enabled:
        torch.distributed.barrier()


def _resume(
    state, trainee, optimizer, scheduler, batches, checkpoints, metrics_path, context, onpolicy
) -> float:
    """Restore the newest valid checkpoint (if any); return the elapsed seconds it had logged."""
    checkpoint = latest_checkpoint(checkpoints.directory)
    if checkpoint is None:
        if metrics_path is not None and context.is_main and metrics_path.exists():
            metrics_path.unlink()
        return 0.0
    # Every rank reads the full checkpoint; under FSDP each then keeps its own shards.
    saved = load_checkpoint(checkpoint, trainee.student, None if trainee.sharded else optimizer)
    if trainee.extra is not None and saved.get("extra") is not None:
        trainee.extra.load_state_dict(saved["extra"])
    if trainee.sharded:
        load_full_model_state(trainee.model, trainee.student.state_dict())
        load_full_optimizer_state(trainee.trainable, optimizer, saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    batches.load_state_dict(saved["data"])
    rng_states = saved["rng"]
    if len(rng_states) != context.world_size:
        raise DistillError(
            f"checkpoint {checkpoint} was written by {len(rng_states)} process(es); resume it "
            f"with the same number, not {context.world_size}"
        )
    set_rng_state(rng_states[context.rank])
    if onpolicy is not None and saved.get("onpolicy") is not None:
        onpolicy.load_state_dict(saved["onpolicy"])
    state.step = saved["step"]
    state.history = list(saved["history"])
    if metrics_path is not None and context.is_main:
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in state.history))
    log.info("resumed from %s at step %d", checkpoint, state.step)
    return state.history[-1]["elapsed_s"] if state.history else 0.0


# --- the loop of encoder and nn.Module tasks (to be merged into ``train``) ----------------------

# (micro-batch, 0-based optimizer step) -> its summed objective and named summed parts (0-d).
TermsFn = Callable[[Any, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class TrainHistory:
    """One record per logged optimizer step."""

    records: list[dict[str, float]] = field(default_factory=list)


def _clip(model: torch.nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))


def train_module(
    student: torch.nn.Module,
    loader: Iterable,
    terms_fn: TermsFn,
    count_fn: Callable[[Any], int],
    train_config: TrainConfig,
    *,
    metrics_path: Path | None = None,
    description: str = "distill",
    checkpoints: CheckpointPlan | None = None,
) -> TrainHistory:
    """Train ``student`` in place for ``train_config.steps`` steps; see the module map.

    ``terms_fn(batch, step)`` returns the micro-batch's summed loss and named summed parts at
    optimizer step ``step`` (0-based, for loss schedules); ``count_fn(batch)`` the number of
    items those sums run over. Each step's gradient is the window's total sum over the window's
    total count, so batch 8 x 1 == batch 2 x 4.

    ``checkpoints``: save every ``every`` steps and at the end into ``directory`` (keeping the
    newest ``keep``): student, optimizer, schedule, loader position (:class:`LoaderPosition`),
    RNG states and the metric history. With ``resume``, continue from the newest valid one
    (bit-identical on CPU to an uninterrupted run) and rewrite ``metrics_path`` to its history,
    so no step is logged twice or missed; without a checkpoint there, start afresh.
    """
    student.train()
    optimizer, scheduler = build_optimizer(student, train_config)
    history = TrainHistory()
    batches = LoaderPosition(loader)
    step, elapsed_before = 0, 0.0
    if checkpoints is not None and checkpoints.resume:
        checkpoint = latest_checkpoint(checkpoints.directory)
        if checkpoint is not None:
            saved = load_checkpoint(checkpoint, student, optimizer)
            scheduler.load_state_dict(saved["scheduler"])
            batches.restore(saved["data"])
            batches.set_rng(saved["rng"])
            step, elapsed_before = saved["step"], saved["elapsed_s"]
            history.records = list(saved["history"])
            log.info("resumed from %s at step %d", checkpoint, step)
        if metrics_path is not None:
            lines = "".join(json.dumps(record) + "\n" for record in history.records)
            atomic_write_text(metrics_path, lines)
    bar = tqdm(
        total=train_config.steps, initial=step, desc=description, unit="step", dynamic_ncols=True
    )
    start = time.perf_counter() - elapsed_before
    while step < train_config.steps:
        step_start = time.perf_counter()
        window = [batches.next() for _ in range(train_config.grad_accum)]
        items = sum(count_fn(batch) for batch in window)
        if items == 0:
            raise ValueError(f"step {step + 1}: the accumulation window holds no labelled items")
        totals: dict[str, float] = {"loss": 0.0}
        for batch in window:
            loss_sum, parts = terms_fn(batch, step)
            (loss_sum / items).backward()
            totals["loss"] += loss_sum.item() / items
            for name, value in parts.items():
                totals[name] = totals.get(name, 0.0) + float(value) / items
        grad_norm = _clip(student, train_config.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds = time.perf_counter() - step_start
        record = {
            "step": step,
            **totals,
            "lr": lr,
            "grad_norm": grad_norm,
            "items": items,
            "items_per_s": items / seconds,
            "elapsed_s": time.perf_counter() - start,
        }
        if step % train_config.log_every == 0 or step == train_config.steps:
            history.records.append(record)
            if metrics_path is not None:
                append_jsonl(metrics_path, record)
        if checkpoints is not None and (
            step == train_config.steps or (checkpoints.every and step % checkpoints.every == 0)
        ):
            trainer_state = {
                "scheduler": scheduler.state_dict(),
                "data": batches.state_dict(),
                "rng": batches.rng(),
                "history": history.records,
                "elapsed_s": record["elapsed_s"],
            }
            save_checkpoint(
                checkpoints.directory, step, student, optimizer, trainer_state, checkpoints.keep
            )
        bar.set_postfix(loss=f"{totals['loss']:.4f}")
        bar.update(1)
    bar.close()
    student.eval()
    return history
