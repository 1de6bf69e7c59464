"""Token shards (``distill data prepare``, ``data.shards``): the same blocks and split as in-memory
packing, checksums, resume of an interrupted preparation, and training from them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from references import reference_split_by_hash

import distill
import distill.data.shard_writer
import distill.train.loop
from distill.cli import main as cli_main
from distill.config import load_config
from distill.data import BlockBatches, read_documents
from distill.data.corpus import corpus_split, iter_documents, split_by_hash, split_documents
from distill.data.shards import MANIFEST, ShardError, TokenBlocks, open_run_shards
from distill.errors import ConfigError
from distill.pipelines.data_prepare import prepare_shards
from distill.pipelines.run import resume_config
from distill.pipelines.training_data import prepare_training_data


def test_split_matches_the_plain_reference_on_random_items():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(0, 25)
        keys = [str(rng.randint(0, 8)) for _ in range(n)]  # duplicates: ties broken by index
        sizes = [rng.randint(1, 40) for _ in range(n)]
        fraction = rng.choice([0.01, 0.1, 0.3, 0.5, 0.99])
        assert split_by_hash(keys, fraction, sizes) == reference_split_by_hash(
            keys, fraction, sizes
        )
    documents = [f"document {i} " * (i % 7 + 1) for i in range(60)]
    streamed = corpus_split(iter(documents), 0.2, "x")
    _, heldout = split_by_hash(documents, 0.2, [len(d) for d in documents])
    assert streamed.heldout.nonzero()[0].tolist() == heldout


def _corpus(root: Path, n: int = 24) -> Path:
    """A directory of a .txt and a .jsonl file (and a .parquet one when pyarrow is there)."""
    root.mkdir()
    words = ["river", "stone", "apple", "cloud", "lamp", "wheel", "seed", "bridge"]
    paragraphs = [
        " ".join(words[(i * 3 + j) % len(words)] + str(i) for j in range(8 + i % 9))
        for i in range(n)
    ]
    (root / "a.txt").write_text("\n\n".join(paragraphs[: n // 2]) + "\n")
    rows = [{"body": p, "other": 1} for p in paragraphs[n // 2 :]]
    (root / "b.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return root
    table = pa.table({"body": ["parquet row one about lamps", None, "and a second row"]})
    pq.write_table(table, root / "c.parquet", row_group_size=1)
    return root


def test_iter_documents_streams_what_read_documents_reads(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    assert list(iter_documents(corpus, "body")) == read_documents(corpus, "body")
    assert len(read_documents(corpus, "body")) >= 24


def _config(teacher: Path, *overrides: str):
    return load_config(
        None,
        [f"teacher.path={teacher}", "eval.max_blocks=1000", *overrides],
    )


def _prepare(teacher: Path, corpus: Path, out: Path, *overrides: str) -> dict:
    config = _config(
        teacher,
        f"data.path={corpus}",
        "data.text_field=body",
        f"data.shards={out}",
        "data.shard_tokens=50",
        "data.heldout_fraction=0.2",
        *overrides,
    )
    return prepare_shards(config)


@pytest.mark.parametrize("block_size", [16, 23])
def test_shards_round_trip_to_in_memory_blocks(
    tmp_path, tiny_teacher_dir, tiny_tokenizer, block_size
):
    corpus = _corpus(tmp_path / "corpus")
    manifest = _prepare(tiny_teacher_dir, corpus, tmp_path / "shards")
    assert len(manifest["splits"]["train"]["shards"]) > 3  # blocks cross shard boundaries
    keys = [f"data.path={corpus}", "data.text_field=body", "data.heldout_fraction=0.2"]
    keys.append(f"data.block_size={block_size}")
    memory = prepare_training_data(_config(tiny_teacher_dir, *keys), tiny_tokenizer)
    sharded = prepare_training_data(
        _config(tiny_teacher_dir, *keys, f"data.shards={tmp_path / 'shards'}"), tiny_tokenizer
    )
    assert isinstance(sharded.train, TokenBlocks)
    assert sharded.train.shape == memory.train.shape
    assert torch.equal(sharded.train[:], memory.train)  # the same tokens, the same split
    assert torch.equal(sharded.heldout, memory.heldout)
    documents = read_documents(corpus, "body")
    train_docs, heldout_docs = split_documents(documents, 0.2)
    split = manifest["split"]
    assert (split["train_documents"], split["heldout_documents"]) == (
        len(train_docs),
        len(heldout_docs),
    )
    # indexing as the loop does: a tensor of rows, an int, a negative int, a mask
    rows = torch.tensor([3, 0, len(memory.train) - 1, 3])
    assert torch.equal(sharded.train[rows], memory.train[rows])
    assert torch.equal(sharded.train[-2], memory.train[-2])
    mask = torch.arange(len(memory.train)) % 3 == 0
    assert torch.equal(sharded.train[mask], memory.train[mask])
    # the draw order and its checkpointed position are those of in-memory blocks
    from_memory = BlockBatches(memory.train, 4, seed=2)
    from_shards = BlockBatches(sharded.train, 4, seed=2)
    for _ in range(len(memory.train) // 4 + 2):  # past an epoch end
        assert torch.equal(from_shards.next_batch(), from_memory.next_batch())
    resumed = BlockBatches(sharded.train, 4, seed=2)
    resumed.load_state_dict(from_shards.state_dict())
    assert torch.equal(resumed.next_batch(), from_memory.next_batch())


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


class _Killed(BaseException):
    """Stands for a kill: nothing after it runs (not an Exception, so nothing catches it)."""


@pytest.mark.parametrize(
    ("target", "where"),
    [
        ("atomic_write_bytes", 2),  # killed while writing the third shard
        ("atomic_write_json", 3),  # killed after the third shard, before its progress is saved
        ("atomic_write_bytes", "heldout"),  # killed in the held-out split
    ],
)
def test_interrupted_prepare_resumes_to_identical_bytes(
    tmp_path, tiny_teacher_dir, monkeypatch, target, where
):
    corpus = _corpus(tmp_path / "corpus")
    whole = _prepare(tiny_teacher_dir, corpus, tmp_path / "whole")
    n_train = len(whole["splits"]["train"]["shards"])
    n_shards = n_train + len(whole["splits"]["heldout"]["shards"])
    after = n_train + 2 if where == "heldout" else where
    assert n_shards > after + 1
    real = getattr(distill.data.shard_writer, target)
    calls = []

    def dies_on_a_later_call(path, data):
        calls.append(Path(path).name)
        if len(calls) > after:
            stale = Path(path).with_name(f".{Path(path).name}.x1.tmp")
            stale.write_bytes(b"cut off")  # what a kill mid-write leaves behind
            raise _Killed
        real(path, data)

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(distill.data.shard_writer, target, dies_on_a_later_call)
        with pytest.raises(_Killed):
            _prepare(tiny_teacher_dir, corpus, resumed)
    assert (resumed / "progress.json").is_file() and not (resumed / MANIFEST).exists()
    with pytest.raises(ShardError, match="unfinished: rerun `distill data prepare`"):
        open_run_shards(_config(tiny_teacher_dir, f"data.shards={resumed}"), None)
    finished = {p.name: p.stat().st_ino for p in resumed.glob("*.bin")}
    recorded = json.loads((resumed / "progress.json").read_text())["splits"]
    kept = {shard["file"] for part in recorded.values() for shard in part["shards"]}
    assert len(kept) >= 2

    rewritten = []
    write_bytes = distill.data.shard_writer.atomic_write_bytes

    def counted(path, data):
        rewritten.append(Path(path).name)
        write_bytes(path, data)

    monkeypatch.setattr(distill.data.shard_writer, "atomic_write_bytes", counted)
    assert _prepare(tiny_teacher_dir, corpus, resumed) == whole
    assert _snapshot(resumed) == _snapshot(tmp_path / "whole")  # no temp or progress file left
    assert kept and kept.isdisjoint(rewritten)  # recorded shards were kept, not written again
    assert len(rewritten) == n_shards - len(kept)
    for name in kept:
        assert (resumed / name).stat().st_ino == finished[name]


def test_other_corpus_or_settings_are_refused_and_a_finished_one_is_kept(
    tmp_path, tiny_teacher_dir
):
    corpus = _corpus(tmp_path / "corpus")
    out = tmp_path / "shards"
    manifest = _prepare(tiny_teacher_dir, corpus, out)
    before = _snapshot(out)
    assert _prepare(tiny_teacher_dir, corpus, out) == manifest  # complete: nothing rewritten
    assert _snapshot(out) == before
    with pytest.raises(ShardError, match=r"another shard_tokens \(50 there, 64 now\)"):
        _prepare(tiny_teacher_dir, corpus, out, "data.shard_tokens=64")
    (corpus / "a.txt").write_text("a changed corpus\n")
    with pytest.raises(ShardError, match="another source.documents"):
        _prepare(tiny_teacher_dir, corpus, out)


def test_failed_checksums_and_mismatches_are_refused_with_one_line(
    tmp_path, tiny_teacher_dir, tiny_tokenizer, tiny_chat_tokenizer, tiny_run_config, capsys
):
    corpus = _corpus(tmp_path / "corpus")
    out = tmp_path / "shards"
    cli_main(
        ["data", "prepare", "--out", str(out)]
        + ["--set", f"teacher.path={tiny_teacher_dir}", "--set", f"data.path={corpus}"]
        + ["--set", "data.text_field=body", "--set", "data.shard_tokens=50"]
    )
    assert f"wrote {out}:" in capsys.readouterr().out
    cli_main(["data", "inspect", str(out)])
    assert "ok: all" in capsys.readouterr().out
    config = _config(tiny_teacher_dir, f"data.shards={out}", "data.block_size=16")
    assert len(open_run_shards(config, tiny_tokenizer)[0]) > 0

    with pytest.raises(ShardError, match="was tokenized by .* not by this run's tokenizer"):
        open_run_shards(config, tiny_chat_tokenizer)
    with pytest.raises(ShardError, match="heldout_fraction 0.1, the run has"):
        open_run_shards(
            _config(tiny_teacher_dir, f"data.shards={out}", "data.heldout_fraction=0.2"),
            tiny_tokenizer,
        )
    with pytest.raises(ShardError, match=f"holds {corpus.resolve()}"):
        open_run_shards(
            _config(tiny_teacher_dir, f"data.shards={out}", f"data.path={corpus / 'a.txt'}"),
            tiny_tokenizer,
        )

    shard = out / "train-00002.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["data", "inspect", str(out)])
    assert exit_info.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [
        f"distill: error: data.shards {out}: shard train-00002.bin fails its "
        "sha256 check (corrupt or changed); prepare the shards again"
    ]
    run = {**tiny_run_config, "data": {"shards": str(out), "block_size": 16}}
    (tmp_path / "run.yaml").write_text(json.dumps(run))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["run", "--config", str(tmp_path / "run.yaml")])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distill")]
    assert len(errors) == 1 and "train-00002.bin fails its sha256 check" in errors[0]

    shard.write_bytes(bytes(data[:-2]))  # a shard cut short
    with pytest.raises(ShardError, match="train-00002.bin fails its sha256"):
        open_run_shards(config, tiny_tokenizer)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["splits"]["train"]["tokens"] += 1
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="manifest.json fails its checksum"):
        open_run_shards(config, tiny_tokenizer)


def test_config_refuses_shards_with_what_they_cannot_serve(tmp_path):
    shards = f"data.shards={tmp_path}"
    cases = [
        (["data.sources=[{path: a.txt}]"], "data.shards and data.sources"),
        (["data.format=chat"], "data.format=chat does not apply"),
        (["teacher.cache=c"], "teacher.cache holds in-memory blocks"),
        (["teachers=[{name: a}]"], "shard rows carry no teacher route"),
        (["task=embedding"], "task causal_lm only"),
        (["student.tokenizer.train_vocab=300"], "a student with its own vocabulary reads text"),
        (["loss.cross_tokenizer=uld"], "a student with its own vocabulary reads text"),
    ]
    for overrides, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            load_config(None, [shards, *overrides])
    with pytest.raises(ConfigError, match="set data.shards=DIR"):
        prepare_shards(load_config(None, []))


def test_run_from_shards_killed_and_resumed_equals_the_run_from_memory(
    tmp_path, tiny_run_config, monkeypatch
):
    """The same losses and student as packing in memory, through a kill after the second
    checkpoint and ``--resume`` (the shard position is checkpointed like in-memory blocks')."""
    corpus = _corpus(tmp_path / "corpus")
    data = {"path": str(corpus), "text_field": "body", "block_size": 16}
    base = {
        **tiny_run_config,
        "train": {**tiny_run_config["train"], "steps": 6},
        "checkpoint": {"every": 2},
        "eval": {**tiny_run_config["eval"], "speed": False, "sample_prompts": 0},
    }
    memory = distill.distill({**base, "name": "memory", "data": data})
    prepare_shards(load_config(base={**base, "data": {**data, "shards": str(tmp_path / "s")}}))

    saves = []
    real_save = distill.train.loop.save_checkpoint

    def killed_after_two(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(args)
        if len(saves) == 2:
            raise _Killed

    sharded = {**base, "name": "shards", "data": {"shards": str(tmp_path / "s"), "block_size": 16}}
    with monkeypatch.context() as patch:
        patch.setattr(distill.train.loop, "save_checkpoint", killed_after_two)
        with pytest.raises(_Killed):
            distill.distill(sharded)
    run_dir = Path(base["output_dir"]) / "shards"
    resumed = distill.distill(resume_config(run_dir), resume=True)

    def losses(run) -> list[float]:
        lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if '"loss"' in line]

    assert len(losses(memory)) == 6
    assert losses(resumed) == losses(memory)  # the same blocks in the same order: equal losses
    for name, weight in memory.student.state_dict().items():
        assert torch.equal(resumed.student.state_dict()[name], weight), name
