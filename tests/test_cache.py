"""The offline teacher cache: format, exactness, sparse losses, resume, integrity, run checks."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import make_llama, save_model
from hypothesis import given, settings
from hypothesis import strategies as st

import distill.models
import distill.pipelines.run
import distill.pipelines.run_models
from distill.cli import main as cli_main
from distill.config import LossConfig, TrainConfig
from distill.data import BlockBatches, default_documents
from distill.losses import forward_kl
from distill.losses.schedule import loss_settings
from distill.losses.sparse import (
    SparseTargets,
    renormalized_topk_kl,
    sparse_distillation_loss,
    tail_bucket_kl,
)
from distill.models import load_causal_lm
from distill.teacher import CachedTeacher, LiveTeacher
from distill.teacher.cache import MANIFEST, CacheError, inspect_cache, shard_name
from distill.teacher.cache_writer import (
    cache_identity,
    owned_shards,
    rank_and_world,
    shard_ranges,
    write_cache,
)
from distill.train import CausalLMTask, train
from distill.train.causal_lm import micro_batch_terms

# ---------------------------------------------------------------------------- float64 references


def reference_bucket_kl(teacher: torch.Tensor, student: torch.Tensor, k: int, t: float, tail: bool):
    """Row by row from full logits: keep the teacher's top-k ids S; with ``tail`` compare the
    (k + 1)-outcome distributions (S, rest), else both softmaxes renormalised over S. Sum of rows."""
    total = torch.zeros((), dtype=torch.float64)
    for row in range(teacher.shape[0]):
        kept = torch.topk(teacher[row], k).indices
        p = torch.softmax(teacher[row].double() / t, dim=0)
        q = torch.softmax(student[row].double() / t, dim=0)
        p_s, q_s = p[kept], q[kept]
        if tail and k < teacher.shape[1]:
            # the tails summed over the other ids: 1 - sum(kept) loses a tiny tail to cancellation
            rest = torch.ones_like(p, dtype=torch.bool).index_fill(0, kept, False)
            p_s = torch.cat([p_s, p[rest].sum()[None]])
            q_s = torch.cat([q_s, q[rest].sum()[None]])
        elif not tail:
            p_s, q_s = p_s / p_s.sum(), q_s / q_s.sum()
        terms = torch.where(p_s > 0, p_s * (torch.log(p_s) - torch.log(q_s)), 0.0)
        total = total + terms.sum()
    return total


def sparse_from_logits(teacher: torch.Tensor, k: int, temperatures: tuple[float, ...]):
    """What the cache stores for full logits ``[N, V]``, in the logits' dtype."""
    values, ids = torch.topk(teacher, k, dim=-1)
    logprobs_full = torch.log_softmax(teacher, dim=-1)
    lognorm = torch.stack([torch.logsumexp(logprobs_full / t, dim=-1) for t in temperatures], -1)
    return SparseTargets(
        ids, values - torch.logsumexp(teacher, -1, keepdim=True), lognorm, temperatures
    )


# ------------------------------------------------------------------------------ sparse losses


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rows=st.integers(1, 6),
    vocab=st.integers(3, 40),
    k_share=st.floats(0.05, 1.0),
    temperature=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    tail=st.booleans(),
)
def test_sparse_kl_matches_full_logit_reference(seed, rows, vocab, k_share, temperature, tail):
    """Loss and d loss / d student agree with the float64 reference to 1e-10 (all float64)."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 4
    student = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 4
    k = max(1, min(vocab, round(k_share * vocab)))
    targets = sparse_from_logits(teacher, k, (1.0, temperature))
    fast_student = student.clone().requires_grad_(True)
    loss_fn = tail_bucket_kl if tail else renormalized_topk_kl
    fast = loss_fn(fast_student, targets, temperature=temperature)
    fast.backward()
    ref_student = student.clone().requires_grad_(True)
    ref = reference_bucket_kl(teacher, ref_student, k, temperature, tail)
    ref.backward()
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast_student.grad, ref_student.grad, rtol=1e-9, atol=1e-10)


def test_tail_bucket_with_all_tokens_is_the_full_kl():
    generator = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 5, 30, generator=generator, dtype=torch.float64).unbind(0)
    targets = sparse_from_logits(teacher, 30, (1.0, 2.0))
    full = forward_kl(student, teacher, temperature=2.0)
    torch.testing.assert_close(tail_bucket_kl(student, targets, temperature=2.0), full)
    assert (
        tail_bucket_kl(student, sparse_from_logits(teacher, 8, (1.0, 2.0)), temperature=2.0) < full
    )


def test_sparse_loss_masks_and_mixes_like_the_dense_loss():
    """alpha * CE + (1 - alpha) * T^2 * KL over unmasked rows; masked rows change nothing."""
    generator = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(2, 6, 20, generator=generator, dtype=torch.float64).unbind(0)
    labels = torch.tensor([3, -100, 5, 7, -100, 1])
    targets = sparse_from_logits(teacher, 4, (1.0, 2.0))
    terms = sparse_distillation_loss(student, targets, labels, temperature=2.0, alpha=0.3)
    keep = labels != -100
    kl = reference_bucket_kl(teacher[keep], student[keep], 4, 2.0, tail=True)
    ce = F.cross_entropy(student[keep], labels[keep], reduction="sum")
    assert terms.n_tokens == 4
    torch.testing.assert_close(terms.loss_sum, 0.3 * ce + 0.7 * 4.0 * kl, rtol=1e-12, atol=0)


def test_unstored_temperature_is_refused():
    targets = sparse_from_logits(torch.randn(2, 10), 3, (1.0, 2.0))
    with pytest.raises(ValueError, match=r"temperature=3\.0.*\[1\.0, 2\.0\]"):
        tail_bucket_kl(torch.randn(2, 10), targets, temperature=3.0)
    renormalized_topk_kl(torch.randn(2, 10), targets, temperature=3.0)  # needs no normaliser


# ------------------------------------------------------------------------------ writing a cache


@pytest.fixture(scope="module")
def tiny_model(tiny_teacher_dir):
    return load_causal_lm(tiny_teacher_dir)


@pytest.fixture(scope="module")
def blocks(tiny_tokenizer):
    return torch.randint(
        0, len(tiny_tokenizer), (10, 16), generator=torch.Generator().manual_seed(5)
    )


def _write(model, source, tokenizer, blocks, directory, **settings):
    options = {"k": 8, "dtype": "float16", "shard_blocks": 4, "batch_size": 2, **settings}
    identity = cache_identity(source, model, tokenizer, blocks)
    return write_cache(model, blocks, directory, identity=identity, **options)


# Storage tolerance of a log-probability lp: |lp| x unit roundoff (2^-11 fp16, 2^-8 bf16) + slack.
STORAGE_RTOL = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 1e-6}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_cached_topk_equals_torch_topk(
    tmp_path, tiny_model, tiny_teacher_dir, tiny_tokenizer, blocks, dtype
):
    assert _write(tiny_model, tiny_teacher_dir, tiny_tokenizer, blocks, tmp_path, dtype=dtype)
    cached = CachedTeacher(tmp_path).soft_targets(blocks)
    with torch.no_grad():  # same batches of 2 as the writer, so the floats are the same
        logits = torch.cat(
            [tiny_model(input_ids=blocks[i : i + 2]).logits for i in range(0, 10, 2)]
        )
    values, ids = torch.topk(logits, 8, dim=-1)
    assert torch.equal(cached.ids, ids)
    lse = torch.logsumexp(logits, -1, keepdim=True)
    error = (cached.logprobs - (values - lse)).abs()
    assert bool((error <= (values - lse).abs() * STORAGE_RTOL[dtype] + 1e-6).all())
    exact = torch.log_softmax(logits.double(), -1)
    for column, t in enumerate(cached.temperatures):
        torch.testing.assert_close(
            cached.lognorm[..., column], torch.logsumexp(exact / t, -1).float(), atol=2e-6, rtol=0
        )
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["dtypes"]["ids"] == "uint16" and manifest["temperatures"] == [1.0, 2.0]
    assert manifest["complete"] and len(manifest["shards"]) == 3  # 4 + 4 + 2 blocks


def test_ranks_split_the_shards_and_agree_with_one_process(
    tmp_path, tiny_model, tiny_teacher_dir, tiny_tokenizer, blocks, monkeypatch
):
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    for world in (1, 2, 3, 5):
        owned = [owned_shards(7, rank, world) for rank in range(world)]
        assert sorted(sum(owned, [])) == list(range(7))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_and_world() == (1, 2)
    args = (tiny_model, tiny_teacher_dir, tiny_tokenizer, blocks)
    assert _write(*args, tmp_path / "one", rank=0, world_size=1)
    assert not _write(*args, tmp_path / "two", rank=1)  # from the env: shard 1 only
    assert sorted(p.name for p in (tmp_path / "two").glob("shard-*")) == [shard_name(1)]
    assert _write(*args, tmp_path / "two", rank=0)  # the last rank writes the manifest
    for name in [MANIFEST, *(shard_name(i) for i in range(3))]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_other_settings_in_the_same_directory_are_refused(
    tmp_path, tiny_model, tiny_teacher_dir, tiny_tokenizer, blocks
):
    args = (tiny_model, tiny_teacher_dir, tiny_tokenizer, blocks, tmp_path)
    _write(*args, k=8)
    with pytest.raises(CacheError, match=r"another k \(8 there, 4 now\)"):
        _write(*args, k=4)
    with pytest.raises(CacheError, match=r"another data.n_blocks"):
        _write(tiny_model, tiny_teacher_dir, tiny_tokenizer, blocks[:6], tmp_path)
    with pytest.raises(CacheError, match="holds no block starting with"):
        CachedTeacher(tmp_path).soft_targets((blocks[:1] + 1) % len(tiny_tokenizer))


def test_flipped_byte_is_detected(
    tmp_path, tiny_model, tiny_teacher_dir, tiny_tokenizer, blocks, capsys
):
    _write(tiny_model, tiny_teacher_dir, tiny_tokenizer, blocks, tmp_path)
    assert inspect_cache(tmp_path, write=lambda line: None) == 3
    shard = tmp_path / shard_name(1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["cache", "--inspect", str(tmp_path)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert '"k": 8' in captured.out  # the manifest was printed first
    assert f"shard {shard_name(1)} fails its sha256" in captured.err
    with pytest.raises(CacheError, match=shard_name(1)):
        CachedTeacher(tmp_path)


_WRITER = """
import sys, time, torch
from transformers import AutoTokenizer
from distill.models import load_causal_lm
from distill.teacher.cache_writer import cache_identity, write_cache

def main(teacher_dir, out, slow):
    torch.set_num_threads(1)  # the same kernels in every process, so the same floats
    model = load_causal_lm(teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    blocks = torch.randint(0, len(tokenizer), (16, 16), generator=torch.Generator().manual_seed(0))
    if slow:
        forward = model.forward
        def slow_forward(*args, **kwargs):
            time.sleep(0.1)
            return forward(*args, **kwargs)
        model.forward = slow_forward
    identity = cache_identity(teacher_dir, model, tokenizer, blocks)
    write_cache(model, blocks, out, identity=identity, k=8, dtype="float16", shard_blocks=2,
                batch_size=1, rank=0, world_size=1)

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "1")
"""


def _write_in_process(teacher_dir: Path, out: Path) -> None:
    namespace: dict = {"__name__": "writer"}
    exec(compile(_WRITER, "writer", "exec"), namespace)
    threads = torch.get_num_threads()
    try:
        namespace["main"](str(teacher_dir), str(out), False)
    finally:
        torch.set_num_threads(threads)


def test_sigkill_then_resume_gives_identical_bytes(tmp_path, tiny_teacher_dir):
    """Killed mid-run (SIGKILL), a rerun keeps the finished shards and ends byte-identical."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    killed = subprocess.Popen(
        [sys.executable, str(script), str(tiny_teacher_dir), str(resumed), "1"],
        env={**os.environ, "TQDM_DISABLE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _write_in_process(tiny_teacher_dir, whole)  # uninterrupted, while the child starts up
    deadline = time.monotonic() + 180
    while len(list(resumed.glob("shard-*.safetensors"))) < 2:
        assert killed.poll() is None, killed.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(random.Random(0).uniform(0.0, 0.2))
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    survivors = {p.name: p.stat().st_ino for p in resumed.glob("shard-*.safetensors")}
    assert 2 <= len(survivors) < 8, "the kill should land mid-run"
    assert not json.loads((resumed / MANIFEST).read_text())["complete"]
    _write_in_process(tiny_teacher_dir, resumed)  # the rerun
    names = sorted(p.name for p in whole.iterdir())
    assert names == sorted(p.name for p in resumed.iterdir())  # no temp file left behind
    assert len(names) == 9
    for name in names:
        assert (whole / name).read_bytes() == (resumed / name).read_bytes(), name
    for name, inode in survivors.items():  # finished shards were skipped, not rewritten
        assert (resumed / name).stat().st_ino == inode


# ------------------------------------------------------------------------- training from a cache


def _kl(model, teacher, blocks) -> float:
    with torch.no_grad():
        terms = micro_batch_terms(model, teacher, blocks, loss_settings(LossConfig(alpha=0.0)), 64)
    return float(terms.kl_sum) / terms.n_tokens


def test_cache_with_all_tokens_trains_like_the_live_teacher(tmp_path, tiny_tokenizer):
    """k = V in float32: the tail-bucket loss is the full KL, so the steps match the live teacher.

    Tolerance: cached log-probs differ from the live log_softmax by float32 rounding (~1e-7), which
    Adam (dividing by sqrt(v) + eps) magnifies in near-zero gradients to a few 1e-3 x lr; so
    losses agree to rtol 1e-5 and weights to atol 1e-5 = 1e-2 x lr (lr 1e-3).
    """
    teacher_model = make_llama(64, layers=3, seed=1)
    student = make_llama(64, layers=2, seed=2)
    blocks = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(3))
    source = save_model(teacher_model, tiny_tokenizer, tmp_path / "teacher")
    identity = cache_identity(source, teacher_model, tiny_tokenizer, blocks)
    write_cache(teacher_model, blocks, tmp_path / "c", identity=identity, k=64, dtype="float32")
    students = {}
    for name, teacher in (
        ("live", LiveTeacher(teacher_model)),
        ("cache", CachedTeacher(tmp_path / "c")),
    ):
        students[name] = copy.deepcopy(student)
        state = train(
            CausalLMTask(
                students[name],
                teacher,
                BlockBatches(blocks, 4, seed=0),
                LossConfig(temperature=2.0, alpha=0.5),
                vocab_rows=64,
            ),
            TrainConfig(steps=3, batch_size=4, warmup_steps=0, lr=1e-3),
        )
        students[f"{name}_losses"] = [r["loss"] for r in state.history]
    assert students["live_losses"] == pytest.approx(students["cache_losses"], rel=1e-5)
    for param_live, param_cache in zip(
        students["live"].parameters(), students["cache"].parameters(), strict=True
    ):
        torch.testing.assert_close(param_live, param_cache, rtol=1e-5, atol=1e-5)


def test_one_cache_trains_students_of_different_depths(tmp_path, tiny_tokenizer):
    teacher_model = make_llama(64, layers=3, seed=1)
    blocks = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(3))
    source = save_model(teacher_model, tiny_tokenizer, tmp_path / "teacher")
    identity = cache_identity(source, teacher_model, tiny_tokenizer, blocks)
    write_cache(teacher_model, blocks, tmp_path / "c", identity=identity, k=8)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").iterdir()}
    live = LiveTeacher(teacher_model)
    for layers in (1, 2):
        student = make_llama(64, layers=layers, seed=layers)
        start_kl = _kl(student, live, blocks)
        train(
            CausalLMTask(
                student,
                CachedTeacher(tmp_path / "c"),
                BlockBatches(blocks, 4, seed=0),
                LossConfig(alpha=0.0, sparse="tail_bucket"),
                vocab_rows=64,
            ),
            TrainConfig(steps=10, batch_size=4, warmup_steps=0, lr=3e-3),
        )
        assert _kl(student, live, blocks) < 0.8 * start_kl, layers
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").iterdir()}


@pytest.fixture(scope="module")
def written_cache(tmp_path_factory, tiny_teacher_dir) -> dict:
    """A tiny end-to-end config on a small text file, and its cache written by `distill cache`."""
    root = tmp_path_factory.mktemp("cached_run")
    data = root / "docs.txt"
    data.write_text("\n\n".join(doc[:1200] for doc in default_documents()[:24]))
    config = {
        "name": "tiny",
        "teacher": {"path": str(tiny_teacher_dir), "cache": str(root / "cache")},
        "student": {"keep_first": 1, "keep_last": 1},
        "data": {"block_size": 32, "path": str(data)},
        "cache": {"k": 16, "shard_blocks": 16},
        "train": {"steps": 3, "batch_size": 2, "warmup_steps": 1, "threads": 1, "device": "cpu"},
        "eval": {"max_blocks": 4, "batch_size": 2, "speed": False},
    }
    _cli(config, root / "cache.yaml", "cache")
    return config


@pytest.fixture
def cache_config(written_cache, tmp_path) -> dict:
    return {**copy.deepcopy(written_cache), "output_dir": str(tmp_path / "runs")}


def _cli(config: dict, path: Path, *command: str) -> None:
    path.write_text(yaml.safe_dump(config))
    cli_main([*command, "--config", str(path)])


def test_distill_run_trains_from_the_cache_without_the_teacher(
    cache_config, tmp_path, tiny_tokenizer, monkeypatch, capsys
):
    cli_main(["cache", "--inspect", cache_config["teacher"]["cache"]])
    assert "ok: all" in capsys.readouterr().out
    student_dir = save_model(
        make_llama(len(tiny_tokenizer), layers=2, seed=4), tiny_tokenizer, tmp_path / "s"
    )
    config = {**cache_config, "student": {"path": str(student_dir)}}
    events = []
    real_load, real_train = distill.models.load_causal_lm, distill.pipelines.run.train

    def load(path, *args, **kwargs):
        events.append(("load", Path(path).name))
        return real_load(path, *args, **kwargs)

    def traced_train(task, *args, **kwargs):
        events.append(("train", type(task.teacher).__name__))
        return real_train(task, *args, **kwargs)

    for module in (distill.models, distill.pipelines.run_models):  # the teacher / student loads
        monkeypatch.setattr(module, "load_causal_lm", load)
    monkeypatch.setattr(distill.pipelines.run, "train", traced_train)
    report = distill.distill(config).report
    teacher_name = Path(cache_config["teacher"]["path"]).name
    assert events == [("load", "s"), ("train", "CachedTeacher"), ("load", teacher_name)]
    assert report["models"]["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-9)
    run_dir = Path(config["output_dir"]) / "tiny"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    # the same first step with the live teacher: merging the outcomes outside the top-k into one
    # bucket can only lower a KL (data processing); on these near-uniform tiny models it does
    # lower it (k=16 of the vocabulary), so the two are not the same number either
    monkeypatch.undo()
    live_config = copy.deepcopy(config)
    live_config["teacher"].pop("cache")
    live_config["name"] = "live"
    distill.distill(live_config)
    live = json.loads(
        (Path(config["output_dir"]) / "live" / "metrics.jsonl").read_text().split("\n")[0]
    )
    assert 0 < records[0]["divergence"] < live["divergence"]
    # the plan warns when the cached top k is renormalised with no labels, not otherwise
    assert "sparse_loss_warning" not in report["plan"]
    renormalized = copy.deepcopy(config)
    renormalized["name"] = "renormalized"
    renormalized["loss"] = {**renormalized.get("loss", {}), "alpha": 0.0, "sparse": "renormalized"}
    renormalized["train"] = {**renormalized["train"], "steps": 1}
    plan = distill.distill(renormalized).report["plan"]
    assert "loss.sparse=renormalized with loss.alpha=0" in plan["sparse_loss_warning"]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"data": {"block_size": 16}}, "data.block_size is 32 in the cache, 16 for the run"),
        ({"loss": {"temperature": 3.0}}, "not loss.temperature=3.0"),
        ({"data": {"heldout_fraction": 0.3}}, "data.n_blocks"),
        ({"loss": {"divergence": "reverse_kl"}}, "supports forward_kl"),
        (
            {"loss": {"temperature_schedule": "linear", "temperature_end": 1.0}},
            "use loss.sparse=renormalized",
        ),
    ],
)
def test_mismatched_cache_is_refused_with_one_line(
    cache_config, tmp_path, override, needle, capsys
):
    config = copy.deepcopy(cache_config)
    for section, values in override.items():
        config[section] = {**config.get(section, {}), **values}
    with pytest.raises(SystemExit) as exit_info:
        _cli(config, tmp_path / "run.yaml", "run")
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distill:")]
    assert len(errors) == 1 and needle in errors[0], errors
    assert not (Path(config["output_dir"]) / "tiny" / "metrics.jsonl").exists()
