"""Cross-tokenizer distillation from a teacher cache: the group distributions rebuilt from the
top-k and the realised tokens against float64 references and the live teacher, `distill cache`
for a cross-tokenizer run, and the run's refusals of caches it cannot use."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from references import (
    reference_cached_group_distribution,
    reference_group_distribution,
    reference_hybrid,
)
from test_cross_tokenizer import (  # noqa: F401 (module fixtures)
    CHAT_ROWS,
    TEXTS,
    _config,
    _random_groups,
    model_dirs,
    student_tokenizer,
    teacher_tokenizer,
    tiny_models,
)

import distill
from distill.config import load_config
from distill.losses.cross_tokenizer import (
    group_divergence,
    group_rows,
    merged_group_logprobs,
    merged_logprobs,
    sparse_group_parts,
)
from distill.losses.sparse import SparseTargets
from distill.models import load_causal_lm
from distill.pipelines.cache import cache_job
from distill.teacher import CachedTeacher
from distill.teacher.cache import MANIFEST, CacheError

# --- the group distributions from a cache (float64) -------------------------------------


def _cached(logits: torch.Tensor, ids: torch.Tensor, k: int, temperatures) -> SparseTargets:
    """What a cross-tokenizer cache stores for logits ``[B, T, V]`` of rows ``ids`` ``[B, T]``:
    the top-k log-probabilities, ``c_T``, and the log-probability of each row's next token."""
    logprobs = torch.log_softmax(logits, dim=-1)
    top = torch.topk(logprobs, k, dim=-1)
    lognorm = torch.stack([torch.logsumexp(logprobs / t, dim=-1) for t in temperatures], -1)
    following = logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T - 1)
    realised = torch.cat([following, torch.zeros_like(following[:, :1])], dim=1)
    return SparseTargets(top.indices, top.values, lognorm, tuple(temperatures), realised)


def _groups(generator: torch.Generator, vocab: int, student_vocab: int):
    """Random teacher and student rows with the same number of scored groups per row."""
    teacher_ids = torch.randint(0, vocab, (2, 14), generator=generator)
    student_ids = torch.randint(0, student_vocab, (2, 12), generator=generator)
    teacher_groups = _random_groups(2, 14, generator)
    student_groups = _random_groups(2, 12, generator)
    per_row = torch.minimum(teacher_groups.max(1).values, student_groups.max(1).values)
    teacher_groups[teacher_groups > per_row[:, None]] = -1
    student_groups[student_groups > per_row[:, None]] = -1
    return teacher_ids, student_ids, teacher_groups, student_groups


@pytest.mark.parametrize("k", [9, 4])
def test_cached_group_distribution_matches_its_float64_reference(k):
    """Top-k and x_1 exact at the first row, the rest shared evenly; chunk and bucket exact
    (realised tokens); with k = V, the live teacher's distribution itself."""
    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 12, 9, dtype=torch.float64, generator=generator) * 2
    ids = torch.randint(0, 9, (2, 12), generator=generator)
    groups = _random_groups(2, 12, generator)
    rows = group_rows(ids, groups)
    targets = _cached(logits, ids, k, (1.0, 1.7)).rows()
    merged = merged_logprobs(sparse_group_parts(targets, rows, 9, temperature=1.7)).exp()
    live = merged_group_logprobs(logits.reshape(-1, 9), rows, temperature=1.7).exp()
    key = 0
    for row in range(2):
        for number in range(int(groups[row].max()) + 1):
            positions = (groups[row] == number).nonzero().flatten().tolist()
            predicting = logits[row, [p - 1 for p in positions]]
            tokens = ids[row, positions].tolist()
            expected = reference_cached_group_distribution(predicting, tokens, k, 1.7)
            torch.testing.assert_close(merged[key], expected, rtol=1e-12, atol=1e-14)
            if k == 9:
                exact = reference_group_distribution(predicting, tokens, 1.7)
                torch.testing.assert_close(merged[key], exact, rtol=1e-12, atol=1e-14)
            key += 1
    assert key == rows.n_groups
    torch.testing.assert_close(merged.sum(-1), torch.ones(key, dtype=torch.float64))
    assert (k == 9) == torch.allclose(merged, live, rtol=1e-12, atol=1e-14)


def _divergences(k: int, kind: str, top_k: int | None, seed: int = 12):
    """(cached, live) divergence per group on random float64 rows: teacher V = 10, student 8."""
    generator = torch.Generator().manual_seed(seed)
    teacher_logits = torch.randn(2, 14, 10, dtype=torch.float64, generator=generator) * 2
    student_logits = torch.randn(2, 12, 8, dtype=torch.float64, generator=generator) * 2
    teacher_ids, student_ids, teacher_groups, student_groups = _groups(generator, 10, 8)
    pairs = (torch.tensor([0, 2, 3, 7, 9]), torch.tensor([0, 1, 5, 2, 7]))
    options = {"kind": kind, "temperature": 2.0, "pairs": pairs, "top_k": top_k}
    aligned = (student_ids, teacher_ids, student_groups, teacher_groups)
    targets = _cached(teacher_logits, teacher_ids, k, (1.0, 2.0))
    cached = group_divergence(student_logits, targets, *aligned, teacher_vocab=10, **options)
    live = group_divergence(student_logits, teacher_logits, *aligned, **options)
    inputs = {
        "teacher_logits": teacher_logits,
        "student_logits": student_logits,
        "aligned": aligned,
        "pairs": pairs,
        "targets": targets,
    }
    return cached, live, inputs


@pytest.mark.parametrize(("kind", "top_k"), [("uld", None), ("uld", 3), ("hybrid", None)])
def test_cached_divergence_equals_the_live_one_when_k_covers_the_vocabulary(kind, top_k):
    cached, live, _ = _divergences(10, kind, top_k)
    torch.testing.assert_close(cached, live, rtol=1e-12, atol=1e-14)


def test_cached_uld_is_exact_below_k_and_within_twice_the_tail_sorting_all():
    """k = 6 of 10: the ULD of the top 5 equals the live one (every other id is below the k-th
    probability on both sides); a full sort is within 2 x the tail mass per group."""
    cached, live, _ = _divergences(6, "uld", 5)
    torch.testing.assert_close(cached, live, rtol=1e-12, atol=1e-14)
    cached, live, inputs = _divergences(6, "uld", None)
    _, teacher_ids, _, teacher_groups = inputs["aligned"]
    rows = group_rows(teacher_ids, teacher_groups)
    start = inputs["teacher_logits"].reshape(-1, 10)[rows.start_rows]  # (G, V)
    known = torch.zeros_like(start, dtype=torch.bool).scatter_(1, start.topk(6).indices, True)
    known.scatter_(1, rows.first_ids[:, None], True)
    tail = (torch.softmax(start / 2.0, -1) * ~known).sum(-1)  # (G,)
    difference = (cached - live).abs()
    assert bool((difference <= 2 * tail + 1e-12).all()), (difference, tail)
    assert float(difference.max()) > 1e-6  # the bound is not met by equality alone


def test_cached_hybrid_matches_its_float64_definition():
    """k = 6 of 10: the hybrid on the rebuilt distribution, with the matched pairs outside the
    top-k joined into one outcome of the KL, group by group; its gradient is finite."""
    cached, _, inputs = _divergences(6, "hybrid", None)
    teacher_logits, student_logits = inputs["teacher_logits"], inputs["student_logits"]
    student_ids, teacher_ids, student_groups, teacher_groups = inputs["aligned"]
    teacher_rows = group_rows(teacher_ids, teacher_groups)
    student_rows = group_rows(student_ids, student_groups)
    q = merged_group_logprobs(student_logits.reshape(-1, 8), student_rows, 2.0).exp()
    pairs = list(zip(*(ids.tolist() for ids in inputs["pairs"]), strict=True))
    for g in range(teacher_rows.n_groups):
        row, position = divmod(int(teacher_rows.start_rows[g]), 14)  # the row predicting x_1
        number = int(teacher_groups[row, position + 1])
        positions = (teacher_groups[row] == number).nonzero().flatten().tolist()
        tokens = teacher_ids[row, positions].tolist()
        predicting = teacher_logits[row, [p - 1 for p in positions]]
        p = reference_cached_group_distribution(predicting, tokens, 6, 2.0)
        outside = frozenset(set(range(10)) - set(predicting[0].topk(6).indices.tolist()))
        firsts = (int(teacher_rows.first_ids[g]), int(student_rows.first_ids[g]))
        expected = reference_hybrid(p, q[g], *firsts, pairs, outside - {firsts[0]})
        assert float(cached[g]) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    logits = student_logits.clone().requires_grad_(True)
    group_divergence(
        logits,
        inputs["targets"],
        *inputs["aligned"],
        kind="hybrid",
        temperature=2.0,
        pairs=inputs["pairs"],
        teacher_vocab=10,
    ).sum().backward()
    assert bool(torch.isfinite(logits.grad).all())


# --- `distill cache` and `distill run` across tokenizers --------------------------------


@pytest.fixture(scope="module")
def cross_config(tmp_path_factory, model_dirs) -> dict:  # noqa: F811
    """A small cross-tokenizer run (hybrid, alpha 0.5) on a few documents, 2 steps."""
    root = tmp_path_factory.mktemp("cross_cache")
    documents = root / "documents.jsonl"
    lines = [json.dumps({"text": f"{text} ({index})"}) for index in range(6) for text in TEXTS]
    documents.write_text("\n".join(lines) + "\n")
    config = _config(root, model_dirs, cross_tokenizer="hybrid", alpha=0.5)
    config["data"] = {"path": str(documents), "block_size": 32, "heldout_fraction": 0.2}
    config["train"]["steps"] = 2
    config["eval"] |= {"bits_per_byte": False, "sample_prompts": 0}
    config["baseline"] = False
    return config


def _with_cache(config: dict, name: str, directory, **cache) -> dict:
    teacher = {**config["teacher"], "cache": str(directory)}
    return {**config, "name": name, "teacher": teacher, "cache": cache}


@pytest.fixture(scope="module")
def full_cache(cross_config, teacher_tokenizer):  # noqa: F811
    """The cross-tokenizer cache of the run with k = the teacher's vocabulary, float32."""
    directory = cross_config["output_dir"] + "/../cache_full"
    config = _with_cache(
        cross_config, "cache", directory, k=len(teacher_tokenizer), dtype="float32"
    )
    assert cache_job(load_config(base=config)) is True
    return directory


def _first_records(run_dir) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


def test_cached_cross_run_trains_and_matches_the_live_run(cross_config, full_cache):
    """k = V, float32: the cached run's first step takes the live run's loss, cross-entropy and
    divergence (rel 1e-5: float32 top-k storage and a teacher forward at another padding), and
    the run trains to its end and writes its report."""
    live = distill.distill({**cross_config, "name": "live"})
    cached = distill.distill(_with_cache(cross_config, "cached", full_cache))
    first_live, first_cached = _first_records(live.run_dir), _first_records(cached.run_dir)
    assert first_cached["divergence"] > 0
    for key in ("loss", "ce", "divergence"):
        assert first_cached[key] == pytest.approx(first_live[key], rel=1e-5), key
    records = (cached.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in records] == [1, 2]
    assert (cached.run_dir / "report.json").is_file()
    manifest = json.loads((cached.run_dir.parent.parent / "cache_full" / MANIFEST).read_text())
    assert manifest["cross_tokenizer"]["teacher_pad"] == 0


def test_a_cross_tokenizer_cache_holds_each_rows_realised_tokens(full_cache, model_dirs):  # noqa: F811
    """Each stored row's realised log-probabilities are the teacher's log-softmax at the next
    token of the row (float32, 1e-5)."""
    teacher = load_causal_lm(model_dirs[0])
    cached = CachedTeacher(full_cache)
    rows = cached._handles[0].get_tensor("input_ids").to(torch.int64)[:4]  # (4, W)
    targets = cached.soft_targets(rows)
    with torch.no_grad():
        logprobs = torch.log_softmax(teacher(rows).logits.float(), dim=-1)  # (4, W, V)
    expected = logprobs[:, :-1].gather(-1, rows[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(targets.realised[:, :-1], expected, rtol=1e-5, atol=1e-5)
    assert rows.shape[1] > 32  # the teacher's rows: padded to the longest of them


def test_uld_from_a_top_k_cache_matches_the_live_run(cross_config, tmp_path):
    """k = 48 of ~400: the ULD of the top 32 is exact from the cache, so the first step's loss
    is the live teacher's (rel 1e-5, as above)."""
    uld = {**cross_config, "loss": {"cross_tokenizer": "uld", "alpha": 0.5, "uld_top_k": 32}}
    directory = tmp_path / "cache_48"
    config = _with_cache(uld, "cached_uld", directory, k=48, dtype="float32")
    assert cache_job(load_config(base=config)) is True
    live = distill.distill({**uld, "name": "live_uld"})
    cached = distill.distill(config)
    first_live, first_cached = _first_records(live.run_dir), _first_records(cached.run_dir)
    for key in ("loss", "divergence"):
        assert first_cached[key] == pytest.approx(first_live[key], rel=1e-5), key


def test_cached_chat_run_matches_the_live_run(cross_config, teacher_tokenizer, tmp_path):  # noqa: F811
    """Chat rows, each side in its own template: the cache holds the teacher's rendering of
    every training row; k = V, the first step's loss is the live teacher's (rel 1e-5)."""
    rows = tmp_path / "chat.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in CHAT_ROWS * 4))
    chat = {**cross_config, "output_dir": str(tmp_path / "runs")}
    chat["data"] = {"path": str(rows), "format": "chat", "block_size": 64, "heldout_fraction": 0.3}
    k = len(teacher_tokenizer)
    config = _with_cache(chat, "cached_chat", tmp_path / "cache", k=k, dtype="float32")
    assert cache_job(load_config(base=config)) is True
    live = distill.distill({**chat, "name": "live_chat"})
    cached = distill.distill(config)
    first_live, first_cached = _first_records(live.run_dir), _first_records(cached.run_dir)
    assert first_cached["divergence"] > 0
    for key in ("loss", "divergence"):
        assert first_cached[key] == pytest.approx(first_live[key], rel=1e-5), key


def _edited_copy(source, target, edit) -> str:
    shutil.copytree(source, target)
    manifest = json.loads((target / MANIFEST).read_text())
    edit(manifest)
    (target / MANIFEST).write_text(json.dumps(manifest))
    return str(target)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda manifest: manifest.pop("realised"), "an older distill cache"),
        (lambda manifest: manifest.pop("cross_tokenizer"), "its own packed blocks"),
    ],
)
def test_a_cache_without_realised_tokens_or_rows_is_refused(
    cross_config, full_cache, tmp_path, edit, expected
):
    """A cache written before the realised tokens were stored, and a cache of the teacher's own
    packed blocks: one line each, before any training."""
    directory = _edited_copy(full_cache, tmp_path / "cache", edit)
    with pytest.raises(CacheError) as error:
        distill.distill(_with_cache(cross_config, "refused", directory))
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "runs" / "refused" / "metrics.jsonl").exists()


def test_a_cache_of_other_rows_is_refused(cross_config, full_cache):
    """Other student blocks (another block size) give other teacher rows: the fingerprint."""
    config = _with_cache(cross_config, "other", full_cache)
    config["data"] = {**config["data"], "block_size": 24}
    with pytest.raises(CacheError, match="does not match this run: data"):
        distill.distill(config)
