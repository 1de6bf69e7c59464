"""``distill.distill(config)``: the one path from a config to a trained, evaluated student.

Phases: resolve config -> load teacher and student -> pack data (routed per teacher with
``teachers:``) -> open the teachers -> plan (warm-up step) -> distil (and, with ``baseline``,
train a labels-only twin) -> save the student -> evaluate every model on the held-out blocks ->
measure speed and memory -> write the report.
The CLI's ``distill run`` calls exactly this function.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedModel

from distill.compress.store import model_bytes
from distill.config import (
    RunConfig,
    check_trainable,
    load_config,
    renormalized_top_k_without_labels,
)
from distill.data import (
    BlockBatches,
    ExampleBatches,
    Examples,
    check_data_source,
    read_documents,
)
from distill.data.extra import extra_blocks, extra_sources, spread
from distill.data.prose import with_default_prose
from distill.data.sources import WeightedBatches, WeightedExampleBatches, passes_per_source
from distill.errors import ConfigError
from distill.evaluate import heldout_metrics
from distill.evaluate.bits_per_byte import (
    bits_per_byte,
    text_pieces,
)
from distill.evaluate.fidelity import FidelityProbe, block_prompts, sample_fidelity
from distill.evaluate.generation import GenerationSettings, measure_generation_in_subprocess
from distill.io import atomic_directory, atomic_write_json, atomic_write_text
from distill.models import (
    count_params,
    load_teacher,
)
from distill.pipelines.run_models import Models, prepare_models
from distill.pipelines.run_teachers import prepare_teachers
from distill.pipelines.training_data import prepare_training_data, split_texts
from distill.report import build_report
from distill.student.intermediate import IntermediateDistiller, is_enabled
from distill.teacher import LiveTeacher, TeacherSet
from distill.teacher.cache import open_run_cache, read_manifest
from distill.teacher.routed import check_resume_teachers
from distill.train import CausalLMTask, CheckpointPlan, train
from distill.train.distributed import init_distributed, resolve_device
from distill.train.onpolicy import OnPolicy
from distill.train.task import refuse_torchrun

__all__ = ["distill", "resume_config", "RunResult"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    report: dict[str, Any]
    student: PreTrainedModel  # the distilled student, in memory (also saved in run_dir/student)


# More passes over the training blocks than this and the plan warns that the student may fit
# the data rather than the teacher (memorisation; see evaluate/fidelity.py).
MANY_EPOCHS = 4.0


def _print_plan(
    config: RunConfig,
    models: Models,
    warmup: dict[str, float],
    n_train_blocks: int,
    device: torch.device,
    world_size: int = 1,
    teachers: TeacherSet | None = None,
    round_trips: dict[str, float] | None = None,
    source_rows: list[int] | None = None,
) -> dict:
    """Print the run's plan (what it will cost and repeat) and return it for the report.
    ``source_rows``: each of ``data.sources``' training rows, whose passes are counted by weight."""
    train_cfg = config.train
    tokens_per_step = train_cfg.batch_size * config.data.block_size * train_cfg.grad_accum
    step_seconds = warmup["micro_batch_seconds"] * train_cfg.grad_accum
    student_params = count_params(models.student)
    optimizer_bytes = 2 * student_params * 4  # AdamW's two float32 moments, created at step 1
    runs = 2 if config.baseline else 1
    if models.teacher is not None:
        teacher_params = count_params(models.teacher)
    elif config.teacher.cache:
        teacher_params = read_manifest(config.teacher.cache)["teacher"]["params"]
    else:
        teacher_params = None  # served: the server does not say
    rows_drawn = train_cfg.steps * train_cfg.batch_size * train_cfg.grad_accum * world_size
    epochs, per_source = rows_drawn / max(n_train_blocks, 1), None
    repeated = f"its {n_train_blocks} training blocks"
    if source_rows and config.data.sources:  # the most repeated source decides memorisation
        weights = [source.weight for source in config.data.sources]
        per_source = passes_per_source(rows_drawn, source_rows, weights)
        most = max(range(len(per_source)), key=per_source.__getitem__)
        epochs = per_source[most]
        repeated = f"the {source_rows[most]} training blocks of data.sources[{most}]"
    plan = {
        "device": str(device),
        "teacher_params": teacher_params,
        "student_params": student_params,
        "tokens_per_step": tokens_per_step,
        "train_blocks": n_train_blocks,
        "epochs": epochs,
        "epochs_per_source": per_source,
        "train_blocks_per_source": source_rows if per_source else None,
        "student_layers": models.layers,
        "step_seconds_measured": step_seconds,
        "estimated_peak_rss_bytes": warmup["peak_rss_bytes"] + optimizer_bytes,
        "estimated_train_seconds": runs
        * min(step_seconds * train_cfg.steps, train_cfg.max_seconds or float("inf")),
    }
    remote = models.remote
    if teachers is not None:
        where = _describe_teachers(plan, models, teachers, round_trips or {})
    elif remote is not None:
        plan["teacher_round_trip_seconds"] = remote.last_seconds
        where = (
            f"  teacher {models.teacher_source}, served at {remote.url} ({remote.api}, model "
            f"{remote.model}, top {remote.top_k}); warm-up batch round trip "
            f"{remote.last_seconds or 0.0:.2f} s"
        )
    else:
        where = f"  teacher {plan['teacher_params']:,} params ({models.teacher_source})" + (
            f", from the cache {config.teacher.cache}" if config.teacher.cache else ""
        )
    lines = [
        "plan:",
        f"  device {device} (train.device={train_cfg.device})",
        where,
        f"  student {student_params:,} params, {models.student.config.num_hidden_layers} layers"
        + (f" (teacher layers {models.layers})" if models.layers else ""),
        f"  {tokens_per_step} tokens/step = {train_cfg.batch_size} x {config.data.block_size} x "
        f"accumulation {train_cfg.grad_accum}; {n_train_blocks} training blocks",
        f"  measured warm-up: {step_seconds:.2f} s/step, peak RSS "
        f"{warmup['peak_rss_bytes'] / 1e9:.2f} GB + optimizer state {optimizer_bytes / 1e9:.2f} GB"
        f" = ~{plan['estimated_peak_rss_bytes'] / 1e9:.2f} GB",
        f"  {train_cfg.steps} steps x {runs} run(s)"
        + (f" (budget {train_cfg.max_seconds:.0f} s each)" if train_cfg.max_seconds else "")
        + f": ~{plan['estimated_train_seconds'] / 60:.1f} min"
        " of training, plus evaluation",
        f"  {epochs:.1f} passes over the training blocks"
        + (
            f" of the most repeated source (per source: {', '.join(f'{p:.1f}' for p in per_source)})"
            if per_source
            else ""
        ),
    ]
    if epochs > MANY_EPOCHS:
        plan["memorisation_warning"] = (
            f"this run passes over {repeated} {epochs:.1f} times "
            f"(more than {MANY_EPOCHS:.0f}): the student may fit the data rather than the "
            "teacher (memorise the corpus); more data or fewer steps keep it on the teacher"
        )
        lines.append(f"  warning: {plan['memorisation_warning']}")
    sparse_advice = renormalized_top_k_without_labels(config)
    if sparse_advice:
        plan["sparse_loss_warning"] = sparse_advice
        lines.append(f"  warning: {sparse_advice}")
    print("\n".join(lines), flush=True)
    return plan


def _describe_teachers(
    plan: dict, models: Models, teachers: TeacherSet, round_trips: dict[str, float]
) -> str:
    """The plan's lines for ``teachers:``: the reference teacher, then where each teacher lives
    and its measured warm-up round trip (also into ``plan["teachers"]``)."""
    plan["teachers"] = {}
    lines = [f"  tokenizer, student layers and evaluation: {models.teacher_source}"]
    for member in teachers.members:
        seconds = round_trips.get(member.name)
        plan["teachers"][member.name] = {
            "kind": member.kind,
            "where": member.where,
            "round_trip_seconds": seconds,
        }
        default = " (default)" if member.name == teachers.default else ""
        timing = "no warm-up row" if seconds is None else f"{seconds:.2f} s"
        lines.append(
            f"  teacher {member.name}{default}: {member.kind} {member.where}; warm-up batch "
            f"round trip {timing}"
        )
    return "\n".join(lines)


def _warmup_round_trips(
    teachers: TeacherSet, data: Any, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Each teacher's round trip on a warm-up batch of its own rows (its first training rows, up
    to a micro-batch; another teacher's rows would not be in its cache)."""
    inputs = data.train.input_ids if isinstance(data.train, Examples) else data.train  # (n, T)
    rows = {}
    for index in range(len(teachers)):
        own = inputs[data.routes == index][:batch_size]  # (<= b, T)
        if len(own):
            rows[index] = own.to(device)
    return teachers.round_trips(rows)


def _measure_speed(config: RunConfig, model_dirs: dict[str, Path], threads: int) -> dict[str, dict]:
    """Each model timed in a fresh process, exactly as ``distill eval`` times it."""
    settings = GenerationSettings.from_config(config.eval, threads)
    results = {}
    for name, model_dir in model_dirs.items():
        log.info("measuring generation speed and memory of %s", name)
        results[name] = measure_generation_in_subprocess(model_dir, settings)
    return results


def _score_bits_per_byte(
    config: RunConfig,
    all_models: dict[str, PreTrainedModel],
    tokenizers: dict[str, Any],
    quality: dict[str, dict],
    extra_results: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Bits per UTF-8 byte of every model (each with its own tokenizer) on the held-out text,
    into ``quality``; with ``extra_results`` (a cross-tokenizer run, whose token-level numbers
    are absent there) also on each extra held-out set, into its models. Returns what was scored
    (for evaluation.json)."""
    piece_chars = 4 * config.data.block_size
    texts = {"heldout": text_pieces(split_texts(config)[1], config.eval.bpb_bytes, piece_chars)}
    sources = extra_sources(config.eval.extra_data)
    for set_name in extra_results or {}:
        documents = read_documents(sources[set_name], config.data.text_field)
        texts[set_name] = text_pieces(documents, config.eval.bpb_bytes, piece_chars)
    start = time.perf_counter()
    for set_name, pieces in texts.items():
        target = quality if set_name == "heldout" else extra_results[set_name]["models"]
        for name, model in all_models.items():
            log.info("bits per byte: %s on %s", name, set_name)
            scores = bits_per_byte(
                model, tokenizers[name], pieces, batch_size=config.eval.batch_size
            )
            target.setdefault(name, {})["bits_per_byte"] = scores["bits_per_byte"]
            target[name]["bpb_tokens"] = scores["tokens"]
    return {
        "sets": {
            name: sum(len(p.encode("utf-8")) for p in pieces) for name, pieces in texts.items()
        },
        "piece_chars": piece_chars,
        "start_token": "EOS (else BOS)",
        "seconds": time.perf_counter() - start,
    }


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_config(
    run_dir: str | Path,
    config_path: str | Path | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
) -> RunConfig:
    """The config to resume ``run_dir`` with: its saved config.yaml, plus any file/overrides.

    A change to any key is refused (naming the keys) unless ``force``.
    """
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there (not a distill run directory)")
    saved = load_config(saved_path)
    requested = saved
    if config_path is not None or overrides:
        base = saved.model_dump()
        if config_path is not None:
            base = load_config(config_path).model_dump()
        requested = load_config(overrides=overrides, base=base)
    requested = with_default_prose(requested)  # as the saved config was
    old, new = _flatten(saved.model_dump(mode="json")), _flatten(requested.model_dump(mode="json"))
    changed = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    if changed and not force:
        raise ConfigError(
            f"--resume {run_dir}: config differs from the saved run in {', '.join(changed)}; "
            "pass --force to resume anyway"
        )
    if changed:
        log.warning("resuming with changed keys: %s", ", ".join(changed))
    return requested


def distill(
    config: RunConfig | dict | str | Path,
    overrides: list[str] | None = None,
    *,
    resume: bool = False,
) -> RunResult:
    """Run distillation end to end and return the run directory and its report.

    ``config`` is a :class:`RunConfig`, a dict of sections, or a YAML path; ``overrides`` are
    ``key=value`` strings applied on top. With ``resume``, training continues exactly from the
    newest valid checkpoint in the run directory (see :func:`resume_config`). Under ``torchrun``
    every rank runs this function; rank 0 alone writes files, evaluates and reports.
    """
    if isinstance(config, RunConfig):
        config = load_config(overrides=overrides, base=config.model_dump())
    elif isinstance(config, dict):
        config = load_config(overrides=overrides, base=config)
    else:
        config = load_config(config, overrides)
    config = with_default_prose(config)  # the default corpus: data.sources with the prose
    check_data_source(config)  # before any model loads: a missing or unreadable data file
    check_trainable(config)
    if config.task != "causal_lm":  # encoder runs: one process (refused before any work)
        refuse_torchrun(f"task {config.task}")
    run_dir = config.run_dir
    context = init_distributed(config.parallel.backend, config.train)
    device = resolve_device(config.train, context.local_rank)  # a missing GPU: exit 2, no load
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise ConfigError(
            f"run directory {run_dir} already holds a run: choose another name (--name) or "
            f"continue it with --resume {run_dir}"
        )

    def save_config() -> None:
        if context.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            resolved = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
            atomic_write_text(run_dir / "config.yaml", resolved)

    # A resume with several teachers saves its config once they are checked (a refused resume
    # leaves the run as it was).
    if not (resume and config.teachers is not None):
        save_config()
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(config.seed)
    if config.task != "causal_lm":  # classification / embedding: the encoder path
        from distill.pipelines.encoder_run import run_encoder

        encoder_run = run_encoder(config, resume=resume)
        return RunResult(encoder_run.run_dir, encoder_run.report, encoder_run.student)

    models = prepare_models(config)
    if models.cross_tokenizer:  # a student with its own tokenizer: aligned on bytes
        from distill.pipelines.cross_run import run_cross_tokenizer

        return run_cross_tokenizer(config, models, context, device, resume)
    sharded = config.parallel.strategy == "fsdp" and context.enabled  # placed by the sharding
    if not sharded:
        if models.teacher is not None:
            models.teacher.to(device)
        models.student.to(device)
    data = prepare_training_data(config, models.tokenizer)  # data.sources: weighted parts
    train_blocks, heldout_blocks, source_parts = data.train, data.heldout, data.parts
    examples = isinstance(train_blocks, Examples)
    extra_sets = extra_blocks(
        config.eval.extra_data,
        models.tokenizer,
        config.data.block_size,
        config.eval.max_blocks,
        config.data.text_field,
    )
    onpolicy = None
    if config.onpolicy.lambda_ > 0:  # the schema refuses it with a teacher cache (fixed blocks)
        eos = models.tokenizer.eos_token_id
        pad = models.tokenizer.pad_token_id
        onpolicy = OnPolicy(config.onpolicy, eos, pad if pad is not None else eos or 0, config.seed)
    teacher_set = None
    if config.teachers is not None:  # each named teacher opened and checked (exit 2)
        teacher_set = prepare_teachers(config, models, data, device)
        teacher = teacher_set
    elif config.teacher.cache:  # refuses a cache that does not match this run (exit 2)
        teacher = open_run_cache(
            config,
            teacher_source=models.teacher_source,
            tokenizer=models.tokenizer,
            train_blocks=train_blocks,
            vocab_rows=models.vocab_rows,
        )
    elif models.remote is not None:  # checked against the run in prepare_models
        teacher = models.remote
    else:
        teacher = LiveTeacher(models.teacher, models.vocab_rows)
    # A resume with other teachers than the run trained with is refused (one line).
    manifest = teacher_set.manifest() if teacher_set else None
    check_resume_teachers(run_dir, manifest, resuming=resume, write=context.is_main)
    if resume and config.teachers is not None:
        save_config()
    student_before = copy.deepcopy(models.student).eval()

    plan: dict[str, Any] = {}

    def on_warmup(warmup: dict[str, float]) -> None:
        if context.is_main:
            round_trips = None
            if teacher_set is not None:
                round_trips = _warmup_round_trips(
                    teacher_set, data, config.train.batch_size, device
                )
            plan.update(
                _print_plan(
                    config,
                    models,
                    warmup,
                    len(train_blocks),
                    device,
                    context.world_size,
                    teacher_set,
                    round_trips,
                    [len(part) for part in source_parts] if source_parts is not None else None,
                )
            )

    global_batch = config.train.batch_size * config.train.grad_accum * context.world_size
    if context.is_main:
        log.info(
            "global batch = %d blocks = per-device batch %d x accumulation %d x world size %d",
            global_batch,
            config.train.batch_size,
            config.train.grad_accum,
            context.world_size,
        )

    def checkpoint_plan(folder: str) -> CheckpointPlan:
        every, keep = config.checkpoint.every, config.checkpoint.keep
        return CheckpointPlan(run_dir / folder, every, keep, resume)

    def global_batches() -> BlockBatches:
        size = config.train.batch_size * context.world_size
        if source_parts is not None:
            weights = [source.weight for source in config.data.sources]
            if examples:  # a chat / prompt-response source: every source's rows as examples
                return WeightedExampleBatches(source_parts, weights, size, config.seed)
            return WeightedBatches(source_parts, weights, size, config.seed, data.routes)
        if examples:  # routed by the examples' own teachers
            return ExampleBatches(train_blocks, size, config.seed)
        return BlockBatches(train_blocks, size, config.seed, data.routes)

    probe = None
    every = config.eval.every
    if every and context.is_main:
        if models.teacher is None or sharded:
            log.warning(
                "eval.every: fidelity during training needs the live, unsharded teacher and "
                "student (not teacher.cache / teacher.url / parallel.strategy=fsdp; with "
                "teachers, one of them must be the model of teacher:); skipped"
            )
        else:
            keep = config.eval.every_blocks
            probe_sets = {
                "heldout": (
                    (heldout_blocks.input_ids[:keep], heldout_blocks.labels[:keep])
                    if examples
                    else (heldout_blocks[:keep], None)
                ),
                **{name: (spread(blocks, keep), None) for name, blocks in extra_sets.items()},
            }
            probe = FidelityProbe(
                probe_sets,
                LiveTeacher(models.teacher, models.vocab_rows),
                vocab_rows=models.vocab_rows,
                batch_size=config.eval.batch_size,
            )

    def fidelity_hook(model):
        """``on_step`` for ``train``: rank 0 scores ``model`` every ``eval.every`` steps."""
        if probe is None:
            return None

        def on_step(step: int) -> dict | None:
            if step % every and step != config.train.steps:
                return None
            scores = probe(model)
            return {"eval_s": scores.pop("seconds"), "fidelity": scores}

        return on_step

    distiller = None
    if is_enabled(config.intermediate):  # hooks on the mapped layers; removed after training
        distiller = IntermediateDistiller(
            models.student, models.teacher, config.intermediate, models.layers
        )
    task = CausalLMTask(
        models.student,
        teacher,
        global_batches(),
        config.loss,
        vocab_rows=models.vocab_rows,
        extra_terms=distiller,
        onpolicy=onpolicy,
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
        on_step=fidelity_hook(models.student),
    )
    if distiller is not None:
        distiller.remove()
    if models.remote is not None:
        models.remote.close()
    if teacher_set is not None:  # frees the teachers' models (the evaluation's is models.teacher)
        teacher_set.close()
    compared = {"student_before": student_before, "student_after": models.student}
    if config.baseline:
        labels_only = copy.deepcopy(student_before).train()
        labels_loss = config.loss.labels_only()
        baseline = CausalLMTask(
            labels_only,
            None,
            global_batches(),
            labels_loss,
            vocab_rows=models.vocab_rows,
            parallel=config.parallel,
        )
        train(
            baseline,
            config.train,
            metrics_path=run_dir / "metrics_labels_only.jsonl",
            description="labels only",
            checkpoints=checkpoint_plan("checkpoints_labels_only"),
            context=context,
            on_step=fidelity_hook(labels_only),
        )
        compared["student_labels_only"] = labels_only
    if sharded:  # the teacher is sharded over the ranks: rank 0 loads it whole to evaluate
        models.teacher = None
    if not context.is_main:
        return RunResult(run_dir, {}, models.student)

    with atomic_directory(run_dir / "student") as tmp:
        models.student.save_pretrained(tmp, safe_serialization=True)
        models.tokenizer.save_pretrained(tmp)

    if models.teacher is None:  # trained from a cache or server (or sharded): needed to evaluate
        models.teacher = load_teacher(config.teacher).to(models.student.device)
        teacher = LiveTeacher(models.teacher, models.vocab_rows)
    elif teacher_set is not None:  # several teachers: the evaluation's is the one of teacher:
        teacher = LiveTeacher(models.teacher, models.vocab_rows)
    all_models = {"teacher": models.teacher, **compared}
    quality = heldout_metrics(
        compared,
        teacher,
        heldout_blocks.input_ids if examples else heldout_blocks,
        vocab_rows=models.vocab_rows,
        batch_size=config.eval.batch_size,
        labels=heldout_blocks.labels if examples else None,
    )
    extra_results: dict[str, Any] = {}
    sources = extra_sources(config.eval.extra_data)
    for set_name, blocks in extra_sets.items():
        log.info("evaluating every model on the held-out set %s", set_name)
        extra_results[set_name] = {
            "source": str(sources[set_name]),
            "blocks": int(blocks.shape[0]),
            "tokens": int(blocks.numel()),
            "models": heldout_metrics(
                compared,
                teacher,
                blocks,
                vocab_rows=models.vocab_rows,
                batch_size=config.eval.batch_size,
            ),
        }
    if config.eval.sample_prompts:
        eos = models.tokenizer.eos_token_id
        pad = models.tokenizer.pad_token_id
        pad = pad if pad is not None else (eos if eos is not None else 0)
        if examples:
            chosen = spread(torch.arange(len(heldout_blocks)), config.eval.sample_prompts)
            domain_prompts = [
                heldout_blocks.input_ids[i, : int(heldout_blocks.prompt_lengths[i])].tolist()
                for i in chosen.tolist()
            ]
        else:
            domain_prompts = block_prompts(heldout_blocks, config.eval.sample_prompts)
        prompt_sets = {"heldout": domain_prompts} | {
            name: block_prompts(blocks, config.eval.sample_prompts)
            for name, blocks in extra_sets.items()
        }
        for set_name, prompts in prompt_sets.items():
            log.info("sampling from every model on %s; the teacher scores the samples", set_name)
            nll = sample_fidelity(
                all_models,
                teacher,
                prompts,
                new_tokens=config.eval.sample_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                seed=config.seed,
            )
            target = quality if set_name == "heldout" else extra_results[set_name]["models"]
            for name, value in nll.items():
                target[name]["teacher_nll"] = value
    bpb_settings = None
    if config.eval.bits_per_byte:
        tokenizers = dict.fromkeys(all_models, models.tokenizer)
        bpb_settings = _score_bits_per_byte(config, all_models, tokenizers, quality)
    scratch = run_dir / ".eval_models"
    model_dirs: dict[str, Path] = {"student_after": run_dir / "student"}
    for name, model in all_models.items():
        if name not in model_dirs:
            model.save_pretrained(scratch / name, safe_serialization=True)
            models.tokenizer.save_pretrained(scratch / name)
            model_dirs[name] = scratch / name
    evaluation: dict[str, Any] = {"models": {}, "extra_sets": extra_results, "plan": plan}
    speed = _measure_speed(config, model_dirs, threads) if config.eval.speed else {}
    for name, model in all_models.items():
        evaluation["models"][name] = {
            "params": count_params(model),
            "bytes": model_bytes(model_dirs[name]),
            **quality[name],
            "tokens_per_s": speed.get(name, {}).get("tokens_per_s_batch1"),
            **{key: value for key, value in speed.get(name, {}).items() if key != "threads"},
        }
    shutil.rmtree(scratch, ignore_errors=True)
    if bpb_settings is not None:
        evaluation["bits_per_byte_settings"] = bpb_settings
    evaluation["speed_settings"] = {
        "threads": threads,
        "prompts": len(config.eval.gen_prompts),
        "new_tokens": config.eval.gen_new_tokens,
        "batch_sizes": config.eval.gen_batch_sizes,
        "timed_runs": config.eval.gen_runs,
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
