"""data.sources: several weighted sources, each with its own format and held-out split."""

from __future__ import annotations

import json

import pytest
import torch

import distill
from distill.config import load_config
from distill.data import Examples
from distill.data.examples import encode_examples, split_rows
from distill.data.sources import WeightedBatches, WeightedExampleBatches, passes_per_source
from distill.errors import ConfigError
from distill.pipelines.training_data import prepare_data, prepare_sources

# Over 8,000 drawn rows, each source's share is within 0.02 of its weight (about 3.5 standard
# deviations of a share near 0.5 at this count).
TOLERANCE = 0.02


def _parts() -> list[torch.Tensor]:
    sizes = [5, 20, 3]
    start = 0
    parts = []
    for size in sizes:
        parts.append(torch.arange(start, start + size)[:, None].repeat(1, 4))
        start += size
    return parts


def test_weights_are_honoured_over_a_long_draw():
    parts, weights = _parts(), [6.0, 3.0, 1.0]
    batches = WeightedBatches(parts, weights, batch_size=4, seed=3)
    rows = torch.cat([batches.next_batch()[:, 0] for _ in range(2000)])
    shares = torch.bincount(batches.source_of(rows), minlength=3).double() / rows.numel()
    expected = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    assert torch.all((shares - expected).abs() < TOLERANCE), shares
    # within a source, rows follow its epochs: the 3-block source used evenly
    small = rows[batches.source_of(rows) == 2]
    counts = torch.bincount(small - 25, minlength=3)
    assert counts.max() - counts.min() <= 1


def test_passes_per_source_match_a_long_weighted_draw():
    """The plan's passes per source against the rows a long draw really repeats: a small source
    of large weight passes over its rows far more often than the total count suggests."""
    parts, weights = _parts(), [6.0, 3.0, 1.0]
    batches = WeightedBatches(parts, weights, batch_size=4, seed=5)
    rows = torch.cat([batches.next_batch()[:, 0] for _ in range(2000)])  # 8,000 rows
    drawn = torch.bincount(batches.source_of(rows), minlength=3).double()
    sizes = [part.shape[0] for part in parts]
    expected = passes_per_source(rows.numel(), sizes, weights)
    for count, size, passes in zip(drawn.tolist(), sizes, expected, strict=True):
        # a share within TOLERANCE of its weight is within rows * TOLERANCE / size passes
        assert abs(count / size - passes) <= rows.numel() * TOLERANCE / size
    # the 5-row source of weight 6 is repeated ~960 times, not the ~286 of 8,000 / 28 rows
    assert expected[0] > 3 * rows.numel() / sum(sizes)


def test_position_restores_exactly():
    straight = WeightedBatches(_parts(), [1.0, 1.0, 1.0], batch_size=3, seed=0)
    for _ in range(7):
        straight.next_batch()
    state = straight.state_dict()
    expected = [straight.next_batch() for _ in range(5)]
    resumed = WeightedBatches(_parts(), [1.0, 1.0, 1.0], batch_size=3, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch(), e) for e in expected)


def _write(path, topic: str, n: int):
    path.write_text(
        "\n\n".join(f"{topic} number {i} is described here in a few plain words." for i in range(n))
    )
    return str(path)


def test_each_source_is_split_on_its_own(tmp_path, tiny_tokenizer, tiny_run_config):
    first = _write(tmp_path / "a.txt", "apple", 40)
    second = _write(tmp_path / "b.txt", "river", 40)
    config = load_config(
        base={
            **tiny_run_config,
            "data": {
                "block_size": 16,
                "sources": [{"path": first, "weight": 3}, {"path": second}],
            },
        }
    )
    parts, heldout = prepare_sources(config, tiny_tokenizer)
    assert len(parts) == 2 and all(part.shape[1] == 16 for part in parts)
    text = [tiny_tokenizer.decode(row) for row in heldout]
    assert any("apple" in t for t in text) and any("river" in t for t in text)
    train, _ = prepare_data(config, tiny_tokenizer)
    assert torch.equal(train, torch.cat(parts))
    with pytest.raises(ConfigError, match="data.sources and data.path"):
        load_config(base={"data": {"path": first, "sources": [{"path": second}]}})
    with pytest.raises(ConfigError, match="weight"):
        load_config(base={"data": {"sources": [{"path": first, "weight": 0}]}})


def test_run_trains_from_weighted_sources(tmp_path, tiny_run_config):
    first = _write(tmp_path / "a.txt", "apple", 40)
    second = _write(tmp_path / "b.txt", "river", 40)
    config = {
        **tiny_run_config,
        "data": {"block_size": 16, "sources": [{"path": first, "weight": 2}, {"path": second}]},
        "eval": {**tiny_run_config["eval"], "speed": False, "sample_prompts": 0},
    }
    report = distill.distill(config).report
    assert report["models"]["student_after"]["kl_to_teacher"] > 0
    assert report["training"]["steps"] == 3
    # drawn 2 : 1, the passes over each source's rows follow its weight over its size, and the
    # plan's passes (its memorisation warning) are the most repeated source's
    plan = report["plan"]
    first_blocks, second_blocks = plan["train_blocks_per_source"]
    assert first_blocks + second_blocks == plan["train_blocks"]
    first_passes, second_passes = plan["epochs_per_source"]
    assert first_passes / second_passes == pytest.approx(2 * second_blocks / first_blocks)
    assert plan["epochs"] == max(first_passes, second_passes)


# --- sources of several formats --------------------------------------------------------------


def _rows(path, n: int, chat: bool):
    rows = []
    for i in range(n):
        question, answer = f"What is river number {i}?", f"River {i} runs to the sea."
        if chat:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
        else:
            rows.append({"prompt": question, "response": answer})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path), rows


def test_sources_of_several_formats_each_split_on_their_own(
    tmp_path, tiny_chat_tokenizer, tiny_run_config
):
    text = _write(tmp_path / "a.txt", "apple", 40)
    chat, chat_rows = _rows(tmp_path / "chat.jsonl", 30, chat=True)
    pairs, pair_rows = _rows(tmp_path / "pairs.jsonl", 30, chat=False)
    sources = [
        {"path": text},
        {"path": chat, "format": "chat", "weight": 2},
        {"path": pairs, "format": "prompt_response"},
    ]
    config = load_config(base={**tiny_run_config, "data": {"block_size": 64, "sources": sources}})
    parts, heldout = prepare_sources(config, tiny_chat_tokenizer)
    assert all(isinstance(part, Examples) for part in parts) and isinstance(heldout, Examples)

    # the text source: its own packed blocks, every next token a target
    alone = load_config(base={**tiny_run_config, "data": {"block_size": 64, "path": text}})
    text_train, text_held = prepare_data(alone, tiny_chat_tokenizer)
    assert torch.equal(parts[0].input_ids, text_train)
    assert torch.equal(parts[0].labels[:, :-1], text_train[:, 1:])
    # each row source: its own held-out rows by content hash, encoded in its own format
    for part, rows, data_format, source in [
        (parts[1], chat_rows, "chat", chat),
        (parts[2], pair_rows, "prompt_response", pairs),
    ]:
        train_rows, held_rows = split_rows(rows, 0.1)
        assert held_rows
        expected = encode_examples(train_rows, data_format, tiny_chat_tokenizer, 64, source)
        assert torch.equal(part.input_ids, expected.input_ids)
        assert torch.equal(part.labels, expected.labels)
    # held-out rows from every source in turn: text block, chat row, pair row, text block, ...
    assert torch.equal(heldout.input_ids[0], text_held[0])
    chat_held = encode_examples(split_rows(chat_rows, 0.1)[1], "chat", tiny_chat_tokenizer, 64, "")
    pair_held = encode_examples(
        split_rows(pair_rows, 0.1)[1], "prompt_response", tiny_chat_tokenizer, 64, ""
    )
    assert torch.equal(heldout.input_ids[1], chat_held.input_ids[0])
    assert torch.equal(heldout.labels[2], pair_held.labels[0])
    assert len(heldout) == min(
        config.eval.max_blocks, len(text_held) + len(chat_held) + len(pair_held)
    )

    with pytest.raises(ConfigError, match=r"data.sources\[1\].format=chat needs a .jsonl file"):
        load_config(base={"data": {"sources": [{"path": text}, {"path": text, "format": "chat"}]}})
    with pytest.raises(ConfigError, match="give each source its own format"):
        load_config(base={"data": {"format": "chat", "sources": [{"path": chat}]}})


def _examples(n: int, length: int, first: int) -> Examples:
    ids = torch.arange(first, first + n)[:, None].repeat(1, 8)
    lengths = torch.full((n,), length)
    labels = torch.where(torch.arange(8) < length - 1, ids, -100)
    return Examples(ids, labels, lengths, torch.ones(n, dtype=torch.long))


def test_example_sources_are_drawn_by_weight_and_restore_exactly():
    parts = [_examples(5, 3, 0), _examples(20, 8, 5), _examples(3, 5, 25)]
    weights = [6.0, 3.0, 1.0]
    batches = WeightedExampleBatches(parts, weights, batch_size=4, seed=3)
    drawn = [batches.next_batch() for _ in range(2000)]
    rows = torch.cat([batch.input_ids[:, 0] for batch in drawn])
    shares = torch.bincount(batches.source_of(rows), minlength=3).double() / rows.numel()
    expected = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    assert torch.all((shares - expected).abs() < TOLERANCE), shares
    for batch in drawn[:50]:  # cut to the longest row drawn
        sources = batches.source_of(batch.input_ids[:, 0].contiguous())
        longest = max({0: 3, 1: 8, 2: 5}[int(s)] for s in sources)
        assert batch.input_ids.shape[1] == longest
    state = batches.state_dict()
    expected_next = [batches.next_batch() for _ in range(5)]
    resumed = WeightedExampleBatches(parts, weights, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    for batch in expected_next:
        again = resumed.next_batch()
        assert torch.equal(again.input_ids, batch.input_ids)
        assert torch.equal(again.labels, batch.labels)


def test_run_trains_from_text_and_prompt_response_sources(tmp_path, tiny_run_config):
    text = _write(tmp_path / "a.txt", "apple", 40)
    pairs, _ = _rows(tmp_path / "pairs.jsonl", 40, chat=False)
    config = {
        **tiny_run_config,
        "data": {
            "block_size": 32,
            "sources": [{"path": text}, {"path": pairs, "format": "prompt_response"}],
        },
        "eval": {**tiny_run_config["eval"], "speed": False, "sample_prompts": 1},
    }
    report = distill.distill(config).report
    assert report["models"]["student_after"]["kl_to_teacher"] > 0
    assert report["training"]["steps"] == 3


def test_a_source_without_heldout_only_trains(tmp_path, tiny_chat_tokenizer, tiny_run_config):
    """heldout=false: all of a source's rows train and the held-out rows are the other
    sources' alone (teacher-written text mixed in, the corpus still scored); no path = the
    default corpus."""
    chat, chat_rows = _rows(tmp_path / "chat.jsonl", 30, chat=True)
    sources = [{}, {"path": chat, "format": "chat", "heldout": False}]
    config = load_config(
        base={**tiny_run_config, "data": {"block_size": 64, "sources": sources}},
    )
    parts, heldout = prepare_sources(config, tiny_chat_tokenizer)
    expected = encode_examples(chat_rows, "chat", tiny_chat_tokenizer, 64, chat)
    assert torch.equal(parts[1].input_ids, expected.input_ids)  # every row trains
    corpus_only = load_config(base={**tiny_run_config, "data": {"block_size": 64}})
    corpus_train, corpus_held = prepare_data(corpus_only, tiny_chat_tokenizer)
    assert torch.equal(parts[0].input_ids, corpus_train)
    assert torch.equal(heldout.input_ids, corpus_held)  # the default corpus's held-out alone

    with pytest.raises(ConfigError, match="every source has heldout=false"):
        load_config(base={"data": {"sources": [{"path": chat, "heldout": False}]}})
    with pytest.raises(ConfigError, match=r"format=chat needs a .jsonl file, got the default"):
        load_config(base={"data": {"sources": [{"format": "chat"}]}})
