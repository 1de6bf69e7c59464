"""Documents, the held-out split and packing."""

from __future__ import annotations

import json

import pytest
import torch

from distill.data import (
    BlockBatches,
    default_documents,
    pack_documents,
    read_documents,
    split_documents,
)
from distill.errors import DataError


def test_default_corpus_is_pydoc_topics():
    documents = default_documents()
    assert len(documents) > 50
    assert 400_000 < sum(map(len, documents)) < 600_000


def test_split_is_deterministic_whole_documents_and_about_ten_percent():
    documents = default_documents()
    train, heldout = split_documents(documents, 0.1)
    train_again, heldout_again = split_documents(documents, 0.1)
    assert heldout == heldout_again
    assert set(heldout).isdisjoint(train)
    assert len(train) + len(heldout) == len(documents)
    share = sum(map(len, heldout)) / sum(map(len, documents))
    assert 0.1 <= share < 0.2
    # Independent of input order: the same documents are held out.
    _, heldout_reversed = split_documents(list(reversed(documents)), 0.1)
    assert set(heldout_reversed) == set(heldout)


def test_pack_documents_appends_eos_and_drops_remainder(tiny_tokenizer):
    blocks = pack_documents(["hello world", "def f(x): return x"], tiny_tokenizer, block_size=4)
    stream = (
        tiny_tokenizer("hello world")["input_ids"]
        + [tiny_tokenizer.eos_token_id]
        + tiny_tokenizer("def f(x): return x")["input_ids"]
        + [tiny_tokenizer.eos_token_id]
    )
    assert blocks.shape == (len(stream) // 4, 4)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]


def test_pack_too_little_data(tiny_tokenizer):
    with pytest.raises(DataError, match="block_size=512"):
        pack_documents(["tiny"], tiny_tokenizer, block_size=512)


def test_read_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "a row"}) + "\n\n")
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["parquet row"]}), tmp_path / "c.parquet")
    assert read_documents(tmp_path) == [
        "first paragraph",
        "second paragraph",
        "a row",
        "parquet row",
    ]


def test_batches_cycle_epochs_deterministically():
    blocks = torch.arange(10).view(5, 2)
    first = BlockBatches(blocks, batch_size=2, seed=7)
    seen = [first.next_batch() for _ in range(5)]
    second = BlockBatches(blocks, batch_size=2, seed=7)
    second.load_state_dict({"epoch": 1, "cursor": 2})
    assert torch.equal(second.next_batch(), seen[3])
    assert first.epoch == 2
