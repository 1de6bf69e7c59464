"""``distill compress RUN_DIR``: prune (then heal) and/or quantize a run's student, evaluate it.

Order: load ``RUN_DIR/student`` (an int4 group size that does not tile its Linears is refused
first) -> prune the decoder Linears (masks kept) -> heal by distilling from the run's teacher on
the run's training blocks -> bake the masks in -> int8: float outlier channels (and optional
smoothing factors and float-kept layers) from calibration blocks (logged) -> quantize and save to ``RUN_DIR/compressed/<label>/`` ->
with ``qad_steps``: that post-training quantized model is scored too, then the student trains
through the fake-quantized grid (QAD) and is quantized again into ``<label>_qadN/`` -> score each
on the run's held-out blocks (with the teacher) and time it -> add each to ``evaluation.json`` as
``student_<label>`` -> rebuild the report. Heal and QAD checkpoint into
``checkpoints_heal_<label>/`` and ``checkpoints_qad_<label>/``; ``resume`` continues them exactly.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from distill.compress.calibrate import quantize_spec
from distill.compress.heal import heal
from distill.compress.prune import apply_pruning, make_permanent, sparsity
from distill.compress.qad import quantization_aware_distill
from distill.compress.quantize import weight_only_paths
from distill.compress.store import load_model, model_bytes, save_model
from distill.config import CompressConfig, RunConfig, load_config
from distill.errors import ConfigError, DistillError
from distill.evaluate.generation import GenerationSettings, measure_generation_in_subprocess
from distill.evaluate.heldout import heldout_quality
from distill.io import atomic_write_json
from distill.models import (
    count_params,
    load_causal_lm,
    load_teacher,
    load_teacher_tokenizer,
    load_tokenizer,
    shared_vocab_rows,
    teacher_source,
)
from distill.pipelines.training_data import prepare_data
from distill.teacher import LiveTeacher
from distill.train import CheckpointPlan

__all__ = ["CompressResult", "compress_label", "compress_run"]

log = logging.getLogger(__name__)


@dataclass
class CompressResult:
    label: str
    model_dir: Path
    metrics: dict[str, Any]


def compress_label(config: CompressConfig, *, qad: bool = True) -> str:
    """A short name for the recipe, e.g. ``pruned30_healed100_int8`` or ``int4g64_qad200``
    (``qad=False``: the same recipe before QAD)."""
    parts = []
    if config.prune > 0:
        parts.append("pruned2of4" if config.prune_pattern == "2:4" else f"pruned{config.prune:.0%}")
        if config.heal_steps:
            parts.append(f"healed{config.heal_steps}")
    if config.quantize == "int4":
        parts.append(f"int4g{config.group_size}")
    elif config.quantize != "none":
        parts.append(config.quantize.replace("-", "_"))
    if qad and config.qad_steps:
        parts.append(f"qad{config.qad_steps}")
    return "_".join(parts).replace("%", "")


def check_group_size(model: PreTrainedModel, group_size: int) -> None:
    """Refuse (one line) an int4 group size that does not divide every decoder Linear's input."""
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head and module.in_features % group_size:
            raise ConfigError(
                f"compress.group_size={group_size} does not divide the input width "
                f"{module.in_features} of {name}: choose 32, 64 or 128 dividing it"
            )


def _run_config(run_dir: Path, overrides: list[str], config_path: str | Path | None) -> RunConfig:
    """The run's saved config; the sections of ``config_path`` (if any) replace its sections,
    then ``overrides`` apply."""
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "student").is_dir():
        raise DistillError(f"{run_dir} is not a finished run (needs config.yaml and student/)")
    saved = load_config(run_dir / "config.yaml")
    return load_config(config_path, overrides, base=saved.model_dump())


def compress_run(
    run_dir: str | Path,
    overrides: list[str] | None = None,
    *,
    config_path: str | Path | None = None,
    measure_speed: bool = True,
    resume: bool = False,
) -> CompressResult:
    """Compress ``run_dir``'s student per ``compress.*`` (the run's config.yaml, the sections
    of ``config_path``, then ``overrides``); see module. Returns the final model (after QAD
    when there is one); ``resume`` continues an interrupted heal / QAD from its checkpoints."""
    from distill.report import build_report

    run_path = Path(run_dir)
    config = _run_config(run_path, overrides or [], config_path)
    recipe = config.compress
    label = compress_label(recipe)
    if not label:
        raise ConfigError("nothing to do: set --quantize and/or --prune")
    student = load_causal_lm(run_path / "student")
    if recipe.quantize == "int4":
        check_group_size(student, recipe.group_size)
    tokenizer = load_tokenizer(run_path / "student")
    teacher_model = load_teacher(config.teacher)
    vocab_rows = shared_vocab_rows(
        load_teacher_tokenizer(config.teacher),
        tokenizer,
        teacher_model.get_output_embeddings().weight.shape[0],
        student.get_output_embeddings().weight.shape[0],
        teacher_name=teacher_source(config.teacher),
        student_name=str(run_path / "student"),
    )
    teacher = LiveTeacher(teacher_model, vocab_rows)
    train_blocks, heldout = prepare_data(config, tokenizer)
    info: dict[str, Any] = {"source": str(run_path / "student")}

    def checkpoints(phase: str) -> CheckpointPlan:
        directory = run_path / f"checkpoints_{phase}_{label}"
        if not resume:
            shutil.rmtree(directory, ignore_errors=True)
        return CheckpointPlan(directory, config.checkpoint.every, config.checkpoint.keep, resume)

    if recipe.prune > 0:
        apply_pruning(student, recipe.prune, recipe.prune_pattern)
        if recipe.heal_steps:
            heal(
                student,
                teacher,
                train_blocks,
                steps=recipe.heal_steps,
                lr=recipe.heal_lr,
                loss_config=config.loss,
                train_config=config.train,
                seed=config.seed,
                metrics_path=run_path / f"metrics_heal_{label}.jsonl",
                checkpoints=checkpoints("heal"),
            )
        make_permanent(student)
        info |= {
            "prune": recipe.prune,
            "prune_pattern": recipe.prune_pattern,
            "sparsity": sparsity(student),
            "heal_steps": recipe.heal_steps,
        }
    spec = None
    if recipe.quantize != "none":
        spec, plan = quantize_spec(student, train_blocks, recipe, config.seed)
        if plan is not None:
            for line in plan.describe():
                log.info("int8 plan: %s", line)
            info["int8_errors"] = plan.errors
    if spec is not None:
        info |= {
            "quantize": spec.method,
            "group_size": spec.group_size if spec.method == "int4" else None,
        }

    def write_and_score(name: str, extra: dict[str, Any]) -> dict[str, Any]:
        out_dir = run_path / "compressed" / name
        save_model(student, tokenizer, out_dir, quantize=spec, info={**info, **extra})
        metrics = _score(out_dir, name, teacher, heldout, vocab_rows, config, measure_speed)
        metrics = {"params": count_params(student), **metrics, **info, **extra}
        metrics.pop("int8_errors", None)
        _add_to_evaluation(run_path, f"student_{name}", metrics)
        return metrics

    if recipe.qad_steps:
        before = write_and_score(compress_label(recipe, qad=False), {"qad_steps": 0})
        quantization_aware_distill(
            student,
            teacher,
            train_blocks,
            spec,
            steps=recipe.qad_steps,
            lr=recipe.qad_lr,
            loss_config=config.loss,
            train_config=config.train,
            seed=config.seed,
            metrics_path=run_path / f"metrics_qad_{label}.jsonl",
            checkpoints=checkpoints("qad"),
        )
        metrics = write_and_score(
            label, {"qad_steps": recipe.qad_steps, "kl_before_qad": before["kl_to_teacher"]}
        )
    else:
        metrics = write_and_score(label, {})
    if (run_path / "evaluation.json").is_file():
        build_report(run_path)
    return CompressResult(label, run_path / "compressed" / label, metrics)


def _score(
    out_dir: Path,
    name: str,
    teacher: LiveTeacher,
    heldout,
    vocab_rows: int,
    config: RunConfig,
    measure_speed: bool,
) -> dict[str, Any]:
    """Bytes, held-out quality against the teacher and (optionally) batch-1 speed of a model."""
    compressed = load_model(out_dir)
    quality = heldout_quality(
        {name: compressed},
        teacher,
        heldout,
        vocab_rows=vocab_rows,
        batch_size=config.eval.batch_size,
    )[name]
    metrics: dict[str, Any] = {"bytes": model_bytes(out_dir), **quality, "dir": str(out_dir)}
    paths = weight_only_paths(compressed)
    if paths:
        # which engine runs the weight-only layers here (torchao, PyTorch's packed kernels)
        log.info("%s: weight-only layers by path: %s", name, paths)
        metrics["weight_only_paths"] = paths
    if measure_speed and config.eval.speed:
        settings = GenerationSettings(
            prompts=config.eval.gen_prompts,
            new_tokens=config.eval.gen_new_tokens,
            batch_sizes=(1,),
            runs=config.eval.gen_runs,
            threads=config.train.threads,
        )
        speed = measure_generation_in_subprocess(out_dir, settings)
        metrics |= {
            "tokens_per_s": speed["tokens_per_s_batch1"],
            "peak_rss_bytes": speed["peak_rss_bytes"],
            "ttft_s": speed["ttft_s"],
        }
    return metrics


def _add_to_evaluation(run_path: Path, key: str, metrics: dict[str, Any]) -> None:
    evaluation_path = run_path / "evaluation.json"
    if evaluation_path.is_file():
        evaluation = json.loads(evaluation_path.read_text())
        evaluation["models"][key] = metrics
        atomic_write_json(evaluation_path, evaluation)
