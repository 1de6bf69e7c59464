"""``distill run`` across tokenizers: a student with its own tokenizer (``student.path``),
distilled from the live teacher on byte-aligned groups (``loss.cross_tokenizer``), or trained on
labels alone (``loss.alpha=1``: the sequence-level KD path on ``distill generate`` output).

Phases as in :mod:`distill.pipelines.run`: data in the student's tokenization (packed blocks are
aligned for the teacher when drawn; chat / prompt-response rows when encoded) -> plan (warm-up
step) -> train (and, with ``baseline``, the labels-only twin on the same rows) -> save the
student with its own tokenizer -> evaluate -> report. The evaluation here is what one
vocabulary allows: each student's held-out perplexity on its own tokens (comparable between the
students only), and every model's size and speed; KL and agreement with the teacher need a
shared vocabulary and stay empty.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from distill.compress.store import model_bytes
from distill.config import RunConfig
from distill.data.cross_examples import CrossExamples, encode_cross_examples
from distill.data.cross_tokenizer import TokenizerPair
from distill.data.examples import Examples, detect_format, encode_examples, read_rows, split_rows
from distill.data.extra import extra_blocks, extra_sources
from distill.data.sources import WeightedBatches
from distill.evaluate.heldout import heldout_perplexity
from distill.io import atomic_directory, atomic_write_json
from distill.models import count_params
from distill.pipelines.prepare import Models, prepare_data, prepare_sources
from distill.pipelines.run import RunResult, _measure_speed, _print_plan
from distill.report import build_report
from distill.teacher import LiveTeacher
from distill.train import CheckpointPlan, train
from distill.train.cross_tokenizer import (
    CrossTokenizerTask,
    cross_tokenizer_batches,
    token_pairs,
)
from distill.train.distributed import DistContext

__all__ = ["run_cross_tokenizer"]

log = logging.getLogger(__name__)


def _data(config: RunConfig, pair: TokenizerPair | None, student_tokenizer) -> tuple[Any, Any]:
    """(training data, held-out data) in the student's tokenization: packed blocks (a list of
    them per source with ``data.sources``), or chat / prompt-response rows, encoded for both
    tokenizers when the teacher is used (``pair``), for the student alone otherwise."""
    if config.data.sources:
        return prepare_sources(config, student_tokenizer)
    data_format = detect_format(config.data.path, config.data.format)
    if data_format == "text" or pair is None:
        return prepare_data(config, student_tokenizer)
    rows = read_rows(config.data.path)
    train_rows, heldout_rows = split_rows(rows, config.data.heldout_fraction)
    block_size, source = config.data.block_size, str(config.data.path)
    train = encode_cross_examples(train_rows, data_format, pair, block_size, source)
    heldout = encode_examples(heldout_rows, data_format, student_tokenizer, block_size, source)
    keep = config.eval.max_blocks
    heldout = Examples(
        heldout.input_ids[:keep],
        heldout.labels[:keep],
        heldout.lengths[:keep],
        heldout.prompt_lengths[:keep],
    )
    return train, heldout


def _n_rows(train_data: Any) -> int:
    if isinstance(train_data, list):  # data.sources: one block tensor per source
        return sum(part.shape[0] for part in train_data)
    return (
        len(train_data) if isinstance(train_data, CrossExamples | Examples) else train_data.shape[0]
    )


def run_cross_tokenizer(
    config: RunConfig,
    models: Models,
    context: DistContext,
    device: torch.device,
    resume: bool,
) -> RunResult:
    """The cross-tokenizer run of :func:`distill.pipelines.run.distill` (module docstring);
    ``models`` come from :func:`~distill.pipelines.prepare.prepare_models` in cross-tokenizer
    mode."""
    run_dir = config.run_dir
    loss = config.loss
    uses_teacher = loss.alpha < 1.0 or loss.alpha_schedule != "constant"
    pair = TokenizerPair(models.tokenizer, models.student_tokenizer) if uses_teacher else None
    models.teacher.to(device)
    models.student.to(device)
    train_data, heldout = _data(config, pair, models.student_tokenizer)
    size = config.train.batch_size * context.world_size

    def global_batches(pair: TokenizerPair | None):
        """Fresh batches over the same rows in the same order; ``pair`` None: no alignment."""
        data = train_data
        if config.data.sources:
            weights = [source.weight for source in config.data.sources]
            data = WeightedBatches(train_data, weights, size, config.seed)
        return cross_tokenizer_batches(data, pair, size, config.seed)

    def checkpoint_plan(folder: str) -> CheckpointPlan:
        every, keep = config.checkpoint.every, config.checkpoint.keep
        return CheckpointPlan(run_dir / folder, every, keep, resume)

    teacher = LiveTeacher(models.teacher, models.teacher_rows) if uses_teacher else None
    pairs = None
    if uses_teacher and loss.cross_tokenizer == "hybrid":
        pairs = token_pairs(pair, models.teacher_rows, models.vocab_rows)
    if config.eval.every:
        log.info("eval.every: KL during training needs one vocabulary; not measured here")
    student_before = copy.deepcopy(models.student).eval()
    plan: dict[str, Any] = {}

    def on_warmup(warmup: dict[str, float]) -> None:
        if context.is_main:
            n_rows = _n_rows(train_data)
            plan.update(_print_plan(config, models, warmup, n_rows, device, context.world_size))

    task = CrossTokenizerTask(
        models.student,
        teacher,
        global_batches(pair),
        loss,
        student_rows=models.vocab_rows,
        pairs=pairs,
        parallel=config.parallel,
    )
    train(
        task,
        config.train,
        metrics_path=run_dir / "metrics.jsonl",
        description="distill",
        checkpoints=checkpoint_plan("checkpoints"),
        context=context,
        on_warmup=on_warmup,
    )
    compared = {"student_before": student_before, "student_after": models.student}
    if config.baseline:
        labels_only = copy.deepcopy(student_before).train()
        labels_loss = loss.model_copy(update={"alpha": 1.0, "alpha_schedule": "constant"})
        baseline = CrossTokenizerTask(
            labels_only,
            None,
            global_batches(None),
            labels_loss,
            student_rows=models.vocab_rows,
            parallel=config.parallel,
        )
        train(
            baseline,
            config.train,
            metrics_path=run_dir / "metrics_labels_only.jsonl",
            description="labels only",
            checkpoints=checkpoint_plan("checkpoints_labels_only"),
            context=context,
        )
        compared["student_labels_only"] = labels_only
    if not context.is_main:
        return RunResult(run_dir, {}, models.student)
    with atomic_directory(run_dir / "student") as tmp:
        models.student.save_pretrained(tmp, safe_serialization=True)
        models.student_tokenizer.save_pretrained(tmp)
    evaluation = _evaluate(config, models, compared, heldout)
    evaluation["plan"] = plan
    atomic_write_json(run_dir / "evaluation.json", evaluation)
    report = build_report(run_dir)
    print(f"report: {run_dir / 'report.md'}")
    return RunResult(run_dir, report, models.student)


def _evaluate(
    config: RunConfig,
    models: Models,
    compared: dict[str, torch.nn.Module],
    heldout: torch.Tensor | Examples,
) -> dict[str, Any]:
    """Held-out perplexity of each student on its own tokens, on the training domain and on
    every ``eval.extra_data`` set; size and speed of every model (each with its tokenizer)."""
    examples = isinstance(heldout, Examples)
    options = {"vocab_rows": models.vocab_rows, "batch_size": config.eval.batch_size}
    quality = heldout_perplexity(
        compared,
        heldout.input_ids if examples else heldout,
        labels=heldout.labels if examples else None,
        **options,
    )
    extra_results: dict[str, Any] = {}
    sources = extra_sources(config.eval.extra_data)
    extra_sets = extra_blocks(
        config.eval.extra_data,
        models.student_tokenizer,
        config.data.block_size,
        config.eval.max_blocks,
        config.data.text_field,
    )
    for set_name, blocks in extra_sets.items():
        extra_results[set_name] = {
            "source": str(sources[set_name]),
            "blocks": int(blocks.shape[0]),
            "tokens": int(blocks.numel()),
            "models": heldout_perplexity(compared, blocks, **options),
        }
    run_dir = config.run_dir
    scratch = run_dir / ".eval_models"
    all_models = {"teacher": models.teacher, **compared}
    model_dirs: dict[str, Path] = {"student_after": run_dir / "student"}
    for name, model in all_models.items():
        if name not in model_dirs:
            model.save_pretrained(scratch / name, safe_serialization=True)
            tokenizer = models.tokenizer if name == "teacher" else models.student_tokenizer
            tokenizer.save_pretrained(scratch / name)
            model_dirs[name] = scratch / name
    threads = torch.get_num_threads()
    speed = _measure_speed(config, model_dirs, threads) if config.eval.speed else {}
    evaluation: dict[str, Any] = {"models": {}, "extra_sets": extra_results}
    for name, model in all_models.items():
        evaluation["models"][name] = {
            "params": count_params(model),
            "bytes": model_bytes(model_dirs[name]),
            **quality.get(name, {}),
            "tokens_per_s": speed.get(name, {}).get("tokens_per_s_batch1"),
            **{key: value for key, value in speed.get(name, {}).items() if key != "threads"},
        }
    shutil.rmtree(scratch, ignore_errors=True)
    evaluation["speed_settings"] = {
        "threads": threads,
        "prompts": len(config.eval.gen_prompts),
        "new_tokens": config.eval.gen_new_tokens,
        "batch_sizes": config.eval.gen_batch_sizes,
        "timed_runs": config.eval.gen_runs,
        "decoding": "greedy",
    }
    evaluation["cross_tokenizer"] = {
        "loss": config.loss.cross_tokenizer,
        "teacher_tokens": len(models.tokenizer),
        "student_tokens": len(models.student_tokenizer),
        "perplexity": "per token of the student's tokenizer (students only)",
    }
    return evaluation
