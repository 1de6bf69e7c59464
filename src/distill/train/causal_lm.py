"""The causal-LM task of :func:`distill.train.loop.train`: a decoder student distilled from a
teacher (live, cached, served, several routed by row, or none) on token blocks or labelled chat
batches.

What it adds to the loop's step: each rank takes its own rows of every global micro-batch; a
micro-batch is replaced by the student's own continuations with probability ``onpolicy.lambda``;
per micro-batch the teacher's targets (no_grad), the student's hidden states and the loss from
the output head (:func:`micro_batch_terms`; with a :class:`~distill.teacher.TeacherSet`,
:func:`routed_batch_terms`: each teacher's rows against that teacher), plus the
intermediate-layer terms, all inside one forward of the
:class:`~distill.train.sharding.Objective` around the student (FSDP gathers its root there).
``parallel.strategy=fsdp`` shards a copy of the student and a live teacher.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedModel

from distill.config import LossConfig, ParallelConfig
from distill.data import Batch, BlockBatches, RoutedBlocks
from distill.losses import IGNORE_INDEX, LossTerms
from distill.losses.objective import head_distillation_loss
from distill.losses.schedule import LossSchedule, LossSettings
from distill.losses.sparse import SparseTargets
from distill.teacher import LiveTeacher, Teacher, TeacherSet
from distill.train.checkpoint import load_checkpoint
from distill.train.distributed import DistContext, broadcast_parameters
from distill.train.onpolicy import OnPolicy
from distill.train.sharding import (
    Objective,
    autocast,
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
from distill.train.task import Window

__all__ = [
    "CausalLMTask",
    "MicroBatch",
    "labels_for",
    "micro_batch_terms",
    "routed_batch_terms",
    "sum_terms",
    "output_head",
    "student_logits",
]

log = logging.getLogger(__name__)


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
    settings: LossSettings,
    vocab_rows: int,
    *,
    labels: torch.Tensor | None = None,
    on_policy: bool = False,
    upcast: bool = False,
) -> LossTerms:
    """Summed loss terms of one micro-batch ``[B, T]`` at one step's loss ``settings``.

    ``labels`` ``[B, T]`` default to every next token (packed text). An ``on_policy`` batch
    (student-written targets) takes the divergence alone (alpha = 0). The student forward stops
    before its head: the loss takes the hidden states and the head (fused: the ``[B*T, V]``
    student logits are never built) and dispatches on the targets' kind. A batch without any
    target gives zero terms (its rows were all prompt or padding; the loop refuses a whole
    window without targets). ``upcast`` (mixed precision) computes the head and the loss in
    float32 from the bf16 decoder's hidden states.
    """
    settings = settings.with_alpha(0.0) if on_policy else settings
    labels = labels_for(input_ids) if labels is None else labels
    hidden = student.base_model(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, H)
    needs_teacher = settings.alpha < 1.0 and teacher is not None
    if not bool((labels != IGNORE_INDEX).any()):
        if needs_teacher and is_sharded(getattr(teacher, "model", None)):
            teacher.soft_targets(input_ids)  # a sharded teacher's forward is collective: run it
        return _zero_terms(hidden)
    targets = teacher.soft_targets(input_ids) if needs_teacher else None
    return _head_terms(student, hidden, targets, labels, settings, vocab_rows, upcast)


def routed_batch_terms(
    student: PreTrainedModel,
    teachers: TeacherSet,
    input_ids: torch.Tensor,
    routes: torch.Tensor | None,
    settings: LossSettings,
    vocab_rows: int,
    *,
    labels: torch.Tensor | None = None,
    on_policy: bool = False,
    upcast: bool = False,
) -> list[LossTerms]:
    """:func:`micro_batch_terms` of a micro-batch whose rows each have their own teacher:
    ``routes`` ``[B]`` (None: every row the default teacher's). One student forward for the
    whole batch; then, per teacher, its rows' targets from that teacher alone and their summed
    loss terms (zero terms for a teacher without target rows here). Returns one
    :class:`LossTerms` per teacher, in the set's order; their sum is the batch's loss, the same
    sums over tokens as one teacher would give, so the loop's normalisation is unchanged."""
    settings = settings.with_alpha(0.0) if on_policy else settings
    labels = labels_for(input_ids) if labels is None else labels
    if routes is None:
        routes = torch.full((input_ids.shape[0],), teachers.default_index)
    routes = routes.to(input_ids.device)
    hidden = student.base_model(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, H)
    needs_teacher = settings.alpha < 1.0
    per_teacher = []
    for index in range(len(teachers)):
        rows = (routes == index).nonzero().squeeze(1)  # (b,)
        row_labels = labels[rows]  # (b, T)
        if not bool((row_labels != IGNORE_INDEX).any()):
            per_teacher.append(_zero_terms(hidden))
            continue
        targets = teachers.soft_targets(index, input_ids[rows]) if needs_teacher else None
        terms = _head_terms(
            student, hidden[rows], targets, row_labels, settings, vocab_rows, upcast
        )
        per_teacher.append(terms)
    return per_teacher


def _zero_terms(hidden: torch.Tensor) -> LossTerms:
    """Terms of a batch without targets: zero, keeping every parameter in the graph."""
    zero = hidden.sum() * 0.0  # gradients of zero
    return LossTerms(zero, zero.detach(), zero.detach(), 0)


def _head_terms(
    student: PreTrainedModel,
    hidden: torch.Tensor,
    targets: torch.Tensor | SparseTargets | None,
    labels: torch.Tensor,
    settings: LossSettings,
    vocab_rows: int,
    upcast: bool,
) -> LossTerms:
    """The loss terms of the student's hidden states ``[b, T, H]`` through its output head."""
    weight, bias = output_head(student, vocab_rows)
    precision = contextlib.nullcontext()
    if upcast:
        hidden, weight = hidden.float(), weight.float()
        bias = bias.float() if bias is not None else None
        precision = torch.autocast(hidden.device.type, enabled=False)
    with precision:
        hidden = hidden.reshape(-1, hidden.shape[-1])  # (b*T, H)
        return head_distillation_loss(hidden, weight, bias, targets, labels.reshape(-1), settings)


def sum_terms(terms: list[LossTerms]) -> LossTerms:
    """The element-wise sum of several :class:`LossTerms` (one micro-batch's per-teacher parts)."""
    first, *rest = terms
    loss_sum, ce_sum, divergence_sum = first.loss_sum, first.ce_sum, first.divergence_sum
    for terms_part in rest:
        loss_sum = loss_sum + terms_part.loss_sum
        ce_sum = ce_sum + terms_part.ce_sum
        divergence_sum = divergence_sum + terms_part.divergence_sum
    return LossTerms(loss_sum, ce_sum, divergence_sum, sum(t.n_tokens for t in terms))


class MicroBatch(NamedTuple):
    """One micro-batch of this rank (on its device) and whether the student wrote its targets."""

    batch: Batch
    on_policy: bool = False


class CausalLMTask:
    """A decoder ``student`` distilled from ``teacher`` (None: labels only) on ``batches``.

    ``batches`` yields global micro-batches (per-device batch x world size): token blocks (every
    next token a target) or :class:`~distill.data.Batch` es with their own labels; each rank
    trains on its own rows. ``onpolicy`` (with lambda > 0) turns micro-batches into the
    student's own continuations. ``extra_terms(input_ids)``, called after each micro-batch's
    forward, returns more summed loss terms (intermediate layers) that are added to the loss and
    logged under their names; an ``nn.Module`` one has its own parameters trained (a
    projection, replicated on every rank) and checkpointed too.

    With a :class:`~distill.teacher.TeacherSet` as ``teacher``, each row is distilled from the
    teacher its route names (:class:`~distill.data.RoutedBlocks` or a :class:`Batch` with
    ``teachers``; unrouted rows: the default teacher), and each step's record gets, per
    teacher, its share of the window's target tokens and the divergence on its rows
    (:meth:`record_fields`).

    ``parallel.strategy=fsdp`` in a process group shards a copy of the student and, in place, a
    live teacher's model (frozen) with FSDP2; at the end rank 0's ``student`` receives the
    trained weights (the other ranks' copy keeps its initial weights), and the teacher stays
    sharded (usable only by all ranks together).
    """

    unit = "tokens"

    def __init__(
        self,
        student: PreTrainedModel,
        teacher: Teacher | TeacherSet | None,
        batches: BlockBatches,
        loss: LossConfig,
        *,
        vocab_rows: int,
        extra_terms: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None,
        onpolicy: OnPolicy | None = None,
        parallel: ParallelConfig | None = None,
    ) -> None:
        self.student = student
        self.teacher = teacher
        self.batches = batches
        self.loss = loss
        self.vocab_rows = vocab_rows
        self.extra_terms = extra_terms
        self.extra = extra_terms if isinstance(extra_terms, torch.nn.Module) else None
        self.onpolicy = onpolicy
        self.parallel = parallel or ParallelConfig()
        self.context = DistContext()
        self.schedule: LossSchedule | None = None
        # Set by start(): the module trained (the student or its sharded copy), its objective
        # root, every module the optimizer steps.
        self.model: torch.nn.Module = student
        self.objective: torch.nn.Module = Objective(student)
        self.trainable: torch.nn.Module = student
        self.sharded = False
        self.device = torch.device("cpu")

    @property
    def replicated(self) -> torch.nn.Module | None:
        """FSDP reduces the sharded gradients during backward; the rest is summed by the loop."""
        return self.extra if self.sharded else self.trainable

    def start(self, context: DistContext, total_steps: int) -> None:
        self.context = context
        self.schedule = LossSchedule(self.loss, total_steps)
        parallel = self.parallel
        self.sharded = parallel.strategy == "fsdp" and torch.distributed.is_initialized()
        if parallel.strategy == "fsdp" and not self.sharded:
            log.warning(
                "parallel.strategy=fsdp needs torchrun (a process group): training unsharded"
            )
        if self.sharded:
            mesh = device_mesh(torch.distributed.get_world_size())
            cuda = mesh.device_type == "cuda"
            self.device = (
                torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
            )
            policy = mixed_precision_policy(parallel.mixed_precision, self.device)
            self.model = copy.deepcopy(self.student)  # sharded; ``student`` stays whole for saving
            self.objective = shard_student(self.model, mesh, policy)  # shards onto ``device``
            teacher = self.teacher
            if isinstance(teacher, LiveTeacher) and not is_sharded(teacher.model):
                shard_teacher(teacher.model, mesh, policy)
        else:
            self.model = self.student
            self.objective = Objective(self.student)
            self.device = next(self.student.parameters()).device
        if self.extra is not None:  # replicated on every rank: rank 0's initial values
            broadcast_parameters(self.extra.to(self.device))
        self.model.train()
        self.trainable = (
            self.model if self.extra is None else torch.nn.ModuleList([self.model, self.extra])
        )

    def precision(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for the data-parallel path on GPU; FSDP casts through its policy."""
        if self.sharded:
            return contextlib.nullcontext()
        return autocast(self.parallel.mixed_precision, self.device)

    @property
    def upcast(self) -> bool:
        """The head and loss in float32 when the decoder runs in bf16 (GPU only)."""
        return self.parallel.mixed_precision != "no" and self.device.type == "cuda"

    # --- data -----------------------------------------------------------------------------

    def _rows(self, drawn: torch.Tensor | RoutedBlocks | Batch) -> Batch:
        """This rank's rows of a global micro-batch ``[world * b, T]`` -> ``[b, T]``."""
        prompt_tokens = self.onpolicy.config.prompt_tokens if self.onpolicy else 1
        if isinstance(drawn, RoutedBlocks):
            drawn = Batch.from_blocks(drawn.blocks, prompt_tokens, drawn.teachers)
        elif isinstance(drawn, torch.Tensor):
            drawn = Batch.from_blocks(drawn, prompt_tokens)
        per_rank = drawn.input_ids.shape[0] // self.context.world_size
        rank = self.context.rank
        return drawn.rows(rank * per_rank, (rank + 1) * per_rank)

    def draw_window(self, grad_accum: int) -> Window:
        """This rank's micro-batches, some continued by the student (on-policy); ``size`` counts
        their tokens, ``info`` the on-policy fraction and mean continuation length."""
        micro, generated = [], []
        for _ in range(grad_accum):
            batch = self._rows(self.batches.next_batch())
            on_policy = self.onpolicy is not None and self.onpolicy.draw()
            if on_policy:  # through the objective: a sharded student generates on all ranks
                with self.precision():
                    batch, lengths = self.objective(self.onpolicy.continue_batch, batch)
                generated.extend(lengths)
            micro.append(MicroBatch(_to_device(batch, self.device), on_policy))
        info: dict[str, float | None] = {}
        if self.onpolicy is not None and self.onpolicy.config.lambda_ > 0:
            info["onpolicy_fraction"] = sum(m.on_policy for m in micro) / len(micro)
            info["generated_tokens_mean"] = sum(generated) / len(generated) if generated else None
        return Window(micro, sum(m.batch.input_ids.numel() for m in micro), info)

    def count(self, micro: MicroBatch) -> int:
        return micro.batch.n_targets

    def warmup_batch(self) -> MicroBatch:
        """This rank's rows of the first global micro-batch, as packed blocks (not drawn)."""
        size = self.batches.batch_size
        blocks = self.batches.blocks[:size]  # (world * b, T)
        routes = self.batches.teachers
        drawn = Batch.from_blocks(blocks, 1, None if routes is None else routes[:size])
        per_rank = blocks.shape[0] // self.context.world_size
        rank = self.context.rank
        return MicroBatch(
            _to_device(drawn.rows(rank * per_rank, (rank + 1) * per_rank), self.device)
        )

    # --- loss -----------------------------------------------------------------------------

    def terms(self, micro: MicroBatch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The distillation terms plus the intermediate-layer terms; parts ``ce``,
        ``divergence`` (the run's ``loss.divergence``) and each intermediate term's name; with
        a teacher set, each teacher's target count and divergence sum too (every teacher in
        every micro-batch, so the ranks sum the same parts)."""
        with self.precision():
            per_teacher, extra = self.objective(self._forward, micro, self.schedule.at(step))
        terms = sum_terms(per_teacher)
        parts = {"ce": terms.ce_sum.detach(), "divergence": terms.divergence_sum.detach()}
        if isinstance(self.teacher, TeacherSet):
            for name, own in zip(self.teacher.names, per_teacher, strict=True):
                parts[_TARGETS + name] = torch.tensor(float(own.n_tokens))
                parts[_DIVERGENCE + name] = own.divergence_sum.detach()
        parts |= {name: value.detach() for name, value in extra.items()}
        return terms.loss_sum + sum(extra.values()), parts

    def record_fields(self, totals: dict[str, float], count: int) -> dict[str, Any]:
        """The step record's loss fields from the window's ``totals`` (each part summed over
        the window and the ranks, divided by the window's ``count`` of targets). With a teacher
        set, the per-teacher parts become ``teachers: {name: {targets, share, divergence}}``:
        its target tokens, their share of the window's, and the mean divergence on them (None
        when it had none); the loss itself stays normalised by the whole window's count."""
        fields = {k: v for k, v in totals.items() if not k.startswith((_TARGETS, _DIVERGENCE))}
        if isinstance(self.teacher, TeacherSet):
            fields["teachers"] = {}
            for name in self.teacher.names:
                share, divergence = totals[_TARGETS + name], totals[_DIVERGENCE + name]
                fields["teachers"][name] = {
                    "targets": round(share * count),
                    "share": share,
                    "divergence": divergence / share if share > 0 else None,
                }
        return fields

    def _forward(
        self, student: PreTrainedModel, micro: MicroBatch, settings: LossSettings
    ) -> tuple[list[LossTerms], dict[str, torch.Tensor]]:
        """Inside the objective's forward: :func:`micro_batch_terms` (a teacher set:
        :func:`routed_batch_terms`, one terms per teacher), then the intermediate terms
        (weighted sums from this forward's hooks)."""
        batch = micro.batch
        options = {"labels": batch.labels, "on_policy": micro.on_policy, "upcast": self.upcast}
        if isinstance(self.teacher, TeacherSet):
            per_teacher = routed_batch_terms(
                student,
                self.teacher,
                batch.input_ids,
                batch.teachers,
                settings,
                self.vocab_rows,
                **options,
            )
        else:
            per_teacher = [
                micro_batch_terms(
                    student, self.teacher, batch.input_ids, settings, self.vocab_rows, **options
                )
            ]
        extra = self.extra_terms(batch.input_ids) if self.extra_terms else {}
        return per_teacher, extra

    # --- checkpoints ----------------------------------------------------------------------

    def gather_student(self) -> None:
        """All ranks gather the sharded weights; rank 0 loads them into its unsharded student."""
        weights = full_model_state(self.model)
        if self.context.is_main:
            self.student.load_state_dict(weights)

    def checkpoint_state(self, optimizer: torch.optim.Optimizer):
        """The unsharded student and optimizer (FSDP: gathered from all ranks onto rank 0)."""
        if not self.sharded:
            return self.student, optimizer
        self.gather_student()
        return self.student, full_optimizer_state(self.trainable, optimizer)

    def load_checkpoint(self, checkpoint: Path, optimizer: torch.optim.Optimizer) -> dict:
        """Every rank reads the full checkpoint; under FSDP each then keeps its own shards."""
        saved = load_checkpoint(checkpoint, self.student, None if self.sharded else optimizer)
        if self.sharded:
            load_full_model_state(self.model, self.student.state_dict())
            load_full_optimizer_state(self.trainable, optimizer, saved["optimizer"])
        return saved

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "data": self.batches.state_dict(),
            "onpolicy": self.onpolicy.state_dict() if self.onpolicy is not None else None,
        }
        if self.extra is not None:  # the intermediate terms' projection (replicated)
            state["extra"] = {
                name: value.detach().cpu().clone()
                for name, value in self.extra.state_dict().items()
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state["data"])
        if self.onpolicy is not None and state.get("onpolicy") is not None:
            self.onpolicy.load_state_dict(state["onpolicy"])
        if self.extra is not None and state.get("extra") is not None:
            self.extra.load_state_dict(state["extra"])

    def finish(self, context: DistContext) -> None:
        if self.sharded:  # the trained weights into rank 0's unsharded student
            self.gather_student()
        self.student.eval()


# Part names of a teacher set's per-teacher sums (turned into record fields by record_fields).
_TARGETS, _DIVERGENCE = "targets/", "divergence/"


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if batch.input_ids.device == device and batch.labels.device == device:
        return batch
    return Batch(
        batch.input_ids.to(device), batch.labels.to(device), batch.prompt_lengths, batch.teachers
    )
