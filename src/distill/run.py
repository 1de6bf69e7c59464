"""``distill.distill(config)``: the one path from a config to a trained, evaluated student.

Phases: resolve config -> load teacher and student -> pack data -> plan (warm-up step) ->
distil (and, with ``baseline``, train a labels-only twin) -> save the student -> evaluate every
model on the held-out blocks -> measure speed and memory -> write the report.
The CLI's ``distill run`` calls exactly this function.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.config import RunConfig, load_config
from distill.data import (
    BlockBatches,
    default_documents,
    pack_documents,
    read_documents,
    split_documents,
)
from distill.errors import ConfigError
from distill.evaluate import heldout_metrics, measure_in_subprocess, weights_bytes
from distill.io import atomic_directory, atomic_write_json, atomic_write_text
from distill.models import (
    count_params,
    default_teacher_path,
    load_causal_lm,
    load_tokenizer,
    shared_vocab_rows,
)
from distill.report import build_report
from distill.student import build_student, select_layers
from distill.teacher import LiveTeacher
from distill.train import train

__all__ = ["distill", "RunResult", "prepare_models", "prepare_data"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    report: dict[str, Any]
    student: PreTrainedModel  # the distilled student, in memory (also saved in run_dir/student)


@dataclass
class Models:
    teacher: PreTrainedModel
    student: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    vocab_rows: int
    teacher_source: str


def prepare_models(config: RunConfig) -> Models:
    """Load the teacher, then load or build the student, and check they share a tokenizer."""
    teacher_source = str(config.teacher.path or default_teacher_path())
    tokenizer = load_tokenizer(teacher_source, config.teacher.trust_remote_code)
    teacher = load_causal_lm(teacher_source, config.teacher.dtype, config.teacher.trust_remote_code)
    if config.student.path is not None:
        student = load_causal_lm(
            config.student.path, config.teacher.dtype, config.teacher.trust_remote_code
        )
        student_tokenizer = load_tokenizer(config.student.path, config.teacher.trust_remote_code)
        student_name = config.student.path
    else:
        layers = select_layers(teacher.config.num_hidden_layers, config.student)
        log.info("student keeps teacher layers %s", layers)
        student = build_student(teacher, layers)
        student_tokenizer, student_name = tokenizer, "student"
    vocab_rows = shared_vocab_rows(
        tokenizer,
        student_tokenizer,
        teacher.get_output_embeddings().weight.shape[0],
        student.get_output_embeddings().weight.shape[0],
        teacher_name=teacher_source,
        student_name=student_name,
    )
    return Models(teacher, student, tokenizer, vocab_rows, teacher_source)


def prepare_data(
    config: RunConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_blocks, heldout_blocks), each ``[n, block_size]``."""
    if config.data.path is None:
        documents = default_documents()
    else:
        documents = read_documents(config.data.path, config.data.text_field)
    train_docs, heldout_docs = split_documents(documents, config.data.heldout_fraction)
    train_blocks = pack_documents(train_docs, tokenizer, config.data.block_size)
    heldout_blocks = pack_documents(heldout_docs, tokenizer, config.data.block_size)
    return train_blocks, heldout_blocks[: config.eval.max_blocks]


def _print_plan(
    config: RunConfig, models: Models, warmup: dict[str, float], n_train_blocks: int
) -> dict:
    train_cfg = config.train
    tokens_per_step = train_cfg.batch_size * config.data.block_size * train_cfg.grad_accum
    step_seconds = warmup["micro_batch_seconds"] * train_cfg.grad_accum
    student_params = count_params(models.student)
    optimizer_bytes = 2 * student_params * 4  # AdamW's two float32 moments, created at step 1
    runs = 2 if config.baseline else 1
    plan = {
        "teacher_params": count_params(models.teacher),
        "student_params": student_params,
        "tokens_per_step": tokens_per_step,
        "train_blocks": n_train_blocks,
        "step_seconds_measured": step_seconds,
        "estimated_peak_rss_bytes": warmup["peak_rss_bytes"] + optimizer_bytes,
        "estimated_train_seconds": step_seconds * train_cfg.steps * runs,
    }
    lines = [
        "plan:",
        f"  teacher {plan['teacher_params']:,} params ({models.teacher_source})",
        f"  student {student_params:,} params, {models.student.config.num_hidden_layers} layers",
        f"  {tokens_per_step} tokens/step = {train_cfg.batch_size} x {config.data.block_size} x "
        f"accumulation {train_cfg.grad_accum}; {n_train_blocks} training blocks",
        f"  measured warm-up: {step_seconds:.2f} s/step, peak RSS "
        f"{warmup['peak_rss_bytes'] / 1e9:.2f} GB + optimizer state {optimizer_bytes / 1e9:.2f} GB"
        f" = ~{plan['estimated_peak_rss_bytes'] / 1e9:.2f} GB",
        f"  {train_cfg.steps} steps x {runs} run(s): ~{plan['estimated_train_seconds'] / 60:.1f} min"
        " of training, plus evaluation",
    ]
    print("\n".join(lines), flush=True)
    return plan


def _measure_speed(config: RunConfig, model_dirs: dict[str, Path], threads: int) -> dict[str, dict]:
    results = {}
    for name, model_dir in model_dirs.items():
        log.info("measuring generation speed and memory of %s", name)
        results[name] = measure_in_subprocess(
            model_dir, config.eval.gen_prompts, config.eval.gen_new_tokens, threads
        )
    return results


def distill(config: RunConfig | dict | str | Path, overrides: list[str] | None = None) -> RunResult:
    """Run distillation end to end and return the run directory and its report.

    ``config`` is a :class:`RunConfig`, a dict of sections, or a YAML path; ``overrides`` are
    ``key=value`` strings applied on top.
    """
    if isinstance(config, RunConfig):
        config = load_config(overrides=overrides, base=config.model_dump())
    elif isinstance(config, dict):
        config = load_config(overrides=overrides, base=config)
    else:
        config = load_config(config, overrides)
    run_dir = config.run_dir
    if (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"run directory {run_dir} already holds a run: choose another name")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        run_dir / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    )
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(config.seed)

    models = prepare_models(config)
    train_blocks, heldout_blocks = prepare_data(config, models.tokenizer)
    teacher = LiveTeacher(models.teacher, models.vocab_rows)
    student_before = copy.deepcopy(models.student).eval()

    plan: dict[str, Any] = {}

    def on_warmup(warmup: dict[str, float]) -> None:
        plan.update(_print_plan(config, models, warmup, train_blocks.shape[0]))

    batches = BlockBatches(train_blocks, config.train.batch_size, config.seed)
    train(
        models.student,
        teacher,
        batches,
        config.loss,
        config.train,
        vocab_rows=models.vocab_rows,
        metrics_path=run_dir / "metrics.jsonl",
        description="distill",
        on_warmup=on_warmup,
    )
    compared = {"student_before": student_before, "student_after": models.student}
    if config.baseline:
        labels_only = copy.deepcopy(student_before).train()
        labels_loss = config.loss.model_copy(update={"alpha": 1.0})
        train(
            labels_only,
            None,
            BlockBatches(train_blocks, config.train.batch_size, config.seed),
            labels_loss,
            config.train,
            vocab_rows=models.vocab_rows,
            metrics_path=run_dir / "metrics_labels_only.jsonl",
            description="labels only",
        )
        compared["student_labels_only"] = labels_only

    with atomic_directory(run_dir / "student") as tmp:
        models.student.save_pretrained(tmp, safe_serialization=True)
        models.tokenizer.save_pretrained(tmp)

    quality = heldout_metrics(
        compared,
        teacher,
        heldout_blocks,
        vocab_rows=models.vocab_rows,
        batch_size=config.eval.batch_size,
    )
    all_models = {"teacher": models.teacher, **compared}
    scratch = run_dir / ".eval_models"
    model_dirs: dict[str, Path] = {"student_after": run_dir / "student"}
    for name, model in all_models.items():
        if name not in model_dirs:
            model.save_pretrained(scratch / name, safe_serialization=True)
            models.tokenizer.save_pretrained(scratch / name)
            model_dirs[name] = scratch / name
    evaluation: dict[str, Any] = {"models": {}, "plan": plan}
    speed = _measure_speed(config, model_dirs, threads) if config.eval.speed else {}
    for name, model in all_models.items():
        evaluation["models"][name] = {
            "params": count_params(model),
            "bytes": weights_bytes(model_dirs[name]),
            **quality[name],
            "tokens_per_s": speed.get(name, {}).get("tokens_per_s"),
            "peak_rss_bytes": speed.get(name, {}).get("peak_rss_bytes"),
        }
    shutil.rmtree(scratch, ignore_errors=True)
    evaluation["speed_settings"] = {
        "threads": threads,
        "prompts": len(config.eval.gen_prompts),
        "new_tokens": config.eval.gen_new_tokens,
        "batch": 1,
        "decoding": "greedy",
    }
    atomic_write_json(run_dir / "evaluation.json", evaluation)
    report = build_report(run_dir)
    print(
        json.dumps(
            {
                name: {k: v for k, v in m.items() if k in ("perplexity", "kl_to_teacher")}
                for name, m in report["models"].items()
            },
            indent=1,
        )
    )
    print(f"report: {run_dir / 'report.md'}")
    return RunResult(run_dir, report, models.student)
