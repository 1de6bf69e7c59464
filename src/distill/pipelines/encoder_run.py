"""``task: classification | embedding``: the encoder path of ``distill.distill(config)``.

Phases: read texts, hold out by hash -> load teacher (+ tokenizer) -> load or layer-drop the
student (layers given, or searched on calibration texts) -> cache the teacher's embeddings of the
training sentences (embedding) -> train with :func:`distill.train.train` (the one loop: same
optimizer, schedule, metrics.jsonl, checkpoints and resume) given a
:class:`~distill.train.task.ModuleTask` -> save the student -> evaluate
teacher / student before / student after on the held-out texts -> evaluation.json ->
report.json / report.md with retention.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.compress.store import model_bytes
from distill.config import RunConfig
from distill.data import default_documents, read_documents, split_documents
from distill.data.corpus import split_by_hash
from distill.encoders import losses
from distill.encoders.data import (
    augment_sentences,
    label_ids,
    read_labelled,
    to_sentences,
)
from distill.encoders.evaluate import (
    accuracy_macro_f1,
    mean_cosine,
    retrieval_agreement,
    texts_per_second,
)
from distill.encoders.models import (
    Pooling,
    build_encoder_student,
    default_embedder_path,
    encoder_layer_count,
    load_encoder,
    read_pooling,
    save_embedder,
    set_dropout,
)
from distill.encoders.pooling import encode, pool, tokenize
from distill.encoders.search import search_encoder_layers
from distill.errors import DataError
from distill.io import atomic_directory, atomic_write_json
from distill.losses.objective import logits_distillation_loss
from distill.losses.schedule import LossSettings
from distill.models import count_params
from distill.report import build_report
from distill.student import select_layers
from distill.train.loop import CheckpointPlan, train
from distill.train.task import ModuleTask, refuse_torchrun

__all__ = ["EncoderRun", "run_encoder", "encoder_student_layers"]

log = logging.getLogger(__name__)


@dataclass
class EncoderRun:
    run_dir: Path
    report: dict[str, Any]
    student: PreTrainedModel


@dataclass
class _Models:
    teacher: PreTrainedModel
    student: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layers: list[int] | None  # teacher layer of each student layer (None: a named student)
    search: dict[str, Any] | None  # the layer search's choice and score, if one ran


def encoder_student_layers(num_layers: int, config: RunConfig) -> list[int] | None:
    """``student.layers`` or ``student.every_k`` when set, every second layer (0, 2, ...) with
    ``student.search: none``, else None: search on calibration texts (:func:`distill.encoders.search.search_encoder_layers`)."""
    student = config.student
    if student.layers is None and student.every_k is None:
        if student.search != "none":
            return None
        student = student.model_copy(update={"every_k": 2})
    return select_layers(num_layers, student)


CALIBRATION_TEXTS = 64


def _calibration_batches(config: RunConfig, tokenizer, train_items: list[Any]):
    step = max(1, len(train_items) // CALIBRATION_TEXTS)
    items = train_items[::step][:CALIBRATION_TEXTS]
    texts = items if config.task == "embedding" else [text for text, _ in items]
    size = config.encoder.eval_batch_size
    return [
        tokenize(tokenizer, texts[i : i + size], config.encoder.max_length)
        for i in range(0, len(texts), size)
    ]


def _prepare_models(config: RunConfig, train_items: list[Any], pooling: Pooling) -> _Models:
    source = config.teacher.path or default_embedder_path()
    teacher, tokenizer = load_encoder(source, config.task, config.teacher.trust_remote_code)
    layers, search = None, None
    if config.student.path is not None:
        student, _ = load_encoder(
            config.student.path, config.task, config.teacher.trust_remote_code
        )
        if (
            student.get_input_embeddings().weight.shape
            != teacher.get_input_embeddings().weight.shape
        ):
            log.warning(
                "student and teacher embedding tables differ: make sure they share a tokenizer"
            )
    else:
        total = encoder_layer_count(teacher)
        layers = encoder_student_layers(total, config)
        if layers is None:
            keep = config.student.num_layers or (total + 1) // 2
            batches = _calibration_batches(config, tokenizer, train_items)
            layers, score = search_encoder_layers(teacher, batches, keep, config.task, pooling.mode)
            search = {"layers": layers, "score": score, "calibration_texts": CALIBRATION_TEXTS}
            log.info("layer search: keep %s (score %.4f)", layers, score)
        log.info("student keeps teacher layers %s", layers)
        student = build_encoder_student(teacher, layers)
    if config.encoder.student_dropout is not None:
        count = set_dropout(student, config.encoder.student_dropout)
        log.info("student dropout %g (%d modules)", config.encoder.student_dropout, count)
    if config.encoder.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)  # build_optimizer skips it
    if config.encoder.attention_weight:
        teacher.set_attn_implementation("eager")  # attention probabilities are returned
        student.set_attn_implementation("eager")
    return _Models(teacher, student, tokenizer, layers, search)


def _pooling(config: RunConfig, teacher_dir: Path) -> Pooling:
    found = read_pooling(teacher_dir) or Pooling("mean", False)
    mode = found.mode if config.encoder.pooling == "auto" else config.encoder.pooling
    normalize = found.normalize if config.encoder.normalize is None else config.encoder.normalize
    return Pooling(mode, normalize)


def _texts(config: RunConfig) -> tuple[list[Any], list[Any]]:
    """(train, held-out) items: sentences (embedding) or (text, label) rows (classification)."""
    if config.task == "embedding":
        documents = (
            default_documents()
            if config.data.path is None
            else read_documents(config.data.path, config.data.text_field)
        )
        train_docs, heldout_docs = split_documents(documents, config.data.heldout_fraction)
        train, heldout = to_sentences(train_docs), to_sentences(heldout_docs)
    else:
        assert config.data.path is not None  # the schema requires it for classification
        rows = read_labelled(config.data.path, config.data.text_field, config.encoder.label_field)
        train_ids, heldout_ids = split_by_hash([t for t, _ in rows], config.data.heldout_fraction)
        train, heldout = [rows[i] for i in train_ids], [rows[i] for i in heldout_ids]
    if len(train) < config.train.batch_size or len(heldout) < 2:
        raise DataError(
            f"{len(train)} training and {len(heldout)} held-out texts: need at least "
            f"train.batch_size={config.train.batch_size} and 2"
        )
    stride = max(1, len(heldout) // config.encoder.eval_texts)
    return train, heldout[::stride][: config.encoder.eval_texts]


def _variants(config: RunConfig, train_items: list[Any]) -> list[str]:
    """``encoder.augment`` extra inputs made from the training sentences (task embedding only;
    see :func:`distill.encoders.data.augment_sentences`), fixed by ``seed``."""
    if not config.encoder.augment:
        return []
    variants = augment_sentences(train_items, config.encoder.augment, config.seed)
    log.info("%d augmented training inputs made from the training sentences", len(variants))
    return variants


def _loader(config: RunConfig, tokenizer, items: list[Any], label_map) -> DataLoader:
    """Shuffled training micro-batches: tokenized texts plus ``labels`` (classification) or
    ``index`` (embedding: each sentence's row in the teacher cache)."""
    embedding = config.task == "embedding"

    def collate(chunk: list[Any]) -> dict[str, torch.Tensor]:
        texts = [text for _, text in chunk] if embedding else [text for text, _ in chunk]
        batch = tokenize(tokenizer, texts, config.encoder.max_length)
        if embedding:
            batch["index"] = torch.tensor([index for index, _ in chunk])
        else:
            batch["labels"] = torch.tensor(label_map([label for _, label in chunk]))
        return batch

    return DataLoader(
        list(enumerate(items)) if embedding else items,
        batch_size=config.train.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(config.seed),
    )


def _forward(model: PreTrainedModel, batch: dict[str, torch.Tensor], config: RunConfig):
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "index")}
    return model(
        **inputs,
        output_hidden_states=bool(config.encoder.hidden_weight),
        output_attentions=bool(config.encoder.attention_weight),
    )


def _layer_terms(
    student_out, teacher_out, layers, mask, config: RunConfig
) -> dict[str, torch.Tensor]:
    """Hidden-state and attention terms between student layer i and teacher layer layers[i]."""
    terms = {}
    if config.encoder.hidden_weight:
        # hidden_states[0] is the embedding output, [l + 1] the output of layer l
        student_states = list(student_out.hidden_states[1:])
        teacher_states = [teacher_out.hidden_states[layer + 1] for layer in layers]
        terms["hidden"] = losses.hidden_mse(student_states, teacher_states, mask)
    if config.encoder.attention_weight:
        teacher_maps = [teacher_out.attentions[layer] for layer in layers]
        terms["attention"] = losses.attention_kl(list(student_out.attentions), teacher_maps, mask)
    return terms


@torch.no_grad()
def _teacher_cache(
    config: RunConfig, models: _Models, sentences: list[str], pooling: Pooling
) -> torch.Tensor | None:
    """The teacher's pooled (unnormalised) embeddings ``[N, H]`` of the training sentences,
    computed once, when ``encoder.cache_teacher`` applies: task embedding, no layer losses
    (they need the teacher's inner states), and a run that sees at least N sentences."""
    encoder = config.encoder
    if config.task != "embedding" or not encoder.cache_teacher:
        return None
    if encoder.hidden_weight or encoder.attention_weight:
        return None
    seen = config.train.steps * config.train.grad_accum * config.train.batch_size
    if seen < len(sentences):
        return None  # a teacher forward per step costs less
    models.teacher.eval()
    chunks = []
    for start in range(0, len(sentences), encoder.eval_batch_size):
        chunk = sentences[start : start + encoder.eval_batch_size]
        batch = tokenize(models.tokenizer, chunk, encoder.max_length)
        hidden = models.teacher(**batch).last_hidden_state  # (B, T, H)
        chunks.append(pool(hidden, batch["attention_mask"], pooling.mode))
    log.info("teacher embeddings of %d training sentences cached", len(sentences))
    return torch.cat(chunks)


def _terms_fn(
    models: _Models,
    student: PreTrainedModel,
    config: RunConfig,
    pooling,
    labels_only: bool,
    cache: torch.Tensor | None = None,
):
    """The micro-batch objective (summed over sentences) and its named parts at a step;
    ``cache``: the teacher's pooled embeddings of the training sentences (rows by ``index``)."""
    weights = {
        "mse": config.encoder.mse_weight,
        "cosine": config.encoder.cosine_weight,
        "relational": config.encoder.relational_weight,
        "hidden": config.encoder.hidden_weight,
        "attention": config.encoder.attention_weight,
    }

    def terms(
        batch: dict[str, torch.Tensor], settings: LossSettings
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if labels_only:
            settings = settings.with_alpha(1.0)
        embedding = config.task == "embedding"
        use_teacher = cache is None if embedding else settings.alpha < 1.0
        teacher_out = None
        if use_teacher:
            with torch.no_grad():
                teacher_out = _forward(models.teacher, batch, config)
        student_out = _forward(student, batch, config)
        parts: dict[str, torch.Tensor] = {}
        if config.task == "classification":
            kd = logits_distillation_loss(
                student_out.logits,
                None if teacher_out is None else teacher_out.logits,
                batch["labels"],
                settings,
            )
            loss_sum = kd.loss_sum
            parts |= {"ce": kd.ce_sum, "divergence": kd.divergence_sum}
        else:
            mask = batch["attention_mask"]
            s = pool(student_out.last_hidden_state, mask, pooling.mode)  # (B, H)
            if cache is not None:
                t = cache[batch["index"]]  # (B, H)
            else:
                t = pool(teacher_out.last_hidden_state, mask, pooling.mode)
            parts |= {
                "mse": losses.embedding_mse(s, t),
                "cosine": losses.embedding_cosine(s, t),
                "relational": losses.relational(s, t),
            }
            loss_sum = sum(weights[name] * value for name, value in parts.items())
        if teacher_out is not None:
            layer_parts = _layer_terms(
                student_out, teacher_out, models.layers, batch["attention_mask"], config
            )
            for name, value in layer_parts.items():
                loss_sum = loss_sum + weights[name] * value
            parts |= layer_parts
        return loss_sum, {name: value.detach() for name, value in parts.items()}

    return terms


def _sentences(batch: dict[str, torch.Tensor]) -> int:
    """Sentences in a micro-batch: the count every encoder loss sums over."""
    return int(batch["input_ids"].shape[0])


@torch.no_grad()
def _predict(model, tokenizer, texts: list[str], config: RunConfig) -> torch.Tensor:
    """Classifier logits ``[N, C]`` of texts, in evaluation batches."""
    model.eval()
    chunks = []
    for start in range(0, len(texts), config.encoder.eval_batch_size):
        batch = tokenize(
            tokenizer,
            texts[start : start + config.encoder.eval_batch_size],
            config.encoder.max_length,
        )
        chunks.append(model(**batch).logits)
    return torch.cat(chunks)


def _evaluate(
    config: RunConfig,
    models: _Models,
    compared: dict,
    heldout,
    label_map,
    pooling,
    file_bytes: dict[str, int],
):
    """Metrics of every compared model on the held-out items (speed measured in-process);
    ``file_bytes`` maps each to the size of its saved weight file(s)."""
    results: dict[str, dict[str, Any]] = {}
    texts = heldout if config.task == "embedding" else [text for text, _ in heldout]
    max_len, batch = config.encoder.max_length, config.encoder.eval_batch_size
    if config.task == "embedding":
        outputs = {
            name: encode(m, models.tokenizer, texts, pooling, max_length=max_len, batch_size=batch)
            for name, m in compared.items()
        }
    else:
        outputs = {
            name: _predict(m, models.tokenizer, texts, config) for name, m in compared.items()
        }
        labels = torch.tensor(label_map([label for _, label in heldout]))
    for name, model in compared.items():
        metrics: dict[str, Any] = {"params": count_params(model), "bytes": file_bytes[name]}
        if config.task == "embedding":
            metrics["cosine_to_teacher"] = mean_cosine(outputs[name], outputs["teacher"])
            metrics["retrieval_agreement"] = retrieval_agreement(
                outputs[name], outputs["teacher"], min(config.encoder.retrieval_k, len(texts) - 1)
            )
        else:
            predictions = outputs[name].argmax(-1)
            metrics |= accuracy_macro_f1(predictions, labels, outputs[name].shape[-1])
            teacher_predictions = outputs["teacher"].argmax(-1)
            metrics["top1_agreement"] = float((predictions == teacher_predictions).float().mean())
        if config.eval.speed:
            if config.task == "embedding":

                def run(model=model):
                    encode(
                        model,
                        models.tokenizer,
                        texts,
                        pooling,
                        max_length=max_len,
                        batch_size=batch,
                    )
            else:

                def run(model=model):
                    _predict(model, models.tokenizer, texts, config)

            metrics["texts_per_s"] = texts_per_second(run, len(texts))
        results[name] = metrics
    return results


def run_encoder(config: RunConfig, *, resume: bool = False) -> EncoderRun:
    """Distil an encoder per ``config`` into ``config.run_dir`` (which already holds
    config.yaml); returns the run folder, the report and the trained student.

    Checkpoints (``checkpoint.every`` / ``keep``) go to ``checkpoints/`` (and
    ``checkpoints_labels_only/`` for the baseline); ``resume`` continues each training phase
    from its newest valid checkpoint, exactly (see :func:`distill.train.loop.train`). One
    process only: under torchrun (``WORLD_SIZE`` > 1) it is refused before any work."""
    refuse_torchrun(f"task {config.task}")
    run_dir = config.run_dir

    def plan(folder: str) -> CheckpointPlan:
        return CheckpointPlan(
            run_dir / folder, config.checkpoint.every, config.checkpoint.keep, resume
        )

    teacher_dir = Path(config.teacher.path or default_embedder_path())
    pooling = _pooling(config, teacher_dir)
    train_items, heldout = _texts(config)
    models = _prepare_models(config, train_items, pooling)
    label_map = None
    if config.task == "classification":
        num_labels, label2id = models.teacher.config.num_labels, models.teacher.config.label2id
        label_map = lambda labels: label_ids(labels, label2id, num_labels)  # noqa: E731
        label_map([label for _, label in train_items + heldout])  # fail early on bad labels
    log.info("%d training and %d held-out texts", len(train_items), len(heldout))
    # Variants of the training sentences join them after the layer search (which calibrates
    # on real sentences); they are training inputs only, never evaluated.
    variants = _variants(config, train_items)
    train_inputs = train_items + variants
    cache = _teacher_cache(config, models, train_inputs, pooling)
    student_before = copy.deepcopy(models.student).eval()
    task = ModuleTask(
        models.student,
        _loader(config, models.tokenizer, train_inputs, label_map),
        _terms_fn(models, models.student, config, pooling, labels_only=False, cache=cache),
        _sentences,
        config.loss,
    )
    train(
        task,
        config.train,
        metrics_path=run_dir / "metrics.jsonl",
        description=f"distill {config.task}",
        checkpoints=plan("checkpoints"),
    )
    compared = {
        "teacher": models.teacher,
        "student_before": student_before,
        "student_after": models.student,
    }
    if config.baseline:
        baseline_student = copy.deepcopy(student_before).train()
        baseline = ModuleTask(
            baseline_student,
            _loader(config, models.tokenizer, train_items, label_map),
            _terms_fn(models, baseline_student, config, pooling, labels_only=True),
            _sentences,
            config.loss,
        )
        train(
            baseline,
            config.train,
            metrics_path=run_dir / "metrics_labels_only.jsonl",
            description="labels only",
            checkpoints=plan("checkpoints_labels_only"),
        )
        compared["student_labels_only"] = baseline_student
    with atomic_directory(run_dir / "student") as tmp:
        if config.task == "embedding":
            save_embedder(models.student, models.tokenizer, pooling, tmp, config.encoder.max_length)
        else:
            models.student.save_pretrained(tmp, safe_serialization=True)
            models.tokenizer.save_pretrained(tmp)
    # Saved weight files on disk; the students not saved share student_after's architecture
    # (same tensors, shapes and dtypes), so their files would be the same size.
    student_bytes = model_bytes(run_dir / "student")
    file_bytes = {name: student_bytes for name in compared} | {"teacher": model_bytes(teacher_dir)}
    evaluation = {
        "models": _evaluate(config, models, compared, heldout, label_map, pooling, file_bytes),
        "task": config.task,
        "teacher": str(teacher_dir),
        "student_layers": models.layers,
        "layer_search": models.search,
        "heldout_texts": len(heldout),
        "train_texts": len(train_items),
        "augmented_texts": len(variants),
        "pooling": {"mode": pooling.mode, "normalize": pooling.normalize},
        "retrieval_k": config.encoder.retrieval_k if config.task == "embedding" else None,
        "speed_settings": {
            "threads": torch.get_num_threads(),
            "batch": config.encoder.eval_batch_size,
            "in_process": True,
            "best_of": 3,
        },
    }
    atomic_write_json(run_dir / "evaluation.json", evaluation)
    report = build_report(run_dir)
    print(f"report: {run_dir / 'report.md'}")
    return EncoderRun(run_dir, report, models.student)
