"""FSDP2 (parallel.strategy=fsdp) on CPU with gloo: 2 processes equal 1, exact resume, a frozen
sharded teacher, a projection beside a sharded student; and the intermediate-layer projection
under data parallelism."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import make_llama
from test_checkpoint import distill_cli, steps_logged, student_weights, tiny_args, torchrun
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from distill.config import IntermediateConfig, LossConfig, ParallelConfig, TrainConfig
from distill.data import BlockBatches
from distill.student import WidthTargets, build_student, measure_importance, prune_width
from distill.student.intermediate import IntermediateDistiller
from distill.teacher import LiveTeacher
from distill.train import CausalLMTask, CheckpointPlan, train
from distill.train.sharding import autocast, mixed_precision_policy

FSDP = ["--set", "parallel.strategy=fsdp"]
VOCAB = 64
PROJECTION = [  # a narrower student: the hidden-state term needs a learned projection
    *("--set", "student.layers=[0,3]", "--set", "student.hidden=24"),
    *("--set", "intermediate.hidden_weight=1.0", "--set", "intermediate.attention_weight=0.5"),
]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_file(run_dir: Path, step: int, name: str):
    return torch.load(run_dir / "checkpoints" / f"step-{step:08d}" / name, weights_only=True)


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, tiny_teacher_dir) -> dict:
    """One run of 1 process x batch 2 and one of 2 fsdp ranks x batch 1, 4 steps each; what
    the tests compare is read here, before the resume test changes the fsdp run."""
    output = tmp_path_factory.mktemp("fsdp")
    single = distill_cli("run", *tiny_args(tiny_teacher_dir, output, "one", steps=4))
    assert single.returncode == 0, single.stderr
    args = tiny_args(tiny_teacher_dir, output, "two", steps=4)
    args += ["--set", "train.batch_size=1", "--set", "checkpoint.keep=3", *FSDP]
    sharded = torchrun("run", *args)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    return {
        "run_dir": output / "two",
        **{
            name: {
                "weights": student_weights(output / name),
                "records": records(output / name),
                "optimizer": checkpoint_file(output / name, 4, "optimizer.pt"),
            }
            for name in ("one", "two")
        },
    }


def test_fsdp_two_processes_equal_one_process(sharded_runs):
    """2 gloo ranks x batch 1, sharded, == 1 process x batch 2: weights, optimizer moments and
    the global gradient norm to 1e-5 (float32 summation order, as in the DDP test); the
    checkpoint has the unsharded format; the student directory is a plain Hugging Face model."""
    one, two = sharded_runs["one"], sharded_runs["two"]
    assert one["weights"].keys() == two["weights"].keys()
    for name, value in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], value, rtol=1e-5, atol=1e-5, msg=name)
    for a, b in zip(one["records"], two["records"], strict=True):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)  # all shards' norm
        # The KL is a sum of O(1) terms that nearly cancel on these tiny models (loss ~1e-3),
        # so float32 summation order moves it by an absolute amount, a few float32 ulps of an
        # O(1) term (1.2e-7 each; 1.15e-7 seen on an AVX-512 CPU), not a relative one.
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=5e-7)
    # The student's parameters only (no teacher state), indexed as an unsharded optimizer's.
    assert two["optimizer"]["param_groups"] == one["optimizer"]["param_groups"]
    assert two["optimizer"]["state"].keys() == one["optimizer"]["state"].keys()
    for index, state in one["optimizer"]["state"].items():
        for key, value in state.items():
            moment = two["optimizer"]["state"][index][key]
            torch.testing.assert_close(moment, value, rtol=1e-4, atol=1e-9)
    reloaded = AutoModelForCausalLM.from_pretrained(sharded_runs["run_dir"] / "student")
    assert not any(isinstance(p, DTensor) for p in reloaded.parameters())


def test_fsdp_resume_is_bit_identical(sharded_runs):
    """The fsdp run, as if killed after step 2, resumed under fsdp: the same final weights."""
    run_dir = sharded_runs["run_dir"]
    for late in ("step-00000003", "step-00000004"):
        shutil.rmtree(run_dir / "checkpoints" / late)
    resumed = torchrun("run", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert steps_logged(run_dir / "metrics.jsonl") == [1, 2, 3, 4]
    again, before = student_weights(run_dir), sharded_runs["two"]["weights"]
    assert again.keys() == before.keys()
    for name in before:
        assert torch.equal(again[name], before[name]), name


def test_projection_gradients_are_summed_over_ranks(tmp_path, tiny_teacher_dir):
    """With an intermediate-layer projection, 2 data-parallel ranks == 1 process: the
    projection's gradients are summed over ranks too (unsummed, it drifts by ~1e-2 here)."""
    single = distill_cli("run", *tiny_args(tiny_teacher_dir, tmp_path, "one", steps=4), *PROJECTION)
    assert single.returncode == 0, single.stderr
    args = tiny_args(tiny_teacher_dir, tmp_path, "two", steps=4)
    double = torchrun("run", *args, *PROJECTION, "--set", "train.batch_size=1")
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = student_weights(tmp_path / "one"), student_weights(tmp_path / "two")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-5, msg=key)
    projection = checkpoint_file(tmp_path / "one", 4, "trainer.pt")["extra"]["projection.weight"]
    saved = checkpoint_file(tmp_path / "two", 4, "trainer.pt")["extra"]["projection.weight"]
    torch.testing.assert_close(saved, projection, rtol=1e-5, atol=1e-6)
    assert all(r["hidden_loss"] > 0 for r in records(tmp_path / "two"))


@pytest.fixture
def process_group():
    """A one-rank gloo group in this process, so FSDP shards (over one rank)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sharded_teacher_is_frozen_and_gets_no_optimizer_state(tmp_path, process_group):
    """One rank under fsdp: the teacher's parameters are sharded DTensors without gradients,
    the optimizer holds the student's parameters only, and the result equals unsharded
    training bit for bit (a single shard sums nothing)."""
    vocab = VOCAB
    teacher = make_llama(vocab, layers=3, seed=1)
    student = make_llama(vocab, layers=2, seed=2)
    blocks = torch.randint(0, vocab, (16, 12), generator=torch.Generator().manual_seed(3))
    config = TrainConfig(steps=3, batch_size=4, warmup_steps=0, lr=1e-2)
    loss = LossConfig(alpha=0.5)
    plain, sharded = copy.deepcopy(student), copy.deepcopy(student)
    plain_state = train(CausalLMTask(plain, LiveTeacher(copy.deepcopy(teacher)), BlockBatches(blocks, 4, 0), loss, vocab_rows=vocab), config)  # fmt: skip
    live = LiveTeacher(copy.deepcopy(teacher))
    sharded_state = train(CausalLMTask(sharded, live, BlockBatches(blocks, 4, 0), loss, vocab_rows=vocab, parallel=ParallelConfig(strategy="fsdp")), config, checkpoints=CheckpointPlan(tmp_path))  # fmt: skip
    teacher_params = list(live.model.parameters())
    assert all(isinstance(p, DTensor) for p in teacher_params)
    assert all(not p.requires_grad and p.grad is None for p in teacher_params)
    optimizer = torch.load(tmp_path / "step-00000003" / "optimizer.pt", weights_only=True)
    student_params = list(student.parameters())
    assert len(student_params) < len(teacher_params)
    assert sorted(optimizer["state"]) == list(range(len(student_params)))
    in_groups = [p for p in student_params if p.ndim >= 2] + [
        p for p in student_params if p.ndim < 2
    ]
    for index, param in enumerate(in_groups):  # index order: the decay group, then the rest
        assert optimizer["state"][index]["exp_avg"].shape == param.shape
    assert not any(isinstance(p, DTensor) for p in sharded.parameters())  # whole again
    for a, b in zip(plain.parameters(), sharded.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(sharded.lm_head.weight, student.lm_head.weight)
    assert sharded.lm_head.weight is sharded.model.embed_tokens.weight  # still tied
    for a, b in zip(plain_state.history, sharded_state.history, strict=True):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]


def test_mixed_precision_is_bf16_on_gpu_only(caplog):
    gpu = mixed_precision_policy("bf16", torch.device("cuda", 0))
    assert gpu.param_dtype == torch.bfloat16 and gpu.reduce_dtype == torch.float32
    assert mixed_precision_policy("no", torch.device("cuda", 0)).param_dtype is None
    with caplog.at_level(logging.WARNING):
        cpu = mixed_precision_policy("bf16", torch.device("cpu"))
        with autocast("bf16", torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
    assert cpu.param_dtype is None
    assert "float32" in caplog.text


def test_sharded_student_with_a_projection_equals_unsharded(process_group):
    """The projection (plain, replicated) trains beside the sharded student: one global gradient
    norm over DTensor and plain gradients, clipped together, as without sharding (to float32
    rounding: the norm is summed in another order, so weights agree to 1e-5, not bit for bit)."""
    teacher = make_llama(VOCAB, layers=2, seed=1)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    narrow = prune_width(
        build_student(teacher, [0, 1]),
        measure_importance(teacher, ids),
        WidthTargets(hidden=24, heads=2),
    )
    blocks = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(4))
    results = []
    for strategy in ("ddp", "fsdp"):
        student = copy.deepcopy(narrow)
        torch.manual_seed(0)
        config = IntermediateConfig(hidden_weight=1.0)
        distiller = IntermediateDistiller(student, teacher, config, origin=[0, 1])
        state = train(
            CausalLMTask(
                student,
                LiveTeacher(copy.deepcopy(teacher)),
                BlockBatches(blocks, 4, seed=0),
                LossConfig(alpha=0.5),
                vocab_rows=VOCAB,
                extra_terms=distiller,
                parallel=ParallelConfig(strategy=strategy),
            ),
            TrainConfig(steps=3, batch_size=4, warmup_steps=0, lr=1e-2, grad_clip=0.05),
        )
        distiller.remove()
        results.append((student, distiller.projection.weight.detach().clone(), state.history))
    (plain, plain_projection, plain_history), (sharded, projection, history) = results
    assert all(r["grad_norm"] > 0.05 for r in plain_history)  # the clip acted
    for a, b in zip(plain_history, history, strict=True):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6)
        assert b["hidden_loss"] == pytest.approx(a["hidden_loss"], rel=1e-5)
    # Adam divides each gradient by its own root mean square, so an element whose gradient is
    # near float32 noise moves by a visible part of a step (lr 1e-2) when the summation order
    # changes: weights agree to a thousandth of one step (1e-5; 2.3e-6 seen on one element).
    torch.testing.assert_close(projection, plain_projection, rtol=1e-5, atol=1e-5)
    for a, b in zip(plain.parameters(), sharded.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
