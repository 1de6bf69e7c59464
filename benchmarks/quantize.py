"""Quantized students: int8 (dynamic, activation-aware: the default ``--quantize int8``), int8
weight-only, int4 groups before and after quantization-aware distillation, against the float
student and the teacher.

Teacher: the embedded SmolLM2-135M (float32, saved as safetensors so its bytes compare). Float
student: ``--student DIR`` (a trained student of that teacher), else the first-8 + last-7-layer
student distilled here for ``--train-steps`` steps (the default run's recipe, shortened). Each
quantized student is written by the same library calls ``distill compress`` makes with the
default ``compress.*`` settings, loaded back with ``distill.compress.load_model`` and scored on
the default corpus' held-out blocks (perplexity, KL to the teacher, top-1 agreement); greedy
batch-1 speed is measured for every model in a fresh process with the same prompts and threads,
every model once per round; ``int8_speedup_batch1`` is the median over rounds of the int8
student's tokens/s over the teacher's in the same round.

    python benchmarks/quantize.py [--student DIR] [--train-steps 40] [--qad-steps 60]
        [--blocks 16] [--block-size 128] [--threads 0] [--runs 5] [--speed-threads 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from common import paired_ratio, print_table, target, write_results  # noqa: E402

from distill.compress import QuantizeSpec, load_model, model_bytes, save_model  # noqa: E402
from distill.compress.calibrate import quantize_spec  # noqa: E402
from distill.compress.heal import heal  # noqa: E402
from distill.compress.qad import quantization_aware_distill  # noqa: E402
from distill.config import CompressConfig, EvalConfig, StudentConfig, load_config  # noqa: E402
from distill.evaluate.generation import (  # noqa: E402
    GenerationSettings,
    measure_generation_in_subprocess,
)
from distill.evaluate.heldout import heldout_quality  # noqa: E402
from distill.models import default_teacher_path, load_causal_lm, load_tokenizer  # noqa: E402
from distill.pipelines.training_data import prepare_data  # noqa: E402
from distill.student import build_student, select_layers  # noqa: E402
from distill.teacher import LiveTeacher  # noqa: E402

# other int8 recipes (compress.* overrides of the int8 default): "every64" was the default
# before outlier_threshold (64 float channels in every Linear), "smooth_f4" the one before
# per-token steps and outlier channels
VARIANTS = {
    "every64": {"outlier_threshold": 0.0},
    "every16": {"outlier_threshold": 0.0, "outlier_channels": 16},
    "threshold4": {"outlier_threshold": 4.0},
    "smooth": {"smooth_alpha": 0.5},
    "smooth_f4": {"smooth_alpha": 0.5, "float_layers": 4, "outlier_channels": 0},
}
# timed models (int8_plain and int4 before QAD run the same kernels as their siblings)
TIMED = (
    "teacher",
    "student",
    "student_int8",
    "student_int8_every64",
    "student_int8_weight_only",
    "student_int4_qad",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--student", help="trained float student directory (else trained here)")
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--qad-steps", type=int, default=60)
    parser.add_argument("--blocks", type=int, default=16, help="held-out blocks scored")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4, help="training / QAD blocks per step")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = all cores")
    parser.add_argument(
        "--runs", type=int, default=5, help="interleaved rounds of timed generation per model"
    )
    parser.add_argument(
        "--speed-threads", type=int, default=1, help="torch threads of the timed generations"
    )
    parser.add_argument("--no-speed", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    config = load_config(
        overrides=[
            f"data.block_size={args.block_size}",
            f"eval.max_blocks={args.blocks}",
            f"train.batch_size={args.batch_size}",
            f"train.threads={args.threads}",
        ]
    )
    teacher_path = default_teacher_path()
    tokenizer = load_tokenizer(teacher_path)
    teacher_model = load_causal_lm(teacher_path).eval()
    vocab = teacher_model.config.vocab_size
    teacher = LiveTeacher(teacher_model, vocab)
    train_blocks, heldout = prepare_data(config, tokenizer)
    if args.student:
        student, source = load_causal_lm(args.student).eval(), f"given: {args.student}"
    else:
        student = build_student(teacher_model, select_layers(30, StudentConfig()))
        heal(
            student,
            teacher,
            train_blocks,
            steps=args.train_steps,
            lr=config.train.lr,
            loss_config=config.loss,
            train_config=config.train,
            seed=config.seed,
            description="student",
        )
        source = f"first 8 + last 7 teacher layers, distilled here for {args.train_steps} steps"
    student.eval()
    print(f"student: {source}", flush=True)

    recipe = CompressConfig(quantize="int8")  # the defaults of distill compress --quantize int8
    int8_spec, plan = quantize_spec(student, train_blocks, recipe, config.seed)
    for line in plan.describe(top=8):
        print("int8 plan:", line, flush=True)
    specs = {
        "student_int8": int8_spec,
        "student_int8_plain": QuantizeSpec("int8"),  # per-token steps only
        "student_int8_weight_only": QuantizeSpec("int8-weight-only"),
        "student_int4": QuantizeSpec("int4", recipe.group_size),
    }
    for label, overrides in VARIANTS.items():
        variant = recipe.model_copy(update=overrides)
        variant_spec, _ = quantize_spec(student, train_blocks, variant, config.seed)
        specs[f"student_int8_{label}"] = variant_spec
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        dirs = {
            "teacher": save_model(teacher_model, tokenizer, root / "teacher"),
            "student": save_model(student, tokenizer, root / "student"),
        }
        for name, spec in specs.items():
            dirs[name] = save_model(student, tokenizer, root / name, quantize=spec)
        qad_student = copy.deepcopy(student)
        qad_start = time.perf_counter()
        quantization_aware_distill(
            qad_student,
            teacher,
            train_blocks,
            specs["student_int4"],
            steps=args.qad_steps,
            lr=recipe.qad_lr,
            loss_config=config.loss,
            train_config=config.train,
            seed=config.seed,
        )
        qad_seconds = time.perf_counter() - qad_start
        dirs["student_int4_qad"] = save_model(
            qad_student, tokenizer, root / "int4_qad", quantize=specs["student_int4"]
        )
        models = {name: load_model(d) for name, d in dirs.items() if name != "teacher"}
        quality = heldout_quality(
            models, teacher, heldout, vocab_rows=vocab, batch_size=config.eval.batch_size
        )
        sizes = {name: model_bytes(d) for name, d in dirs.items()}
        speed: dict[str, dict] = {}
        if not args.no_speed:
            settings = GenerationSettings(
                prompts=EvalConfig().gen_prompts,
                new_tokens=32,
                batch_sizes=(1,),
                runs=1,
                threads=args.speed_threads,
            )
            rounds: dict[str, list[dict]] = {name: [] for name in TIMED}
            for round_ in range(args.runs):  # interleaved: every model once per round
                for name in TIMED:  # each in a fresh process
                    rounds[name].append(measure_generation_in_subprocess(dirs[name], settings))
                    rate = rounds[name][-1]["tokens_per_s_batch1"]
                    print(f"round {round_}: {name} {rate:.1f} tok/s", flush=True)
            for name, measured in rounds.items():
                rates = [m["tokens_per_s_batch1"] for m in measured]
                speed[name] = {
                    **measured[-1],
                    "tokens_per_s_batch1": statistics.median(rates),
                    "tokens_per_s_batch1_rounds": rates,
                    "tokens_per_s_batch1_spread": [min(rates), max(rates)],
                }
    b1 = {name: speed.get(name, {}).get("tokens_per_s_batch1", float("nan")) for name in dirs}
    rows = [
        (
            name,
            f"{sizes[name] / 1e6:.1f}",
            f"{quality[name]['perplexity']:.3f}",
            f"{quality[name]['kl_to_teacher']:.4f}",
            f"{quality[name]['top1_agreement']:.3f}",
            f"{b1[name]:.1f}",
        )
        for name in dirs
    ]
    print_table(rows, ("model", "MB", "ppl", "KL", "top-1", "tok/s b1"))
    # the int8 student against the teacher round by round (the machine's speed drifts)
    int8_speedup = (
        paired_ratio(
            speed["student_int8"]["tokens_per_s_batch1_rounds"],
            speed["teacher"]["tokens_per_s_batch1_rounds"],
        )
        if speed
        else {"median": float("nan"), "per_round": [], "spread": []}
    )
    ppl = {name: quality[name]["perplexity"] for name in dirs}
    kl = {name: quality[name]["kl_to_teacher"] for name in dirs}
    targets = [
        target("int8_perplexity_ratio", ppl["student_int8"] / ppl["student"], 1.02, "lower"),
        target(
            "int4_qad_perplexity_ratio", ppl["student_int4_qad"] / ppl["student"], 1.10, "lower"
        ),
        target("qad_gain", kl["student_int4"] / kl["student_int4_qad"], 1.5, "higher"),
        target("int8_speedup_batch1", int8_speedup["median"], 2.5, "higher")
        | {"per_round": int8_speedup["per_round"], "spread": int8_speedup["spread"]},
        target("int4_bytes_ratio", sizes["student_int4_qad"] / sizes["teacher"], 0.15, "lower"),
    ]
    for t in targets:
        print(
            f"{t['name']}: {t['value']:.3f} (target {t['target']}): {'met' if t['met'] else 'MISSED'}"
        )
    path = write_results(
        "quantize",
        {
            "targets": targets,
            "seconds": time.perf_counter() - started,
            "setup": {
                "student": source,
                "qad_steps": args.qad_steps,
                "qad_seconds": qad_seconds,
                "qad_lr": recipe.qad_lr,
                "group_size": recipe.group_size,
                "smooth_alpha": recipe.smooth_alpha,
                "outlier_channels": recipe.outlier_channels,
                "outlier_threshold": recipe.outlier_threshold,
                "int8_variants": VARIANTS,
                "float_layers": dict(plan.keep_float),
                "heldout_blocks": int(heldout.shape[0]),
                "block_size": int(heldout.shape[1]),
                "threads": torch.get_num_threads(),
                "speed": f"greedy, 32 new tokens, batch 1, {args.speed_threads} thread(s), each "
                f"model in a fresh process, {args.runs} interleaved rounds: median and spread",
            },
            "int8_layer_errors": dict(sorted(plan.errors.items(), key=lambda kv: -kv[1])),
            "models": {
                name: {"bytes": sizes[name], **quality[name], **speed.get(name, {})}
                for name in dirs
            },
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
