"""Teacher vs 15-layer student vs its int8 version: generation speed, size and perplexity.

Teacher: the embedded SmolLM2-135M (30 layers, float32, saved as safetensors so its bytes are
comparable); student: ``--student DIR`` (a trained student, e.g. a default run's
``runs/default/student``), else the untrained first-8 + last-7-layer student built here; int8:
that student as ``distill compress --quantize int8`` writes it with the default ``compress.*``
settings (per-token dynamic int8, outlier channels from calibration blocks). Generation: greedy,
32 new tokens at batch 1 and 8, and time to first token; the three models take turns within each
run (one warm-up run, then the median of ``--runs``), so load changes on this shared machine hit
them alike; each speedup target is the median over runs of the teacher's time over the model's in
the same run. Perplexity: the default corpus' held-out split (16 blocks x 256 tokens).

    python benchmarks/student_speed.py [--runs 5] [--blocks 16] [--student DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from common import paired_ratio, print_table, target, write_results  # noqa: E402

from distill.compress import load_model, model_bytes, save_model  # noqa: E402
from distill.compress.calibrate import quantize_spec  # noqa: E402
from distill.config import (  # noqa: E402
    CompressConfig,
    EvalConfig,
    StudentConfig,  # noqa: E402
    load_config,
)
from distill.evaluate.generation import timed_generate  # noqa: E402
from distill.evaluate.heldout import heldout_quality  # noqa: E402
from distill.models import (  # noqa: E402
    count_params,
    default_teacher_path,
    load_causal_lm,
    load_tokenizer,
)
from distill.pipelines.training_data import prepare_data  # noqa: E402
from distill.student import build_student, select_layers  # noqa: E402
from distill.teacher import LiveTeacher  # noqa: E402

NEW_TOKENS = 32


def interleaved_speed(models: dict, tokenizer, runs: int, threads: int) -> dict[str, dict]:
    """Greedy tokens/s (batch 1, 8) and time to first token, models interleaved run by run.

    All three models live in this one process and take turns within each run, so a change in
    the load of this shared machine hits every model alike and the ratios stay fair; the median
    over runs is reported. (Per-model peak RSS needs a process per model: see ``distill eval``.)
    """
    if threads:
        torch.set_num_threads(threads)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = EvalConfig().gen_prompts
    times: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    settings = {"ttft": (1, 1), "batch1": (1, NEW_TOKENS), "batch8": (8, NEW_TOKENS)}
    with torch.no_grad():
        for run in range(runs + 1):  # run 0 is the warm-up
            for name, model in models.items():
                for key, (batch, new_tokens) in settings.items():
                    batch_prompts = [prompts[(run + i) % len(prompts)] for i in range(batch)]
                    seconds = timed_generate(model, tokenizer, batch_prompts, new_tokens)
                    if run:
                        times[name].setdefault(key, []).append(seconds)
            print(f"run {run}/{runs} done", flush=True)
    return {
        name: {
            "ttft_s": statistics.median(t["ttft"]),
            "tokens_per_s_batch1": NEW_TOKENS / statistics.median(t["batch1"]),
            "tokens_per_s_batch8": 8 * NEW_TOKENS / statistics.median(t["batch8"]),
            "seconds_all": t,
        }
        for name, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--student", help="a trained student directory (else built untrained)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = all cores")
    args = parser.parse_args()

    teacher_path = default_teacher_path()
    tokenizer = load_tokenizer(teacher_path)
    teacher = load_causal_lm(teacher_path).eval()
    if args.student:
        student, student_source = load_causal_lm(args.student).eval(), f"trained: {args.student}"
    else:
        student = build_student(teacher, select_layers(30, StudentConfig())).eval()
        student_source = "untrained: teacher layers 0-7 + 23-29"
    print(f"student: {student_source}", flush=True)
    config = load_config(overrides=[f"eval.max_blocks={args.blocks}"])
    train_blocks, blocks = prepare_data(config, tokenizer)
    spec, _ = quantize_spec(student, train_blocks, CompressConfig(quantize="int8"), config.seed)
    with tempfile.TemporaryDirectory() as scratch:
        dirs = {
            "teacher": save_model(teacher, tokenizer, Path(scratch) / "teacher"),
            "student": save_model(student, tokenizer, Path(scratch) / "student"),
            "student_int8": save_model(student, tokenizer, Path(scratch) / "int8", quantize=spec),
        }
        loaded = {
            "teacher": teacher,
            "student": student,
            "student_int8": load_model(dirs["student_int8"]),
        }
        speed = interleaved_speed(loaded, tokenizer, args.runs, args.threads)
        sizes = {name: model_bytes(d) for name, d in dirs.items()}
        vocab = teacher.config.vocab_size
        quality = heldout_quality(
            {"student": student, "student_int8": loaded["student_int8"]},
            LiveTeacher(teacher, vocab),
            blocks,
            vocab_rows=vocab,
            batch_size=4,
        )
    params = {"teacher": count_params(teacher), "student": count_params(student)}
    params["student_int8"] = params["student"]
    rows = []
    for name in dirs:
        rows.append(
            (
                name,
                f"{params[name] / 1e6:.1f}",
                f"{sizes[name] / 1e6:.1f}",
                f"{quality[name]['perplexity']:.2f}",
                f"{quality[name]['kl_to_teacher']:.3f}",
                f"{speed[name]['tokens_per_s_batch1']:.1f}",
                f"{speed[name]['tokens_per_s_batch8']:.1f}",
                f"{speed[name]['ttft_s'] * 1e3:.0f}",
            )
        )
    print_table(
        rows,
        ("model", "params M", "disk MB", "ppl", "KL", "tok/s b1", "tok/s b8", "TTFT ms"),
    )
    # each model against the teacher run by run (the machine's speed drifts between runs)
    teacher_seconds = speed["teacher"]["seconds_all"]["batch1"]
    student_speedup = paired_ratio(teacher_seconds, speed["student"]["seconds_all"]["batch1"])
    int8_speedup = paired_ratio(teacher_seconds, speed["student_int8"]["seconds_all"]["batch1"])
    targets = [
        target("student_speedup_batch1", student_speedup["median"], 1.8, "higher")
        | {"per_run": student_speedup["per_round"], "spread": student_speedup["spread"]},
        target("int8_speedup_batch1", int8_speedup["median"], 2.5, "higher")
        | {"per_run": int8_speedup["per_round"], "spread": int8_speedup["spread"]},
        target("int8_bytes_ratio", sizes["student_int8"] / sizes["teacher"], 0.30, "lower"),
        target(
            "int8_perplexity_ratio",
            quality["student_int8"]["perplexity"] / quality["student"]["perplexity"],
            1.03,
            "lower",
        ),
    ]
    for t in targets:
        print(
            f"{t['name']}: {t['value']:.3f} (target {t['better']} is better, {t['target']}): "
            f"{'met' if t['met'] else 'MISSED'}"
        )
    path = write_results(
        "student_speed",
        {
            "setup": {
                "student": student_source,
                "new_tokens": 32,
                "runs": args.runs,
                "heldout_blocks": int(blocks.shape[0]),
                "block_size": int(blocks.shape[1]),
                "dtype": "float32",
                "threads": torch.get_num_threads(),
            },
            "models": {
                name: {"params": params[name], "bytes": sizes[name], **quality[name], **speed[name]}
                for name in dirs
            },
            "targets": targets,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
