"""A served teacher against the cache and the live teacher, on the default teacher and student.

The embedded SmolLM2-135M runs behind ``distill serve-teacher`` (a separate process on loopback,
sharing the machine's cores with the trainer); its 15-layer student is trained ``--steps`` steps
of ``--batch`` x ``--block`` tokens three times on the same batches: from the server, from a
k-cache of the same blocks (float32 log-probabilities, written in the same batches the server
forwards) and from the live teacher. Loss: tail bucket at T = 1 (exact from a server), alpha 0.5.

- ``served_vs_cache_final_loss_rel_diff``: |final loss served - cache| / cache, <= 1e-6 (the
  same SparseTargets, so the same run);
- ``served_step_overhead``: median KD step time from the server / from the cache (each step
  timed alone, teachers alternated, ``--timing-reps`` >= 5 each), <= 1.5.

    python benchmarks/served_teacher.py [--steps 5] [--batch 4] [--block 128] [--timing-reps 5]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from common import print_table, step_timing, target, write_results  # noqa: E402

from distill.config import DataConfig, LossConfig, RunConfig, StudentConfig, TrainConfig  # noqa: E402
from distill.data import BlockBatches  # noqa: E402
from distill.models import default_teacher_path, load_causal_lm, load_tokenizer  # noqa: E402
from distill.pipelines.prepare import prepare_data  # noqa: E402
from distill.student import build_student, select_layers  # noqa: E402
from distill.teacher import CachedTeacher, LiveTeacher, RemoteTeacher  # noqa: E402
from distill.teacher.cache_writer import cache_identity, write_cache  # noqa: E402
from distill.train import CausalLMTask, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(port: int, wait_s: float = 300.0) -> subprocess.Popen:
    """``distill serve-teacher`` on loopback in its own process; returns once /health answers."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "distill.cli", "serve-teacher", "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"distill serve-teacher exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return server
        except OSError:
            time.sleep(1.0)
    server.terminate()
    raise RuntimeError(f"distill serve-teacher did not answer within {wait_s:.0f} s")


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def git_describe() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--timing-reps", type=int, default=5)
    args = parser.parse_args()
    load_before = os.getloadavg()

    config = RunConfig(
        data=DataConfig(block_size=args.block),
        train=TrainConfig(steps=args.steps, batch_size=args.batch),
        loss=LossConfig(temperature=1.0),
    )
    source = default_teacher_path()
    tokenizer = load_tokenizer(source)
    teacher = load_causal_lm(source)
    student = build_student(teacher, select_layers(30, StudentConfig())).train()
    train_blocks, _ = prepare_data(config, tokenizer)
    order = BlockBatches(train_blocks, args.batch, config.seed)
    used = torch.cat([order.next_batch() for _ in range(args.steps)])  # (steps * batch, block)
    vocab = teacher.get_output_embeddings().weight.shape[0]

    root = Path(tempfile.mkdtemp(prefix="distill-served-bench-"))
    identity = cache_identity(source, teacher, tokenizer, used)
    write_cache(
        teacher, used, root / "cache", identity=identity, k=args.k, dtype="float32",
        batch_size=args.batch, temperatures=[1.0],
    )  # fmt: skip
    port = free_port()
    server = start_server(port)
    try:
        remote = RemoteTeacher(
            f"http://127.0.0.1:{port}", vocab_rows=vocab, top_k=args.k,
            rows_per_request=args.batch, concurrency=1, timeout_s=300.0,
        )  # fmt: skip
        remote.check_server(teacher_rows=vocab, tokens=len(tokenizer))
        teachers = {
            "served": remote,
            "cache": CachedTeacher(root / "cache"),
            "live": LiveTeacher(teacher),
        }
        histories = {}
        for name, run_teacher in teachers.items():
            torch.manual_seed(config.seed)
            state = train(
                CausalLMTask(
                    copy.deepcopy(student),
                    run_teacher,
                    BlockBatches(train_blocks, args.batch, config.seed),
                    config.loss,
                    vocab_rows=vocab,
                ),
                config.train,
                description=name,
            )
            histories[name] = state.history
        timing = step_timing(
            student,
            teachers,
            used[: args.batch],
            args.timing_reps,
            vocab,
            LossConfig(temperature=1.0),
        )
        remote.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)

    final = {name: history[-1]["loss"] for name, history in histories.items()}
    rel_diff = abs(final["served"] - final["cache"]) / abs(final["cache"])
    stats = {name: spread(values) for name, values in timing.items()}
    overhead = stats["served"]["median"] / stats["cache"]["median"]
    print_table(
        [(n, f"{final[n]:.6f}", f"{stats[n]['median']:.3f}", f"{stats[n]['min']:.3f}") for n in final],
        ("teacher", "final loss", "step s (median)", "step s (min)"),
    )  # fmt: skip
    print(f"\nserved vs cache final loss rel diff {rel_diff:.2e}; served/cache step {overhead:.2f}")
    path = write_results(
        "served_teacher",
        {
            "setup": {
                "teacher": "SmolLM2-135M-Instruct (30 layers) behind distill serve-teacher",
                "student_layers": 15,
                "steps": args.steps,
                "batch": args.batch,
                "block": args.block,
                "k": args.k,
                "loss": config.loss.model_dump(),
                "cache_dtype": "float32",
                "server": "separate process on 127.0.0.1, same cores as the trainer",
            },
            "git": git_describe(),
            "argv": sys.argv,
            "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "loss_history": {n: [r["loss"] for r in h] for n, h in histories.items()},
            "final_loss": final,
            "step_seconds_alternated": timing,
            "step_seconds": stats,
            "targets": [
                target("served_vs_cache_final_loss_rel_diff", rel_diff, 1e-6, "lower"),
                target("served_step_overhead", overhead, 1.5, "lower"),
            ],
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
