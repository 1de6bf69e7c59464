"""``task: classification | embedding``: the encoder path of ``distill.distill(config)``.

Phases: load teacher (+ tokenizer) -> load or layer-drop the student -> read texts, hold out by
hash -> train with :func:`distill.modules.train_module` (same optimizer, schedule, metrics.jsonl)
-> save the student -> evaluate teacher / student before / student after on the held-out texts
-> evaluation.json -> report.json / report.md with retention.
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

from distill.config import RunConfig
from distill.data import default_documents, read_documents, split_documents
from distill.encoders import losses
from distill.encoders.data import label_ids, read_labelled, split_by_hash, to_sentences
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
)
from distill.encoders.pooling import encode, pool, tokenize
from distill.errors import ConfigError, DataError
from distill.io import atomic_directory, atomic_write_json
from distill.losses import distillation_loss
from distill.models import count_params
from distill.modules import train_module, write_report
from distill.student import select_layers

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


def encoder_student_layers(num_layers: int, config: RunConfig) -> list[int]:
    """``student.layers`` or ``student.every_k`` when set, else every second layer (0, 2, ...)."""
    student = config.student
    if student.layers is None and student.every_k is None:
        student = student.model_copy(update={"every_k": 2})
    return select_layers(num_layers, student)


def _prepare_models(config: RunConfig) -> _Models:
    if config.teacher.path is None and config.task == "classification":
        raise ConfigError(
            "task classification: set teacher.path to a sequence-classifier directory"
        )
    source = config.teacher.path or default_embedder_path()
    teacher, tokenizer = load_encoder(source, config.task, config.teacher.trust_remote_code)
    layers = None
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
        layers = encoder_student_layers(encoder_layer_count(teacher), config)
        log.info("student keeps teacher layers %s", layers)
        student = build_encoder_student(teacher, layers)
    if (config.encoder.hidden_weight or config.encoder.attention_weight) and layers is None:
        raise ConfigError(
            "encoder.hidden_weight / attention_weight need a student built from the teacher's "
            "layers (unset student.path)"
        )
    if config.encoder.attention_weight:
        teacher.set_attn_implementation("eager")  # attention probabilities are returned
        student.set_attn_implementation("eager")
    return _Models(teacher, student, tokenizer, layers)


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
        if config.data.path is None:
            raise ConfigError("task classification: set data.path to a .csv/.jsonl file")
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


def _loader(config: RunConfig, tokenizer, items: list[Any], label_map) -> DataLoader:
    def collate(chunk: list[Any]) -> dict[str, torch.Tensor]:
        texts = chunk if config.task == "embedding" else [text for text, _ in chunk]
        batch = tokenize(tokenizer, texts, config.encoder.max_length)
        if config.task == "classification":
            batch["labels"] = torch.tensor(label_map([label for _, label in chunk]))
        return batch

    return DataLoader(
        items,
        batch_size=config.train.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(config.seed),
    )


def _forward(model: PreTrainedModel, batch: dict[str, torch.Tensor], config: RunConfig):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
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


def _terms_fn(models: _Models, student: PreTrainedModel, config: RunConfig, pooling, alpha):
    """The micro-batch objective (summed over sentences) and its named parts."""
    weights = {
        "mse": config.encoder.mse_weight,
        "cosine": config.encoder.cosine_weight,
        "relational": config.encoder.relational_weight,
        "hidden": config.encoder.hidden_weight,
        "attention": config.encoder.attention_weight,
    }

    def terms(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        use_teacher = config.task == "embedding" or alpha < 1.0
        teacher_out = None
        if use_teacher:
            with torch.no_grad():
                teacher_out = _forward(models.teacher, batch, config)
        student_out = _forward(student, batch, config)
        parts: dict[str, torch.Tensor] = {}
        if config.task == "classification":
            kd = distillation_loss(
                student_out.logits,
                None if teacher_out is None else teacher_out.logits,
                batch["labels"],
                temperature=config.loss.temperature,
                alpha=alpha,
            )
            loss_sum = kd.loss_sum
            parts |= {"ce": kd.ce_sum, "kl": kd.kl_sum}
        else:
            mask = batch["attention_mask"]
            s = pool(student_out.last_hidden_state, mask, pooling.mode)  # (B, H)
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


def _evaluate(config: RunConfig, models: _Models, compared: dict, heldout, label_map, pooling):
    """Metrics of every compared model on the held-out items (speed measured in-process)."""
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
        metrics: dict[str, Any] = {"params": count_params(model)}
        metrics["bytes"] = 4 * metrics["params"]
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


def run_encoder(config: RunConfig) -> EncoderRun:
    """Distil an encoder per ``config`` into ``config.run_dir`` (which already holds
    config.yaml); returns the run folder, the report and the trained student."""
    run_dir = config.run_dir
    models = _prepare_models(config)
    teacher_dir = Path(config.teacher.path or default_embedder_path())
    pooling = _pooling(config, teacher_dir)
    train_items, heldout = _texts(config)
    label_map = None
    if config.task == "classification":
        num_labels, label2id = models.teacher.config.num_labels, models.teacher.config.label2id
        label_map = lambda labels: label_ids(labels, label2id, num_labels)  # noqa: E731
        label_map([label for _, label in train_items + heldout])  # fail early on bad labels
    if config.baseline and config.task == "embedding":
        raise ConfigError("baseline: needs labels; task embedding has none")
    log.info("%d training and %d held-out texts", len(train_items), len(heldout))
    student_before = copy.deepcopy(models.student).eval()
    train_module(
        models.student,
        _loader(config, models.tokenizer, train_items, label_map),
        _terms_fn(models, models.student, config, pooling, config.loss.alpha),
        lambda batch: int(batch["input_ids"].shape[0]),
        config.train,
        metrics_path=run_dir / "metrics.jsonl",
        description=f"distill {config.task}",
    )
    compared = {
        "teacher": models.teacher,
        "student_before": student_before,
        "student_after": models.student,
    }
    if config.baseline:
        labels_only = copy.deepcopy(student_before).train()
        train_module(
            labels_only,
            _loader(config, models.tokenizer, train_items, label_map),
            _terms_fn(models, labels_only, config, pooling, 1.0),
            lambda batch: int(batch["input_ids"].shape[0]),
            config.train,
            metrics_path=run_dir / "metrics_labels_only.jsonl",
            description="labels only",
        )
        compared["student_labels_only"] = labels_only
    with atomic_directory(run_dir / "student") as tmp:
        if config.task == "embedding":
            save_embedder(models.student, models.tokenizer, pooling, tmp, config.encoder.max_length)
        else:
            models.student.save_pretrained(tmp, safe_serialization=True)
            models.tokenizer.save_pretrained(tmp)
    evaluation = {
        "models": _evaluate(config, models, compared, heldout, label_map, pooling),
        "task": config.task,
        "teacher": str(teacher_dir),
        "student_layers": models.layers,
        "heldout_texts": len(heldout),
        "train_texts": len(train_items),
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
    report = write_report(run_dir, f"{config.name} ({config.task})")
    print(f"report: {run_dir / 'report.md'}")
    return EncoderRun(run_dir, report, models.student)
