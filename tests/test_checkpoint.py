"""Checkpoint/resume and multi-process training on tiny models (CLI subprocesses)."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import free_port, make_llama
from safetensors.torch import load_file

from distill.config import TrainConfig
from distill.data.examples import encode_examples
from distill.losses import IGNORE_INDEX
from distill.train.checkpoint import latest_checkpoint, save_checkpoint
from distill.train.optim import build_optimizer


def tiny_args(teacher_dir: Path, output_dir: Path, name: str, steps: int = 24) -> list[str]:
    settings = {
        "name": name,
        "output_dir": output_dir,
        "teacher.path": teacher_dir,
        "student.keep_first": 1,
        "student.keep_last": 1,
        "data.block_size": 32,
        "train.steps": steps,
        "train.batch_size": 2,
        "train.warmup_steps": 2,
        "train.threads": 1,
        "train.device": "cpu",
        "train.lr": 3e-3,
        "checkpoint.every": 1,
        "eval.max_blocks": 2,
        "eval.batch_size": 2,
        "eval.speed": "false",
    }
    args = []
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args


def distill_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "distill", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        **kwargs,
    )


def steps_logged(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]


def student_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "student" / "model.safetensors")


def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_teacher_dir):
    reference = distill_cli("run", *tiny_args(tiny_teacher_dir, tmp_path, "straight"))
    assert reference.returncode == 0, reference.stderr

    kill_after = random.Random(os.getpid()).randint(3, 12)
    args = tiny_args(tiny_teacher_dir, tmp_path, "killed")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "distill", "run", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    while len(steps_logged(metrics)) < kill_after and time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 0 < len(steps_logged(metrics)) < 24

    resumed = distill_cli("run", "--resume", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    assert steps_logged(metrics) == list(range(1, 25))
    straight, killed = student_weights(tmp_path / "straight"), student_weights(tmp_path / "killed")
    assert straight.keys() == killed.keys()
    for name in straight:
        assert torch.equal(straight[name], killed[name]), name
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    reference_losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    ]
    assert losses == reference_losses


def test_resume_with_changed_config_is_refused_unless_forced(tmp_path, tiny_teacher_dir):
    first = distill_cli("run", *tiny_args(tiny_teacher_dir, tmp_path, "run", steps=2))
    assert first.returncode == 0, first.stderr
    refused = distill_cli(
        "run",
        "--resume",
        str(tmp_path / "run"),
        "--set",
        "train.lr=0.1",
        "--set",
        "loss.temperature=3",
    )
    assert refused.returncode == 2
    assert "loss.temperature, train.lr" in refused.stderr
    assert "Traceback" not in refused.stderr
    forced = distill_cli(
        "run", "--resume", str(tmp_path / "run"), "--set", "train.steps=3", "--force"
    )
    assert forced.returncode == 0, forced.stderr
    assert steps_logged(tmp_path / "run" / "metrics.jsonl") == [1, 2, 3]


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path, caplog):
    model = make_llama(32, layers=1)
    optimizer, _ = build_optimizer(model, TrainConfig())
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, optimizer, {"history": []}, keep=3)
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    weights = tmp_path / "step-00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert "corrupt" in caplog.text
    (tmp_path / "step-00000001" / "trainer.pt").write_bytes(b"truncated")
    assert latest_checkpoint(tmp_path) is None


def test_keep_prunes_old_checkpoints(tmp_path):
    model = make_llama(32, layers=1)
    optimizer, _ = build_optimizer(model, TrainConfig())
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, model, optimizer, {"history": []}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000004"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``python -m distill ARGS`` under torchrun with 2 CPU (gloo) processes, 1 thread each, on a
    port free at the call (no fixed port: xdist workers run torchrun side by side)."""
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "distill",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_two_processes_equal_one_process(tmp_path, tiny_teacher_dir):
    """2 gloo ranks x batch 1 == 1 process x batch 2 (same global batch), rtol/atol 1e-5.

    The tolerance covers float32 summation order (see test_batch_8x1_equals_batch_2x4).
    """
    single = distill_cli("run", *tiny_args(tiny_teacher_dir, tmp_path, "one", steps=4))
    assert single.returncode == 0, single.stderr
    args = tiny_args(tiny_teacher_dir, tmp_path, "two", steps=4) + ["--set", "train.batch_size=1"]
    double = torchrun("run", *args)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "world size 2" in double.stderr
    one, two = student_weights(tmp_path / "one"), student_weights(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-5, msg=name)
    assert steps_logged(tmp_path / "two" / "metrics.jsonl") == [1, 2, 3, 4]


def _prompt_response_rows(path: Path) -> Path:
    """12 prompt/response rows whose responses are ever longer prefixes of one sentence (1 to 12
    words): every row holds its own number of targets, so the two ranks' rows never do."""
    words = [
        "the",
        "for",
        "statement",
        "repeats",
        "a",
        "block",
        "of",
        "code",
        "once",
        "for",
        "each",
        "item",
        "of",
        "a",
        "sequence",
        "and",
        "then",
        "stops",
    ]
    rows = [
        {
            "prompt": f"Question {index}: how does it go on?",
            "response": " ".join(words[: index + 1]),
        }
        for index in range(12)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_two_processes_equal_one_process_with_unequal_target_counts(
    tmp_path, tiny_teacher_dir, tiny_tokenizer
):
    """2 gloo ranks x batch 1 == 1 process x batch 2 on prompt/response rows where the ranks'
    rows hold different target counts: the normaliser is the count summed over all ranks (a
    per-rank mean would give other weights), rtol/atol 1e-5 as above."""
    data = _prompt_response_rows(tmp_path / "pairs.jsonl")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    examples = encode_examples(rows, "prompt_response", tiny_tokenizer, 64, "pairs.jsonl")
    counts = [int((row != IGNORE_INDEX).sum()) for row in examples.labels]
    assert len(set(counts)) == len(rows), counts  # distinct counts, none cut at the block size
    extra = ["--set", f"data.path={data}", "--set", "data.block_size=64"]
    single = distill_cli("run", *tiny_args(tiny_teacher_dir, tmp_path, "one", steps=4), *extra)
    assert single.returncode == 0, single.stderr
    args = tiny_args(tiny_teacher_dir, tmp_path, "two", steps=4) + ["--set", "train.batch_size=1"]
    double = torchrun("run", *args, *extra)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "world size 2" in double.stderr
    one, two = student_weights(tmp_path / "one"), student_weights(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-5, msg=name)
    assert steps_logged(tmp_path / "two" / "metrics.jsonl") == [1, 2, 3, 4]


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    import numpy as np

    from distill.train.checkpoint import rng_state, set_rng_state

    model = make_llama(32, layers=1)
    optimizer, _ = build_optimizer(model, TrainConfig())
    save_checkpoint(tmp_path, 1, model, optimizer, {"rng": [rng_state()]}, keep=1)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    saved = torch.load(tmp_path / "step-00000001" / "trainer.pt", weights_only=True)
    set_rng_state(saved["rng"][0])
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
