"""``distill cache``: run the teacher once over the packed training blocks and store its top-k.

Map of a run (format: ``distill.teacher.cache``):
  1. shards: block ranges of ``shard_blocks``; rank ``r`` of ``W`` processes (torchrun's
     ``RANK`` / ``WORLD_SIZE``) owns shards ``r, r + W, ...``;
  2. the plan manifest (identity + settings, ``complete: false``); an existing manifest of another
     teacher, data or settings is refused, so a rerun can only resume the same cache;
  3. per owned shard not yet on disk: teacher forward in batches, top-k, one safetensors file
     written to a temp file and renamed (a SIGKILL leaves whole shards and at most a stale temp
     file, removed on the next start);
  4. whoever finds every shard present writes the final manifest with each shard's sha256.
Nothing in a shard or the manifest depends on timing, rank count or interruptions, so a resumed
run ends with the same bytes as an uninterrupted one (given a deterministic teacher forward).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from distill.io import atomic_write_bytes, atomic_write_json
from distill.models import count_params
from distill.teacher.cache import (
    FORMAT,
    MANIFEST,
    REALISED,
    CacheError,
    blocks_fingerprint,
    read_manifest,
    sha256_file,
    shard_name,
    tokenizer_sha256,
    weights_sha256,
)

__all__ = [
    "shard_ranges",
    "owned_shards",
    "rank_and_world",
    "teacher_topk",
    "realised_logprobs",
    "cache_identity",
    "write_cache",
]

log = logging.getLogger(__name__)

_STORAGE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def shard_ranges(n_blocks: int, shard_blocks: int) -> list[tuple[int, int]]:
    """``[(first_block, end_block), ...]`` covering ``n_blocks`` in shards of ``shard_blocks``."""
    if shard_blocks < 1:
        raise ValueError(f"shard_blocks must be >= 1, got {shard_blocks}")
    return [
        (start, min(start + shard_blocks, n_blocks)) for start in range(0, n_blocks, shard_blocks)
    ]


def owned_shards(n_shards: int, rank: int, world_size: int) -> list[int]:
    """The shards process ``rank`` of ``world_size`` writes: ``rank, rank + world_size, ...``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    return list(range(rank, n_shards, world_size))


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment variables; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _id_dtype(vocab_rows: int) -> torch.dtype:
    return torch.uint16 if vocab_rows <= 1 << 16 else torch.int32


@torch.no_grad()
def teacher_topk(
    model: PreTrainedModel,
    blocks: torch.Tensor,
    *,
    vocab_rows: int,
    k: int,
    dtype: str,
    temperatures: list[float],
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """One shard's tensors (see the format in ``distill.teacher.cache``) for ``blocks`` ``[n, T]``."""
    parts: dict[str, list[torch.Tensor]] = {
        "ids": [],
        "logprobs": [],
        "lse": [],
        "lognorm": [],
        "realised": [],
    }
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits[..., :vocab_rows].float()  # (b,T,V)
        values, ids = torch.topk(logits, k, dim=-1)  # (b, T, k), descending
        lse = torch.logsumexp(logits, dim=-1)  # (b, T)
        logprobs = logits - lse[..., None]  # (b, T, V)
        lognorm = [torch.logsumexp(logprobs / t, dim=-1) for t in temperatures]  # n_T x (b, T)
        parts["ids"].append(ids.to(_id_dtype(vocab_rows)))
        parts["logprobs"].append((values - lse[..., None]).to(_STORAGE[dtype]))
        parts["lse"].append(lse)
        parts["lognorm"].append(torch.stack(lognorm, dim=-1))  # (b, T, n_T)
        parts["realised"].append(realised_logprobs(logprobs, batch))
    tensors = {name: torch.cat(chunks).contiguous() for name, chunks in parts.items()}
    tensors["input_ids"] = blocks.to(_id_dtype(vocab_rows)).contiguous()
    return tensors


def realised_logprobs(logprobs: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``[b, T]``: at each position the log-probability ``logprobs`` ``[b, T, V]`` gives the
    token that follows in ``blocks`` ``[b, T]`` (0 at the last position: none follows)."""
    following = blocks[:, 1:, None].long()  # (b, T - 1, 1)
    realised = logprobs[:, :-1].gather(-1, following).squeeze(-1)  # (b, T - 1)
    return torch.nn.functional.pad(realised, (0, 1))


def cache_identity(
    teacher_source: str | Path,
    teacher: PreTrainedModel,
    tokenizer: Any,
    blocks: torch.Tensor,
) -> dict[str, Any]:
    """The manifest's identity fields: teacher, tokenizer and data fingerprints."""
    return {
        "teacher": {
            "source": str(teacher_source),
            "weights_sha256": weights_sha256(teacher_source),
            "vocab_rows": int(teacher.get_output_embeddings().weight.shape[0]),
            "params": count_params(teacher),
        },
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "data": {
            "block_size": int(blocks.shape[1]),
            "n_blocks": int(blocks.shape[0]),
            "fingerprint": blocks_fingerprint(blocks),
        },
    }


def _plan(
    identity: dict[str, Any], settings: dict[str, Any], ranges: list[tuple[int, int]]
) -> dict[str, Any]:
    shards = [
        {"file": shard_name(i), "first_block": a, "n_blocks": b - a, "sha256": None, "bytes": None}
        for i, (a, b) in enumerate(ranges)
    ]
    return {"format": FORMAT, "complete": False, **identity, **settings, "shards": shards}


def _refuse_other_cache(directory: Path, plan: dict[str, Any]) -> None:
    """A directory may only be resumed with the same identity and settings."""
    if not (directory / MANIFEST).exists():
        return
    existing = read_manifest(directory, complete=False)
    for key, value in plan.items():
        if key in ("complete", "shards", "bytes_per_token"):
            continue
        have, want, name = existing.get(key), value, key
        while isinstance(have, dict) and isinstance(want, dict) and have != want:
            sub = next(k for k in {**want, **have} if have.get(k) != want.get(k))
            have, want, name = have.get(sub), want.get(sub), f"{name}.{sub}"
        if have != want:
            raise CacheError(
                f"{directory} already holds a teacher cache with another {name} "
                f"({have!r} there, {want!r} now): choose another directory"
            )


def _finish(directory: Path, plan: dict[str, Any], tokens: int) -> bool:
    """Write the complete manifest if every shard is on disk; True when it did."""
    shards = plan["shards"]
    if not all((directory / s["file"]).is_file() for s in shards):
        return False
    for shard in shards:
        shard["sha256"] = sha256_file(directory / shard["file"])
        shard["bytes"] = (directory / shard["file"]).stat().st_size
    plan["bytes_per_token"] = sum(s["bytes"] for s in shards) / tokens
    plan["complete"] = True
    atomic_write_json(directory / MANIFEST, plan)
    return True


def write_cache(
    model: PreTrainedModel,
    blocks: torch.Tensor,
    directory: str | Path,
    *,
    identity: dict[str, Any],
    k: int = 64,
    dtype: str = "float16",
    temperatures: list[float] | tuple[float, ...] = (1.0, 2.0),
    shard_blocks: int = 64,
    batch_size: int = 4,
    rank: int | None = None,
    world_size: int | None = None,
) -> bool:
    """Write (or resume) this process's shards of the cache of ``blocks`` ``[n, T]``.

    Returns True when the cache is complete (this process wrote the final manifest); False when
    other ranks still have shards to write (the last one to finish writes the manifest).
    """
    vocab_rows = identity["teacher"]["vocab_rows"]
    if not 1 <= k <= vocab_rows:
        raise ValueError(f"k={k} must be in [1, vocab_rows={vocab_rows}]")
    if dtype not in _STORAGE:
        raise ValueError(f"dtype must be one of {sorted(_STORAGE)}, got {dtype!r}")
    if any(t <= 0 for t in temperatures):
        raise ValueError(f"temperatures must be > 0, got {list(temperatures)}")
    env_rank, env_world = rank_and_world()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    temps = sorted({1.0, *(float(t) for t in temperatures)})
    id_name = "uint16" if _id_dtype(vocab_rows) == torch.uint16 else "int32"
    settings = {
        "k": k,
        "dtypes": {"ids": id_name, "input_ids": id_name, "logprobs": dtype, "lse": "float32"},
        "lognorm": "float32, c_T = logsumexp(logprobs_full / T) per temperature",
        "realised": REALISED,
        "temperatures": temps,
        "shard_blocks": shard_blocks,
    }
    directory = Path(directory)
    ranges = shard_ranges(blocks.shape[0], shard_blocks)
    plan = _plan(identity, settings, ranges)
    _refuse_other_cache(directory, plan)
    if not (directory / MANIFEST).exists():
        atomic_write_json(directory / MANIFEST, plan)
    mine = owned_shards(len(ranges), rank, world_size)
    for index in mine:  # temp files of a killed run; only this rank writes these shards
        for stale in directory.glob(f".{shard_name(index)}.*.tmp"):
            stale.unlink(missing_ok=True)
    block_tokens = blocks.shape[1]
    todo = [i for i in mine if not (directory / shard_name(i)).is_file()]
    total = sum(ranges[i][1] - ranges[i][0] for i in mine) * block_tokens
    done = total - sum(ranges[i][1] - ranges[i][0] for i in todo) * block_tokens
    bar = tqdm(total=total, initial=done, desc="teacher cache", unit="tok", unit_scale=True)
    model.eval()
    for index in todo:
        first, end = ranges[index]
        tensors = teacher_topk(
            model,
            blocks[first:end],
            vocab_rows=vocab_rows,
            k=k,
            dtype=dtype,
            temperatures=temps,
            batch_size=batch_size,
        )
        atomic_write_bytes(directory / shard_name(index), save(tensors))
        bar.update((end - first) * block_tokens)
    bar.close()
    finished = _finish(directory, plan, blocks.shape[0] * block_tokens)
    if not finished:
        log.info(
            "rank %d wrote its %d shards; the last rank to finish writes the manifest",
            rank,
            len(mine),
        )
    return finished
