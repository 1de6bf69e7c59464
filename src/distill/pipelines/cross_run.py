"""``distill run`` across tokenizers: a student with a tokenizer of its own (a ``student.path``
model, or one built from the teacher's layers with ``student.tokenizer``), distilled from the
live teacher (or a cross-tokenizer ``teacher.cache`` written by ``distill cache`` for these
rows) on byte-aligned groups (``loss.cross_tokenizer``), or trained on labels alone
(``loss.alpha=1``: the sequence-level KD path on ``distill generate`` output).

Phases as in :mod:`distill.pipelines.run`: data in the student's tokenization (packed blocks are
aligned for the teacher when drawn; chat / prompt-response rows when encoded) -> plan (warm-up
step) -> train (and, with ``baseline``, the labels-only twin on the same rows) -> save the
student with its own tokenizer -> evaluate -> report. The evaluation compares the models per
byte of text, each with its own tokenizer: bits per byte of the held-out text (and of every
``eval.extra_data`` set), the teacher's bits per byte of each model's samples; token-level
metrics (perplexity, KL, agreement) only when the student kept the teacher's vocabulary, ``n/a``
with the reason otherwise; every model's size and speed.
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
from distill.data.cross_examples import CrossExamples
from distill.data.cross_tokenizer import TokenizerPair
from distill.data.examples import Examples
from distill.data.extra import extra_blocks, extra_sources, spread
from distill.data.sources import WeightedBatches
from distill.evaluate import heldout_metrics
from distill.evaluate.bits_per_byte import teacher_bits_per_byte_of_samples, vocabulary_differs
from distill.evaluate.fidelity import block_prompts
from distill.io import atomic_directory, atomic_write_json
from distill.models import count_params, load_teacher
from distill.pipelines.run import RunResult, _measure_speed, _print_plan, _score_bits_per_byte
from distill.pipelines.run_models import Models
from distill.pipelines.training_data import prepare_cross_data
from distill.report import build_report
from distill.teacher import CachedTeacher, LiveTeacher
from distill.teacher.cache import open_cross_cache
from distill.train import CheckpointPlan, train
from distill.train.cross_tokenizer import (
    CrossTokenizerTask,
    cross_tokenizer_batches,
    teacher_rows,
    token_pairs,
)
from distill.train.distributed import DistContext

__all__ = ["run_cross_tokenizer"]

log = logging.getLogger(__name__)


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
    ``models`` come from :func:`~distill.pipelines.run_models.prepare_models` in cross-tokenizer
    mode."""
    run_dir = config.run_dir
    loss = config.loss
    uses_teacher = loss.alpha < 1.0 or loss.alpha_schedule != "constant"
    pair = TokenizerPair(models.tokenizer, models.student_tokenizer) if uses_teacher else None
    if models.teacher is not None:  # None with teacher.cache: loaded again to evaluate
        models.teacher.to(device)
    models.student.to(device)
    train_data, heldout = prepare_cross_data(config, pair, models.student_tokenizer)
    size = config.train.batch_size * context.world_size
    if context.is_main:
        log.info(
            "global batch = %d rows = per-device batch %d x accumulation %d x world size %d",
            size * config.train.grad_accum,
            config.train.batch_size,
            config.train.grad_accum,
            context.world_size,
        )

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

    teacher: LiveTeacher | CachedTeacher | None = None
    if uses_teacher and config.teacher.cache:  # refuses a cache of other rows (exit 2)
        teacher = open_cross_cache(
            config,
            teacher_source=models.teacher_source,
            tokenizer=models.tokenizer,
            student_tokenizer=models.student_tokenizer,
            teacher_rows=teacher_rows(train_data, pair),
            vocab_rows=models.teacher_rows,
        )
    elif uses_teacher:
        teacher = LiveTeacher(models.teacher, models.teacher_rows)
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
            parts = [part.shape[0] for part in train_data] if isinstance(train_data, list) else None
            plan.update(
                _print_plan(
                    config, models, warmup, n_rows, device, context.world_size,
                    source_rows=parts,
                )
            )  # fmt: skip

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
        labels_loss = loss.labels_only()
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
    if models.teacher is None:  # trained from a cache: needed to evaluate
        models.teacher = load_teacher(config.teacher).to(device)
    with atomic_directory(run_dir / "student") as tmp:
        models.student.save_pretrained(tmp, safe_serialization=True)
        models.student_tokenizer.save_pretrained(tmp)
    evaluation = _evaluate(config, models, compared, heldout)
    evaluation["plan"] = plan
    atomic_write_json(run_dir / "evaluation.json", evaluation)
    report = build_report(run_dir)
    print(f"report: {run_dir / 'report.md'}")
    return RunResult(run_dir, report, models.student)


def _token_metrics(
    config: RunConfig,
    models: Models,
    compared: dict[str, torch.nn.Module],
    heldout: torch.Tensor | Examples,
    extra_sets: dict[str, torch.Tensor],
) -> tuple[dict[str, dict], dict[str, Any]]:
    """(per model, per extra set) token-level metrics: perplexity, KL and agreement with the
    teacher when the student kept the teacher's vocabulary (its rows are the teacher's), else
    each student marked absent with the reason (they compare rows of one vocabulary only)."""
    sources = extra_sources(config.eval.extra_data)
    extra_results: dict[str, Any] = {
        name: {
            "source": str(sources[name]),
            "blocks": int(blocks.shape[0]),
            "tokens": int(blocks.numel()),
            "models": {},
        }
        for name, blocks in extra_sets.items()
    }
    if models.new_vocabulary:
        absent = vocabulary_differs(models.tokenizer, models.student_tokenizer)

        def absent_rows() -> dict[str, dict]:
            return {"teacher": {}} | {name: {"token_metrics_absent": absent} for name in compared}

        for held in extra_results.values():
            held["models"] = absent_rows()
        return absent_rows(), extra_results
    teacher = LiveTeacher(models.teacher, models.vocab_rows)
    options = {"vocab_rows": models.vocab_rows, "batch_size": config.eval.batch_size}
    examples = isinstance(heldout, Examples)
    quality = heldout_metrics(
        compared,
        teacher,
        heldout.input_ids if examples else heldout,
        labels=heldout.labels if examples else None,
        **options,
    )
    for name, blocks in extra_sets.items():
        extra_results[name]["models"] = heldout_metrics(compared, teacher, blocks, **options)
    return quality, extra_results


def _prompt_texts(
    config: RunConfig, tokenizer, heldout: torch.Tensor | Examples, extra_sets: dict
) -> dict[str, list[str]]:
    """``{set: prompts}``: held-out prefixes (a chat row's prompt, a block's first tokens) as
    text, which every model reads with its own tokenizer."""
    count = config.eval.sample_prompts
    if isinstance(heldout, Examples):
        chosen = spread(torch.arange(len(heldout)), count).tolist()
        domain = [heldout.input_ids[i, : int(heldout.prompt_lengths[i])].tolist() for i in chosen]
    else:
        domain = block_prompts(heldout, count)
    sets = {"heldout": domain} | {
        name: block_prompts(blocks, count) for name, blocks in extra_sets.items()
    }
    return {
        name: [tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts]
        for name, prompts in sets.items()
    }


def _evaluate(
    config: RunConfig,
    models: Models,
    compared: dict[str, torch.nn.Module],
    heldout: torch.Tensor | Examples,
) -> dict[str, Any]:
    """The teacher and every student scored per byte of text, each with its own tokenizer, and
    token by token where they share a vocabulary; size and speed of every model (module
    docstring)."""
    all_models = {"teacher": models.teacher, **compared}
    tokenizers = {
        name: models.tokenizer if name == "teacher" else models.student_tokenizer
        for name in all_models
    }
    extra_sets = extra_blocks(
        config.eval.extra_data,
        models.student_tokenizer,
        config.data.block_size,
        config.eval.max_blocks,
        config.data.text_field,
    )
    quality, extra_results = _token_metrics(config, models, compared, heldout, extra_sets)
    if config.eval.sample_prompts:
        prompt_sets = _prompt_texts(config, models.student_tokenizer, heldout, extra_sets)
        for set_name, prompts in prompt_sets.items():
            log.info("sampling from every model on %s; the teacher scores the text", set_name)
            scores = teacher_bits_per_byte_of_samples(
                {name: (model, tokenizers[name]) for name, model in all_models.items()},
                models.teacher,
                models.tokenizer,
                prompts,
                new_tokens=config.eval.sample_tokens,
                seed=config.seed,
            )
            target = quality if set_name == "heldout" else extra_results[set_name]["models"]
            for name, value in scores.items():
                target.setdefault(name, {})["teacher_sample_bpb"] = value["teacher_sample_bpb"]
    evaluation: dict[str, Any] = {"models": {}, "extra_sets": extra_results}
    if config.eval.bits_per_byte:
        evaluation["bits_per_byte_settings"] = _score_bits_per_byte(
            config, all_models, tokenizers, quality, extra_results
        )
    scratch = config.run_dir / ".eval_models"
    model_dirs: dict[str, Path] = {"student_after": config.run_dir / "student"}
    for name, model in all_models.items():
        if name not in model_dirs:
            model.save_pretrained(scratch / name, safe_serialization=True)
            tokenizers[name].save_pretrained(scratch / name)
            model_dirs[name] = scratch / name
    threads = torch.get_num_threads()
    speed = _measure_speed(config, model_dirs, threads) if config.eval.speed else {}
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
    }
    return evaluation
