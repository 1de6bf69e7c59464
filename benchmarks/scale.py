"""Throughput of 1 vs 2 processes at the same global batch, and the cost of a checkpoint.

Both runs train a 15-layer student (the teacher's first 8 + last 7 layers, no search: throughput
is measured, not quality) from the embedded teacher for a few steps with
`distill run` (the 2-process run under torchrun with gloo), global batch 4 x 256 tokens:
1 process x batch 4 x 2 threads against 2 processes x batch 2 x 1 thread each. Tokens/s is the
median over the steps after the first; communication is the gradient all-reduce time per step.
The checkpoint cost is the time to write (and checksum) the student + AdamW state, per GB.

    python benchmarks/scale.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import print_table, target, write_results


def run_distill(output: Path, name: str, processes: int, batch: int, steps: int) -> list[dict]:
    settings = [
        f"name={name}",
        f"output_dir={output}",
        f"train.steps={steps}",
        f"train.batch_size={batch}",
        f"train.threads={2 // processes}",
        "checkpoint.every=0",
        "eval.speed=false",
        "eval.max_blocks=1",
        "eval.every=0",
        "eval.bits_per_byte=false",
        "eval.sample_prompts=0",
        "eval.extra_data=[]",
        "student.search=none",  # a fixed 15-layer student: throughput, not quality, is measured
        "train.warmup_steps=0",
    ]
    args = [arg for item in settings for arg in ("--set", item)]
    launcher = [sys.executable, "-m", "distill", "run"]
    if processes > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(processes),
            "-m",
            "distill",
            "run",
        ]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(2 // processes)}
    subprocess.run(launcher + args, check=True, env=env, stdout=subprocess.DEVNULL)
    lines = (output / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def checkpoint_cost(output: Path) -> dict[str, float]:
    import torch

    from distill.config import StudentConfig, TrainConfig
    from distill.models import default_teacher_path, load_causal_lm
    from distill.student import build_student, select_layers
    from distill.train.checkpoint import save_checkpoint
    from distill.train.optim import build_optimizer

    teacher = load_causal_lm(default_teacher_path())
    student = build_student(teacher, select_layers(30, StudentConfig()))
    optimizer, _ = build_optimizer(student, TrainConfig())
    for param in student.parameters():  # one step so AdamW holds its two moments
        param.grad = torch.zeros_like(param)
    optimizer.step()
    start = time.perf_counter()
    path = save_checkpoint(output / "ckpt", 1, student, optimizer, {"history": []}, keep=1)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in path.iterdir())
    return {"seconds": seconds, "bytes": size, "seconds_per_gb": seconds / (size / 1e9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=6, help="steps per run; the first untimed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp)
        one = run_distill(output, "one", processes=1, batch=4, steps=args.steps)
        two = run_distill(output, "two", processes=2, batch=2, steps=args.steps)
        checkpoint = checkpoint_cost(output)
    rate_one = statistics.median(r["tokens_per_s"] for r in one[1:])
    rate_two = statistics.median(r["tokens_per_s"] for r in two[1:])
    comm_two = statistics.median(r["comm_s"] for r in two[1:])
    step_two = statistics.median(r["tokens"] / r["tokens_per_s"] for r in two[1:])
    print_table(
        [
            ("1 process x 2 threads", f"{rate_one:.0f}", "-"),
            ("2 processes x 1 thread", f"{rate_two:.0f}", f"{comm_two:.2f} s of {step_two:.1f} s"),
        ],
        ("setup (global batch 4 x 256)", "tokens/s", "all-reduce per step"),
    )
    print(
        f"checkpoint: {checkpoint['bytes'] / 1e9:.2f} GB in {checkpoint['seconds']:.1f} s "
        f"= {checkpoint['seconds_per_gb']:.1f} s/GB"
    )
    path = write_results(
        "scale",
        {
            "one_process": one,
            "two_processes": two,
            "tokens_per_s": {"one": rate_one, "two": rate_two},
            "comm_seconds_per_step_two": comm_two,
            "checkpoint": checkpoint,
            "targets": [
                target("two_vs_one_process_throughput", rate_two / rate_one, 0.8, "higher"),
                {
                    "name": "checkpoint_seconds_per_gb",
                    "value": checkpoint["seconds_per_gb"],
                    "target": None,
                    "better": "lower",
                },
            ],
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
