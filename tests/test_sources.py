"""data.sources: several weighted text sources, each with its own held-out split."""

from __future__ import annotations

import pytest
import torch

import distill
from distill.config import load_config
from distill.data.sources import WeightedBatches
from distill.errors import ConfigError
from distill.pipelines.prepare import prepare_data, prepare_sources

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
