"""Distil any PyTorch classifier: a teacher ``nn.Module`` into a student ``nn.Module``.

The same objective (:func:`distill.losses.distillation_loss`), optimizer and schedule
(:func:`distill.train.build_optimizer`) as the LLM path, in a loop that only needs a data loader
and a function mapping ``(model, batch)`` to logits::

    from distill.modules import distill_module
    result = distill_module(teacher, student, loader, lambda model, batch: model(batch[0]),
                            train=TrainConfig(steps=300), eval_loader=test_loader, run_dir="runs/x")

Map of :func:`train_module` (shared with the encoder tasks): draw ``grad_accum`` micro-batches,
count their items (the window's normaliser), ``backward(loss_sum / window_items)`` per
micro-batch, clip, AdamW step, schedule step, one metrics.jsonl record, a checkpoint every
``checkpoint.every`` steps and at the end. The run folder gets ``metrics.jsonl``,
``checkpoints/step-N/``, ``student/model.safetensors``, ``evaluation.json`` and
``report.json``/``report.md``; ``resume=True`` continues it exactly from the newest valid
checkpoint (the loader is re-iterated and the batches already drawn this epoch skipped).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from torch import nn
from tqdm.auto import tqdm

from distill.config import CheckpointConfig, LossConfig, TrainConfig
from distill.io import append_jsonl, atomic_directory, atomic_write_json, atomic_write_text
from distill.losses import IGNORE_INDEX, LossTerms, distillation_loss
from distill.losses.schedule import scheduled_alpha_temperature
from distill.models import count_params
from distill.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from distill.train.loop import CheckpointPlan
from distill.train.optim import build_optimizer

__all__ = [
    "LoaderPosition",
    "ModuleResult",
    "TrainHistory",
    "default_labels",
    "distill_module",
    "evaluate_classifier",
    "scheduled_alpha_temperature",
    "scheduled_distillation_loss",
    "train_module",
    "write_report",
]

LogitsFn = Callable[[nn.Module, Any], torch.Tensor]
LabelsFn = Callable[[Any], torch.Tensor]
# (micro-batch, 0-based optimizer step) -> its summed objective and named summed parts (0-d).
TermsFn = Callable[[Any, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]

log = logging.getLogger(__name__)


@dataclass
class TrainHistory:
    """One record per logged optimizer step."""

    records: list[dict[str, float]] = field(default_factory=list)


@dataclass
class ModuleResult:
    student: nn.Module  # trained in place
    history: TrainHistory
    evaluation: dict[str, dict[str, float]] | None  # teacher / student_before / student_after
    run_dir: Path | None


def default_labels(batch: Any) -> torch.Tensor:
    """Labels of a ``(inputs, labels)`` tuple/list or of a dict with ``labels`` (or ``label``)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, dict):
        for key in ("labels", "label"):
            if key in batch:
                return batch[key]
    raise ValueError(
        "labels_fn: cannot find labels in the batch (expected (inputs, labels) or a dict with "
        "'labels'); pass labels_fn=..."
    )


class LoaderPosition:
    """Batches forever from a re-iterable loader, at a position that checkpoints can restore.

    The position is the epoch, how many batches of it were drawn, and the RNG states taken just
    before that epoch's iterator was created: the process RNGs (Python, NumPy, torch) and the
    ``generator`` of the loader and of its sampler(s), if any. :meth:`restore` sets those states,
    re-creates the epoch's iterator (so a shuffling ``DataLoader`` draws the same permutation and
    worker seeds) and skips the drawn batches: exact for any loader whose order depends only on
    these RNGs, at the cost of loading the skipped batches again. Each epoch re-iterates the
    loader (a shuffling DataLoader reshuffles).
    """

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader
        self.epoch = 0
        self.drawn = 0
        self._iterator: Iterator[Any] | None = None
        self._epoch_rng: dict[str, Any] | None = None

    def generators(self) -> list[torch.Generator]:
        """The loader's own RNGs: ``generator`` of the loader, its sampler and batch sampler."""
        owners = [self.loader, getattr(self.loader, "sampler", None)]
        batch_sampler = getattr(self.loader, "batch_sampler", None)
        owners += [batch_sampler, getattr(batch_sampler, "sampler", None)]
        found: list[torch.Generator] = []
        for owner in owners:
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
                found.append(generator)
        return found

    def rng(self) -> dict[str, Any]:
        """The process and loader RNG states now."""
        return {"process": rng_state(), "loader": [g.get_state() for g in self.generators()]}

    def set_rng(self, state: dict[str, Any]) -> None:
        generators = self.generators()
        if len(generators) != len(state["loader"]):
            raise ValueError(
                f"loader: the checkpoint holds {len(state['loader'])} loader generator state(s), "
                f"this loader has {len(generators)}; resume with the same kind of loader"
            )
        set_rng_state(state["process"])
        for generator, saved in zip(generators, state["loader"], strict=True):
            generator.set_state(saved)

    def _start_epoch(self) -> None:
        self._epoch_rng = self.rng()
        self._iterator = iter(self.loader)
        self.drawn = 0

    def next(self) -> Any:
        if self._iterator is None:
            self._start_epoch()
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self.drawn == 0:
                raise ValueError("loader: yields no batches") from None
            self.epoch += 1
            self._start_epoch()
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError("loader: yields no batches") from None
        self.drawn += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "drawn": self.drawn, "epoch_rng": self._epoch_rng}

    def restore(self, state: dict[str, Any]) -> None:
        """Back to a saved position; the RNGs are left as at the start of its epoch plus the
        skipped batches (the caller then restores the checkpoint's current RNG states)."""
        self.epoch, self._iterator, self._epoch_rng, self.drawn = state["epoch"], None, None, 0
        if state["epoch_rng"] is None:  # saved before the first batch
            return
        self.set_rng(state["epoch_rng"])
        self._epoch_rng = state["epoch_rng"]
        self._iterator = iter(self.loader)
        for _ in range(state["drawn"]):
            try:
                next(self._iterator)
            except StopIteration:
                raise ValueError(
                    f"loader: the checkpoint had drawn {state['drawn']} batches of epoch "
                    f"{state['epoch']}, this loader yields fewer; resume with the same data"
                ) from None
        self.drawn = state["drawn"]


def _clip(model: nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))


def train_module(
    student: nn.Module,
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


def _flat(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., C]`` logits and ``[...]`` labels as ``[N, C]`` and ``[N]``."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits_fn: logits shape {tuple(logits.shape)} does not match labels shape "
            f"{tuple(labels.shape)} plus a class dimension"
        )
    return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    loader: Iterable,
    logits_fn: LogitsFn,
    labels_fn: LabelsFn = default_labels,
    teacher: nn.Module | None = None,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy on labelled items; with a teacher, also the mean
    KL(teacher || model) and top-1 agreement with the teacher (temperature 1)."""
    model.eval()
    correct = agree = total = 0
    ce_sum = kl_sum = 0.0
    for batch in loader:
        logits, labels = _flat(logits_fn(model, batch).float(), labels_fn(batch))
        keep = labels != IGNORE_INDEX
        logits, labels = logits[keep], labels[keep]
        total += labels.numel()
        correct += int((logits.argmax(-1) == labels).sum())
        ce_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        if teacher is not None:
            teacher_logits = logits_fn(teacher, batch).float().reshape(-1, logits.shape[-1])[keep]
            agree += int((logits.argmax(-1) == teacher_logits.argmax(-1)).sum())
            kl_sum += float(
                F.kl_div(
                    F.log_softmax(logits, -1),
                    F.log_softmax(teacher_logits, -1),
                    reduction="sum",
                    log_target=True,
                )
            )
    if total == 0:
        raise ValueError("eval_loader: holds no labelled items")
    metrics = {"accuracy": correct / total, "cross_entropy": ce_sum / total}
    if teacher is not None:
        metrics |= {"kl_to_teacher": kl_sum / total, "top1_agreement": agree / total}
    return metrics


def scheduled_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    loss: LossConfig,
    step: int,
    total_steps: int,
    *,
    labels_only: bool = False,
) -> LossTerms:
    """:func:`~distill.losses.distillation_loss` with every knob of ``loss``: divergence, beta,
    skew, scale_by_t2, and temperature / alpha at optimizer step ``step`` of their schedules.
    ``labels_only`` forces alpha = 1 (the labels-only baseline). Shapes ``[N, C]``, ``[N]``."""
    alpha, temperature = scheduled_alpha_temperature(loss, step, total_steps)
    return distillation_loss(
        student_logits,
        teacher_logits,
        labels,
        temperature=temperature,
        alpha=1.0 if labels_only else alpha,
        divergence=loss.divergence,
        beta=loss.beta,
        skew=loss.skew,
        scale_by_t2=loss.scale_by_t2,
    )


def distill_module(
    teacher: nn.Module | None,
    student: nn.Module,
    loader: Iterable,
    logits_fn: LogitsFn,
    *,
    labels_fn: LabelsFn = default_labels,
    loss: LossConfig | None = None,
    train: TrainConfig | None = None,
    eval_loader: Iterable | None = None,
    run_dir: str | Path | None = None,
    checkpoint: CheckpointConfig | None = None,
    resume: bool = False,
) -> ModuleResult:
    """Train ``student`` in place on ``alpha * CE + (1 - alpha) * T^2 * D(teacher, student)``.

    Every :class:`~distill.config.LossConfig` knob applies: ``divergence`` (forward KL by
    default; beta, skew), ``scale_by_t2``, and the temperature / alpha schedules over the steps.
    ``logits_fn(model, batch)`` returns logits ``[..., C]`` whose leading shape matches
    ``labels_fn(batch)`` (labels equal to -100 are ignored). ``teacher=None`` (or alpha 1
    throughout) trains on labels alone. With ``eval_loader``, teacher, student before and
    student after are evaluated; with ``run_dir``, metrics.jsonl, student/model.safetensors,
    evaluation.json and report.json/report.md are written there, and checkpoints go to
    ``run_dir/checkpoints`` per ``checkpoint`` (default: every 20 steps and at the end, newest 2
    kept). ``resume=True`` continues a run in ``run_dir`` from its newest valid checkpoint: pass
    the same (freshly built) student, loader and configs; see :class:`LoaderPosition` for how the
    data position is restored.
    """
    loss = loss or LossConfig()
    train = train or TrainConfig()
    checkpoint = checkpoint or CheckpointConfig()
    alphas = (loss.alpha, loss.alpha if loss.alpha_schedule == "constant" else loss.alpha_end)
    needs_teacher = min(alphas) < 1.0
    if teacher is None and needs_teacher:
        raise ValueError("teacher: None needs loss.alpha == 1 throughout (labels only)")
    run_path = Path(run_dir) if run_dir is not None else None
    if resume and run_path is None:
        raise ValueError("resume: needs the run_dir of the run to continue")
    if run_path is not None:
        if not resume and (run_path / "metrics.jsonl").exists():
            raise ValueError(
                f"run_dir: {run_path} already holds a run (pass resume=True to continue it)"
            )
        run_path.mkdir(parents=True, exist_ok=True)
    if teacher is not None:
        teacher.eval()
    student_before = copy.deepcopy(student) if eval_loader is not None else None

    def terms(batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = labels_fn(batch)
        alpha, _ = scheduled_alpha_temperature(loss, step, train.steps)
        teacher_logits = None
        if teacher is not None and alpha < 1.0:
            with torch.no_grad():
                teacher_logits = logits_fn(teacher, batch)
        logits, flat_labels = _flat(logits_fn(student, batch), labels)
        if teacher_logits is not None:
            teacher_logits = teacher_logits.reshape(logits.shape)  # (N, C)
        parts = scheduled_distillation_loss(
            logits, teacher_logits, flat_labels, loss, step, train.steps
        )
        return parts.loss_sum, {"ce": parts.ce_sum.detach(), "kl": parts.kl_sum.detach()}

    plan = None
    if run_path is not None:
        plan = CheckpointPlan(run_path / "checkpoints", checkpoint.every, checkpoint.keep, resume)
    history = train_module(
        student,
        loader,
        terms,
        lambda batch: int((labels_fn(batch) != IGNORE_INDEX).sum()),
        train,
        metrics_path=None if run_path is None else run_path / "metrics.jsonl",
        description="distill" if teacher is not None else "labels only",
        checkpoints=plan,
    )
    evaluation = None
    if eval_loader is not None:
        compared = {"student_before": student_before, "student_after": student}
        if teacher is not None:
            compared = {"teacher": teacher, **compared}
        evaluation = {
            name: {
                "params": count_params(model),
                **evaluate_classifier(model, eval_loader, logits_fn, labels_fn, teacher),
            }
            for name, model in compared.items()
        }
    if run_path is not None:
        with atomic_directory(run_path / "student") as tmp:
            save_model(student, str(tmp / "model.safetensors"))
        if evaluation is not None:
            atomic_write_json(run_path / "evaluation.json", {"models": evaluation})
            write_report(run_path, "module distillation")
    return ModuleResult(student, history, evaluation, run_path)


# --- report: reads only the run's files ---------------------------------------------------------

_HIGHER_IS_BETTER = {
    "accuracy",
    "macro_f1",
    "top1_agreement",
    "cosine_to_teacher",
    "retrieval_agreement",
    "items_per_s",
    "texts_per_s",
}


def _retention(models: dict[str, dict[str, Any]]) -> dict[str, float]:
    """student_after / teacher for every higher-is-better metric both have (teacher = 1)."""
    teacher, after = models.get("teacher"), models.get("student_after")
    if teacher is None or after is None:
        return {}
    return {
        key: after[key] / teacher[key]
        for key in teacher
        if key in _HIGHER_IS_BETTER and key in after and teacher[key]
    }


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and value > 999):
        return f"{value:,.0f}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_report(run_dir: str | Path, title: str) -> dict[str, Any]:
    """report.json and report.md from ``evaluation.json`` and ``metrics.jsonl`` of a run folder.

    ``report["models"]`` maps teacher / student_before / student_after (and any other compared
    model) to their metrics; ``report["retention"]`` is student_after / teacher per
    higher-is-better metric.
    """
    run_path = Path(run_dir)
    evaluation = json.loads((run_path / "evaluation.json").read_text())
    metrics_file = run_path / "metrics.jsonl"
    history = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    models = evaluation["models"]
    last = history[-1] if history else {}
    report = {
        "run": {"dir": str(run_path), "title": title},
        "models": models,
        "retention": _retention(models),
        "training": {
            "steps": last.get("step", 0),
            "items_per_step": last.get("items", 0),
            "train_seconds": last.get("elapsed_s", 0.0),
            "final_loss": last.get("loss"),
        },
        **{key: value for key, value in evaluation.items() if key != "models"},
    }
    keys = list(dict.fromkeys(key for metrics in models.values() for key in metrics))
    lines = [
        f"# distill report: {title}",
        "",
        "| model | " + " | ".join(keys) + " |",
        "|" + "---|" * (len(keys) + 1),
    ]
    lines += [
        f"| {name} | " + " | ".join(_format(metrics.get(key)) for key in keys) + " |"
        for name, metrics in models.items()
    ]
    if report["retention"]:
        lines += ["", "Retention (student_after / teacher): "]
        lines[-1] += ", ".join(f"{key} {value:.3f}" for key, value in report["retention"].items())
    training = report["training"]
    lines += [
        "",
        f"Training: {training['steps']} steps, {training['items_per_step']} items/step, "
        f"{training['train_seconds']:.1f} s, final loss {_format(training['final_loss'])}.",
    ]
    atomic_write_json(run_path / "report.json", report)
    atomic_write_text(run_path / "report.md", "\n".join(lines) + "\n")
    return report
