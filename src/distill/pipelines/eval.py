"""``distill eval``: every model on the same held-out blocks, questions and prompts.

For each model (and the teacher): perplexity, KL(teacher || model) per token, top-1 / top-5
agreement with the teacher (models of the teacher's vocabulary only: the others are byte-level
BPE models of their own vocabulary, scored per byte), bits per UTF-8 byte of held-out text (each
model with its own tokenizer), multiple-choice accuracy (log-likelihood scoring), greedy generation
tokens/s at batch 1 and 8, time to first token, peak RSS (each model timed in a fresh process),
parameters and bytes on disk. ``retention`` gives each metric as a percentage of the teacher's,
oriented so that 100 means "as good as the teacher": ``model / teacher`` for higher-is-better
metrics, ``teacher / model`` for perplexity and time to first token.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from distill.compress.store import load_model, model_bytes, quantized_params, read_manifest
from distill.config import RunConfig
from distill.data import Examples, check_data_source
from distill.data.alignment import check_tokenizer_pair
from distill.errors import ConfigError, ModelError
from distill.evaluate.bits_per_byte import (
    TOKEN_METRICS,
    bits_per_byte,
    text_pieces,
    vocabulary_differs,
)
from distill.evaluate.choice import default_task_path, multiple_choice_accuracy, read_questions
from distill.evaluate.generation import GenerationSettings, measure_generation_in_subprocess
from distill.evaluate.heldout import heldout_quality
from distill.models import (
    count_params,
    load_teacher,
    load_teacher_tokenizer,
    load_tokenizer,
    same_vocabulary,
    shared_vocab_rows,
    teacher_source,
)
from distill.pipelines.training_data import prepare_data, split_texts
from distill.teacher import LiveTeacher

__all__ = [
    "evaluate_models",
    "heldout_blocks",
    "retention",
    "format_tables",
    "RETENTION_METRICS",
]

log = logging.getLogger(__name__)

# metric -> True when higher is better (retention = model / teacher), else teacher / model
RETENTION_METRICS = {
    "perplexity": False,
    "bits_per_byte": False,
    "top1_agreement": True,
    "top5_agreement": True,
    "mc_accuracy": True,
    "mc_accuracy_norm": True,
    "tokens_per_s_batch1": True,
    "tokens_per_s_batch8": True,
    "ttft_s": False,
}


def heldout_blocks(config: RunConfig, tokenizer) -> torch.Tensor:
    """The held-out blocks of ``data`` (the same split and packing as training), at most
    ``eval.max_blocks``, ``[n, block_size]``."""
    heldout = prepare_data(config, tokenizer)[1]
    if isinstance(heldout, Examples):
        raise ConfigError(
            f"distill eval scores packed text: data.path {config.data.path} holds "
            "chat or prompt/response rows (data.format); give it a text corpus"
        )
    return heldout


def _output_rows(model: PreTrainedModel) -> int:
    return int(model.get_output_embeddings().out_features)


def _own_rows(model: PreTrainedModel, tokenizer) -> int:
    """Output rows of a model that belong to its own tokenizer."""
    return min(_output_rows(model), len(tokenizer))


def _params(path: str, model: PreTrainedModel) -> int:
    """Parameters; int8 Linear layers hold no Parameters, so count what the file stores."""
    manifest = read_manifest(path) if Path(path).is_dir() else None
    if manifest is not None and manifest.get("quantize"):
        return quantized_params(path)
    return count_params(model)


def _labels(paths: list[str]) -> list[str]:
    labels: list[str] = []
    for path in paths:
        base = Path(path).stem if path.endswith(".gguf") else Path(path).name
        label = base if base not in labels and base != "teacher" else f"{base}_{len(labels)}"
        labels.append(label)
    return labels


def retention(metrics: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{model: {metric: % of teacher}}`` for every model but the teacher (see module doc)."""
    teacher = metrics["teacher"]
    table: dict[str, dict[str, float]] = {}
    for name, values in metrics.items():
        if name == "teacher":
            continue
        row = {}
        for metric, higher in RETENTION_METRICS.items():
            ours, theirs = values.get(metric), teacher.get(metric)
            if ours is None or theirs is None or (ours if not higher else theirs) == 0:
                continue
            row[metric] = 100.0 * (ours / theirs if higher else theirs / ours)
        table[name] = row
    return table


def evaluate_models(model_paths: list[str], config: RunConfig) -> dict[str, Any]:
    """``{"models": {name: metrics}, "retention": ..., "paths": ..., "settings": ...}`` for the
    teacher of ``config.teacher`` and each model, on ``config.data``'s held-out split, with the
    ``config.eval`` settings (``eval.speed`` false: no generation timing)."""
    check_data_source(config)
    teacher_path = teacher_source(config.teacher)
    for path in [teacher_path, *model_paths]:
        if not Path(path).exists():
            raise ModelError(f"model {path} does not exist")
    names = _labels(model_paths)
    paths = {"teacher": teacher_path, **dict(zip(names, model_paths, strict=True))}
    tokenizer = load_teacher_tokenizer(config.teacher)
    tokenizers = {"teacher": tokenizer} | {name: load_tokenizer(paths[name]) for name in names}
    for name in names:  # another vocabulary: both byte-level BPE, checked before any model loads
        if not same_vocabulary(tokenizer, tokenizers[name]):
            check_tokenizer_pair(tokenizer, tokenizers[name], teacher_path, paths[name])
    teacher_model = load_teacher(config.teacher)
    models = {name: load_model(path) for name, path in paths.items() if name != "teacher"}
    same = {name for name in names if same_vocabulary(tokenizer, tokenizers[name])}
    vocab_rows = _output_rows(teacher_model)
    for name in same:
        vocab_rows = min(
            vocab_rows,
            shared_vocab_rows(
                tokenizer,
                tokenizers[name],
                _output_rows(teacher_model),
                _output_rows(models[name]),
                teacher_name=teacher_path,
                student_name=paths[name],
            ),
        )
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    blocks = heldout_blocks(config, tokenizer)
    log.info("scoring %d held-out blocks of %d tokens", blocks.shape[0], blocks.shape[1])
    teacher = LiveTeacher(teacher_model, vocab_rows)
    quality = heldout_quality(
        {name: models[name] for name in names if name in same},
        teacher,
        blocks,
        vocab_rows=vocab_rows,
        batch_size=config.eval.batch_size,
    )
    for name in names:
        if name not in same:
            quality[name] = {
                "token_metrics_absent": vocabulary_differs(tokenizer, tokenizers[name])
            }
    texts = []
    if config.eval.bits_per_byte:
        heldout_documents = split_texts(config)[1]
        texts = text_pieces(heldout_documents, config.eval.bpb_bytes, 4 * config.data.block_size)
    questions = read_questions(config.eval.mc_task or default_task_path())[: config.eval.mc_limit]
    results: dict[str, dict[str, Any]] = {}
    for name, model in {"teacher": teacher_model, **models}.items():
        log.info("multiple choice: %s", name)
        rows = (
            vocab_rows if name == "teacher" or name in same else _own_rows(model, tokenizers[name])
        )
        results[name] = {
            "params": _params(paths[name], model),
            "bytes": model_bytes(paths[name]),
            **quality[name],
            **multiple_choice_accuracy(model, tokenizers[name], questions, rows),
        }
        if texts:
            scores = bits_per_byte(
                model, tokenizers[name], texts, batch_size=config.eval.batch_size
            )
            results[name]["bits_per_byte"] = scores["bits_per_byte"]
    del teacher_model, models, teacher
    generation = GenerationSettings.from_config(config.eval, config.train.threads)
    if config.eval.speed:
        for name, path in paths.items():
            log.info("generation timing: %s", name)
            results[name].update(measure_generation_in_subprocess(path, generation))
    return {
        "models": results,
        "retention": retention(results),
        "paths": paths,
        "settings": {
            "data": config.data.model_dump(mode="json"),
            "eval": config.eval.model_dump(mode="json"),
            "threads": torch.get_num_threads(),
            "heldout_tokens": int(blocks.numel()),
            "bits_per_byte_bytes": sum(len(text.encode("utf-8")) for text in texts),
        },
    }


_COLUMNS = [
    ("params", "params M", lambda v: f"{v / 1e6:.1f}"),
    ("bytes", "disk MB", lambda v: f"{v / 1e6:.1f}"),
    ("perplexity", "ppl", lambda v: f"{v:.2f}"),
    ("bits_per_byte", "bits/byte", lambda v: f"{v:.3f}"),
    ("kl_to_teacher", "KL", lambda v: f"{v:.4f}"),
    ("top1_agreement", "top-1", lambda v: f"{v:.3f}"),
    ("top5_agreement", "top-5", lambda v: f"{v:.3f}"),
    ("mc_accuracy", "MC acc", lambda v: f"{v:.3f}"),
    ("mc_accuracy_norm", "MC acc_norm", lambda v: f"{v:.3f}"),
    ("tokens_per_s_batch1", "tok/s b1", lambda v: f"{v:.1f}"),
    ("tokens_per_s_batch8", "tok/s b8", lambda v: f"{v:.1f}"),
    ("ttft_s", "TTFT ms", lambda v: f"{v * 1e3:.0f}"),
    ("peak_rss_bytes", "RSS MB", lambda v: f"{v / 1e6:.0f}"),
]


def _table_cell(metrics: dict[str, Any], key: str, fmt) -> str:
    if metrics.get(key) is not None:
        return fmt(metrics[key])
    return "n/a" if metrics.get("token_metrics_absent") and key in TOKEN_METRICS else "-"


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def format_tables(result: dict[str, Any]) -> str:
    """The metrics table and the retention table (% of teacher), as Markdown."""
    models = result["models"]
    rows = [
        [name] + [_table_cell(m, key, fmt) for key, _, fmt in _COLUMNS]
        for name, m in models.items()
    ]
    lines = _markdown_table(["model"] + [title for _, title, _ in _COLUMNS], rows)
    reasons = dict.fromkeys(r for m in models.values() if (r := m.get("token_metrics_absent")))
    lines += [f"n/a: {reason}" for reason in reasons]
    metrics = list(RETENTION_METRICS)
    ret_rows = [
        [name] + [f"{r[m]:.1f}" if m in r else "-" for m in metrics]
        for name, r in result["retention"].items()
    ]
    lines += ["", "retention (% of teacher; 100 = as good as the teacher)", ""]
    return "\n".join(lines + _markdown_table(["model", *metrics], ret_rows)) + "\n"
