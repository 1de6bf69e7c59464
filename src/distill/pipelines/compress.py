"""``distill compress RUN_DIR``: prune (then heal) and/or quantize a run's student, evaluate it.

Order: load ``RUN_DIR/student`` -> prune the decoder Linears (masks kept) -> heal by distilling
from the run's teacher on the run's training blocks -> bake the masks in -> quantize -> save to
``RUN_DIR/compressed/<label>/`` -> score it on the run's held-out blocks (with the teacher) and
time it -> add it to ``evaluation.json`` as ``student_<label>`` -> rebuild the report.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.compress.heal import heal
from distill.compress.prune import apply_pruning, make_permanent, sparsity
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
from distill.pipelines.prepare import prepare_data
from distill.teacher import LiveTeacher

__all__ = ["CompressResult", "compress_label", "compress_run"]

log = logging.getLogger(__name__)


@dataclass
class CompressResult:
    label: str
    model_dir: Path
    metrics: dict[str, Any]


def compress_label(config: CompressConfig) -> str:
    """A short name for the recipe, e.g. ``pruned30_healed100_int8``."""
    parts = []
    if config.prune > 0:
        parts.append("pruned2of4" if config.prune_pattern == "2:4" else f"pruned{config.prune:.0%}")
        if config.heal_steps:
            parts.append(f"healed{config.heal_steps}")
    if config.quantize != "none":
        parts.append(config.quantize.replace("-", "_"))
    return "_".join(parts).replace("%", "")


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
) -> CompressResult:
    """Compress ``run_dir``'s student per ``compress.*`` (the run's config.yaml, the sections
    of ``config_path``, then ``overrides``); see module."""
    from distill.report import build_report

    run_path = Path(run_dir)
    config = _run_config(run_path, overrides or [], config_path)
    recipe = config.compress
    label = compress_label(recipe)
    if not label:
        raise ConfigError("nothing to do: set --quantize and/or --prune")
    student = load_causal_lm(run_path / "student")
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
    out_dir = run_path / "compressed" / label
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
            )
        make_permanent(student)
        info |= {
            "prune": recipe.prune,
            "prune_pattern": recipe.prune_pattern,
            "sparsity": sparsity(student),
            "heal_steps": recipe.heal_steps,
        }
    quantize = None if recipe.quantize == "none" else recipe.quantize
    save_model(student, tokenizer, out_dir, quantize=quantize, info=info)
    compressed = load_model(out_dir)
    quality = heldout_quality(
        {label: compressed},
        teacher,
        heldout,
        vocab_rows=vocab_rows,
        batch_size=config.eval.batch_size,
    )[label]
    metrics: dict[str, Any] = {
        "params": count_params(student),
        "bytes": model_bytes(out_dir),
        **quality,
        **info,
        "dir": str(out_dir),
    }
    if measure_speed and config.eval.speed:
        settings = GenerationSettings(
            prompts=config.eval.gen_prompts,
            new_tokens=config.eval.gen_new_tokens,
            batch_sizes=(1,),
            threads=config.train.threads,
        )
        speed = measure_generation_in_subprocess(out_dir, settings)
        metrics |= {
            "tokens_per_s": speed["tokens_per_s_batch1"],
            "peak_rss_bytes": speed["peak_rss_bytes"],
            "ttft_s": speed["ttft_s"],
        }
    evaluation_path = run_path / "evaluation.json"
    if evaluation_path.is_file():
        evaluation = json.loads(evaluation_path.read_text())
        evaluation["models"][f"student_{label}"] = metrics
        atomic_write_json(evaluation_path, evaluation)
        build_report(run_path)
    return CompressResult(label, out_dir, metrics)
