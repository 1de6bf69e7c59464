"""The cross-tokenizer task of :func:`distill.train.loop.train`: a decoder student whose
tokenizer differs from the teacher's, trained on rows in its own tokenization.

Per micro-batch (a :class:`~distill.data.cross_tokenizer.CrossBatch`): the student's full
logits ``[B, Ts, Vs]`` give the cross-entropy on its own labels; the live teacher (no_grad)
reads its own tokens of the same bytes ``[B, Tt]`` (or a cross-tokenizer teacher cache gives
its top-k and realised tokens' log-probabilities there); the divergence is taken per aligned group
(:func:`~distill.losses.cross_tokenizer.cross_tokenizer_loss`). The loop's normaliser is the
window's count of student target tokens, as for :class:`~distill.train.causal_lm.CausalLMTask`.
With ``alpha = 1`` the teacher is never run (labels only: the baseline arm, or sequence-level KD
on text the teacher wrote). Data-parallel under torchrun (each rank its own rows); no FSDP.

:func:`train_cross_tokenizer` is the whole thing from models, tokenizers and data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.config import LossConfig, ParallelConfig, TrainConfig
from distill.data.alignment import check_tokenizer_pair, string_pairs
from distill.data.blocks import BlockBatches
from distill.data.cross_examples import CrossExampleBatches, CrossExamples
from distill.data.cross_tokenizer import CrossBatch, CrossBlockBatches, TokenizerPair
from distill.data.examples import ExampleBatches, Examples
from distill.errors import ConfigError
from distill.losses import LossTerms
from distill.losses.cross_tokenizer import cross_tokenizer_loss
from distill.losses.schedule import LossSchedule, LossSettings
from distill.losses.sparse import SparseTargets
from distill.models import tokenizer_rows
from distill.teacher import CachedTeacher, LiveTeacher
from distill.train.causal_lm import student_logits
from distill.train.checkpoint import load_checkpoint
from distill.train.distributed import DistContext
from distill.train.loop import CheckpointPlan, TrainState, train
from distill.train.sharding import autocast
from distill.train.task import Window

__all__ = [
    "CrossTokenizerTask",
    "cross_tokenizer_batches",
    "cross_tokenizer_terms",
    "teacher_rows",
    "token_pairs",
    "train_cross_tokenizer",
]

CrossBatches = CrossBlockBatches | CrossExampleBatches


def cross_tokenizer_terms(
    student: PreTrainedModel,
    teacher: LiveTeacher | CachedTeacher | None,
    batch: CrossBatch,
    settings: LossSettings,
    student_rows: int,
    pairs: tuple[torch.Tensor, torch.Tensor] | None,
) -> LossTerms:
    """Summed loss terms of one micro-batch at one step's ``settings``: the student's logits on
    its rows, the teacher's on its own (only when ``alpha < 1`` and a group is scored): its
    logits (live) or its cached top-k with the realised tokens' log-probabilities."""
    input_ids = batch.student.input_ids
    logits = student_logits(student, input_ids, student_rows).float()  # (B, Ts, Vs)
    needs_teacher = settings.alpha < 1.0 and teacher is not None and batch.n_groups > 0
    targets = teacher.soft_targets(batch.teacher_ids) if needs_teacher else None  # (B, Tt, .)
    if isinstance(targets, SparseTargets):
        targets = targets.to(logits.device)
    return cross_tokenizer_loss(
        logits,
        targets,
        input_ids,
        batch.teacher_ids,
        batch.student_groups,
        batch.teacher_groups,
        batch.student.labels,
        kind=settings.cross_tokenizer or "uld",
        temperature=settings.temperature,
        alpha=settings.alpha,
        scale_by_t2=settings.scale_by_t2,
        pairs=pairs,
        uld_top_k=settings.uld_top_k or None,
        teacher_vocab=None if teacher is None else teacher.vocab_rows,
    )


class CrossTokenizerTask:
    """A decoder ``student`` distilled from a ``teacher`` (live, or a cross-tokenizer cache;
    None: labels only) with another tokenizer, on ``batches`` of aligned rows (module
    docstring). ``pairs`` (teacher ids, student ids of equal tokens) are needed by
    ``loss.cross_tokenizer=hybrid``."""

    unit = "tokens"

    def __init__(
        self,
        student: PreTrainedModel,
        teacher: LiveTeacher | CachedTeacher | None,
        batches: CrossBatches,
        loss: LossConfig,
        *,
        student_rows: int,
        pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
        parallel: ParallelConfig | None = None,
    ) -> None:
        uses_teacher = teacher is not None and (
            loss.alpha < 1.0 or loss.alpha_schedule != "constant"
        )
        if uses_teacher and loss.cross_tokenizer is None:
            raise ConfigError("a cross-tokenizer run with alpha < 1 needs loss.cross_tokenizer")
        if uses_teacher and loss.cross_tokenizer == "hybrid" and pairs is None:
            raise ValueError("loss.cross_tokenizer=hybrid needs the vocabularies' token pairs")
        self.student = self.trainable = self.replicated = student
        self.teacher = teacher
        self.batches = batches
        self.loss = loss
        self.student_rows = student_rows
        self.pairs = pairs
        self.parallel = parallel or ParallelConfig()
        self.context = DistContext()
        self.schedule: LossSchedule | None = None
        self.device = torch.device("cpu")

    def start(self, context: DistContext, total_steps: int) -> None:
        if self.parallel.strategy == "fsdp" and context.enabled:
            raise ConfigError("cross-tokenizer distillation runs with parallel.strategy=ddp")
        self.context = context
        self.schedule = LossSchedule(self.loss, total_steps)
        self.device = next(self.student.parameters()).device
        self.student.train()

    def _rows(self, batch: CrossBatch) -> CrossBatch:
        """This rank's rows of a global micro-batch, on the student's device."""
        per_rank = batch.student.input_ids.shape[0] // self.context.world_size
        rank = self.context.rank
        return batch.rows(rank * per_rank, (rank + 1) * per_rank).to(self.device)

    def draw_window(self, grad_accum: int) -> Window:
        batches = [self._rows(self.batches.next_batch()) for _ in range(grad_accum)]
        return Window(batches, sum(b.student.input_ids.numel() for b in batches))

    def count(self, batch: CrossBatch) -> int:
        return batch.n_targets

    def warmup_batch(self) -> CrossBatch:
        return self._rows(self.batches.first_batch())

    def terms(self, batch: CrossBatch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The summed objective; parts ``ce`` and ``divergence`` (the group divergence)."""
        with autocast(self.parallel.mixed_precision, self.device):
            terms = cross_tokenizer_terms(
                self.student,
                self.teacher,
                batch,
                self.schedule.at(step),
                self.student_rows,
                self.pairs,
            )
        return terms.loss_sum, {"ce": terms.ce_sum, "divergence": terms.divergence_sum}

    def record_fields(self, totals: dict[str, float], count: int) -> dict[str, Any]:
        return totals

    def checkpoint_state(self, optimizer: torch.optim.Optimizer):
        return self.student, optimizer

    def load_checkpoint(self, checkpoint: Path, optimizer: torch.optim.Optimizer) -> dict:
        return load_checkpoint(checkpoint, self.student, optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.batches.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state["data"])

    def finish(self, context: DistContext) -> None:
        self.student.eval()


def token_pairs(
    pair: TokenizerPair, teacher_rows: int, student_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher ids, student ids) ``[M]`` of the tokens both vocabularies hold (the hybrid's
    exact part): :func:`~distill.data.alignment.string_pairs` as tensors."""
    teacher_ids, student_ids = string_pairs(
        pair.teacher_vocab, pair.student_vocab, teacher_rows, student_rows
    )
    return torch.tensor(teacher_ids, dtype=torch.long), torch.tensor(student_ids, dtype=torch.long)


def cross_tokenizer_batches(
    data: torch.Tensor | BlockBatches | Examples | CrossExamples,
    pair: TokenizerPair | None,
    batch_size: int,
    seed: int,
) -> CrossBatches:
    """Micro-batches of aligned rows: from packed student blocks ``[n, T]`` (or a block source
    such as :class:`~distill.data.sources.WeightedBatches`), aligned by ``pair`` when drawn, or
    from encoded chat / prompt-response :class:`CrossExamples`. With ``pair`` None (labels
    only) nothing is aligned, and the student's own :class:`~distill.data.Examples` do too."""
    if isinstance(data, CrossExamples):
        return CrossExampleBatches(data, batch_size, seed)
    if isinstance(data, Examples):
        data = ExampleBatches(data, batch_size, seed)
    elif isinstance(data, torch.Tensor):
        data = BlockBatches(data, batch_size, seed)
    return CrossBlockBatches(data, pair)


def teacher_rows(data: torch.Tensor | CrossExamples, pair: TokenizerPair) -> torch.Tensor:
    """The teacher's side of every training row, right-padded with the teacher's pad ``[n, W]``
    (``W`` the longest): what a cross-tokenizer teacher cache holds. ``data``: packed student
    blocks ``[n, T]``, aligned here as when drawn, or :class:`CrossExamples`, aligned when
    encoded."""
    if isinstance(data, CrossExamples):
        width = max(1, int(data.teacher_lengths.max()))
        rows = data.teacher_ids[:, :width].clone()  # (n, W)
        beyond = torch.arange(width)[None, :] >= data.teacher_lengths[:, None]
        return rows.masked_fill_(beyond, pair.teacher_pad)
    sides = [
        row.teacher_ids
        for start in range(0, data.shape[0], 256)
        for row in pair.align_rows(data[start : start + 256])
    ]
    rows = torch.full((len(sides), max([1, *map(len, sides)])), pair.teacher_pad)
    for index, ids in enumerate(sides):
        rows[index, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return rows


def train_cross_tokenizer(
    student: PreTrainedModel,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher: PreTrainedModel | None,
    teacher_tokenizer: PreTrainedTokenizerBase,
    data: torch.Tensor | Examples | CrossExamples,
    loss: LossConfig,
    train_config: TrainConfig,
    *,
    seed: int = 0,
    metrics_path: Path | None = None,
    checkpoints: CheckpointPlan | None = None,
    description: str = "cross-tokenizer",
) -> TrainState:
    """Train ``student`` in place from ``teacher`` (None, or ``loss.alpha = 1``: labels only)
    on ``data``: packed student blocks ``[n, T]`` (``pack_documents`` with the student's
    tokenizer), :func:`~distill.data.cross_tokenizer.encode_cross_examples` rows, or (labels
    only) the student's own encoded :class:`~distill.data.Examples`. One arm of
    a comparison: labels only (``alpha = 1``), ``loss.cross_tokenizer`` uld or hybrid, or
    sequence-level KD (``alpha = 1`` on rows the teacher wrote, ``distill generate``) all draw
    the same rows in the same order for the same ``seed``. Refuses an unsupported tokenizer
    pair (one line naming both) before any training."""
    uses_teacher = teacher is not None and (loss.alpha < 1.0 or loss.alpha_schedule != "constant")
    student_rows = tokenizer_rows(student, student_tokenizer, "student")
    live, pair, pairs = None, None, None
    if uses_teacher:
        check_tokenizer_pair(teacher_tokenizer, student_tokenizer)
        pair = TokenizerPair(teacher_tokenizer, student_tokenizer)
        teacher_rows = tokenizer_rows(teacher, teacher_tokenizer, "teacher")
        live = LiveTeacher(teacher, teacher_rows)
        if loss.cross_tokenizer == "hybrid":
            pairs = token_pairs(pair, teacher_rows, student_rows)
    task = CrossTokenizerTask(
        student,
        live,
        cross_tokenizer_batches(data, pair, train_config.batch_size, seed),
        loss,
        student_rows=student_rows,
        pairs=pairs,
    )
    return train(
        task,
        train_config,
        metrics_path=metrics_path,
        description=description,
        checkpoints=checkpoints,
    )
