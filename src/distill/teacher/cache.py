"""The offline teacher cache: its on-disk format, its checks, and :class:`CachedTeacher`.

A cache directory holds ``manifest.json`` and shards ``shard-00000.safetensors``, ... Shard ``s``
covers training blocks ``[s * shard_blocks, (s + 1) * shard_blocks)`` and holds, for ``n`` blocks
of ``T`` tokens:

    input_ids [n, T]        uint16 (int32 if the vocabulary does not fit)   the block itself
    ids       [n, T, k]     uint16 / int32   token ids of the teacher's k largest logits, descending
    logprobs  [n, T, k]     float16 / bfloat16 / float32   log softmax(logits) at T = 1 of those ids
    lse       [n, T]        float32   logsumexp of the full logit row (logits = logprobs + lse)
    lognorm   [n, T, n_T]   float32   c_T = logsumexp(log softmax(logits) / T) per stored T
    realised  [n, T]        float32   log softmax(logits) at T = 1 of the token that follows in
                                      the block (0 at the last position); manifest key
                                      ``realised`` (caches written before it lack both)

Log-probabilities rather than raw logits are stored because they are <= 0 with the largest ones
near 0, where float16 is most precise (absolute error <= |lp| * 2^-11). See
``distill.losses.sparse`` for why ``c_T`` is stored per temperature. The manifest names the
teacher (source, sha256 of its weight files), the tokenizer (sha256 of its vocabulary), the data
(sha256 of the packed training blocks), block length, k, dtypes, temperatures and each shard's
sha256; a run refuses a cache that differs from it in any of these.

**A cross-tokenizer cache** (manifest key ``cross_tokenizer``, written with
``loss.cross_tokenizer`` set) holds the teacher's side of a cross-tokenizer run's rows instead of
the teacher's own packed blocks: each student row's text in the teacher's tokens, right-padded
with the teacher's pad to the longest (``data`` fingerprints those padded rows). It also names
the student's tokenizer (sha256) and the pad id. A row is looked up with its trailing pads
stripped: the teacher reads a row padded to any width alike at the row's own positions
(causal), so one stored row serves every padding of it.

:class:`CachedTeacher` serves a batch by looking each block up by its token content, so the
training loop draws batches exactly as with a live teacher and never passes block indices.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from distill.config import RunConfig, TeacherConfig
from distill.errors import DistillError
from distill.losses.sparse import SparseTargets

__all__ = [
    "CacheError",
    "CachedTeacher",
    "MANIFEST",
    "FORMAT",
    "REALISED",
    "shard_name",
    "sha256_file",
    "tokenizer_sha256",
    "blocks_fingerprint",
    "weights_sha256",
    "read_manifest",
    "verify_shards",
    "check_run_matches",
    "inspect_cache",
    "open_run_cache",
    "open_cross_cache",
]

MANIFEST = "manifest.json"
FORMAT = "distill-topk-cache/1"
# The manifest's ``realised`` entry: what the shards' ``realised`` tensor holds.
REALISED = "float32, log softmax at T = 1 of the token that follows in the row"


class CacheError(DistillError):
    """A teacher cache is missing, incomplete, corrupt, or does not match the run."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of the sorted vocabulary and the EOS id: what decides the packed blocks' meaning."""
    vocab = sorted(tokenizer.get_vocab().items())
    payload = json.dumps({"vocab": vocab, "eos": tokenizer.eos_token_id}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def blocks_fingerprint(blocks: torch.Tensor) -> str:
    """sha256 of the packed blocks ``[n, T]`` (shape, then int64 little-endian token ids)."""
    digest = hashlib.sha256(json.dumps(list(blocks.shape)).encode())
    digest.update(blocks.to(torch.int64).contiguous().numpy().astype("<i8").tobytes())
    return digest.hexdigest()


def weights_sha256(path: str | Path) -> str:
    """sha256 over a .gguf file, or over a model directory's weight files (sorted by name)."""
    root = Path(path)
    if root.is_file():
        return sha256_file(root)
    files = sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}:{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def read_manifest(directory: str | Path, *, complete: bool = True) -> dict[str, Any]:
    """The manifest of a cache directory; with ``complete``, refuse an unfinished cache."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CacheError(
            f"teacher cache {directory}: no {MANIFEST} (write it with `distill cache`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CacheError(f"teacher cache {path}: not valid JSON") from None
    if manifest.get("format") != FORMAT:
        raise CacheError(f"teacher cache {path}: format {manifest.get('format')!r}, need {FORMAT}")
    if complete and not manifest.get("complete"):
        raise CacheError(
            f"teacher cache {directory} is incomplete: rerun `distill cache` to finish it"
        )
    return manifest


def verify_shards(directory: str | Path, manifest: dict[str, Any]) -> int:
    """Check every shard's sha256 against the manifest; the count checked, or a CacheError."""
    for shard in manifest["shards"]:
        path = Path(directory) / shard["file"]
        if not path.is_file():
            raise CacheError(f"teacher cache {directory}: shard {shard['file']} is missing")
        if sha256_file(path) != shard["sha256"]:
            raise CacheError(
                f"teacher cache {directory}: shard {shard['file']} fails its sha256 check "
                "(corrupt or changed)"
            )
    return len(manifest["shards"])


def _short(value: Any) -> str:
    return value[:12] if isinstance(value, str) and len(value) == 64 else repr(value)


def check_run_matches(
    directory: str | Path, manifest: dict[str, Any], expected: dict[str, Any]
) -> None:
    """Refuse a cache whose identity differs from the run's: one line naming the first field.

    ``expected`` maps dotted manifest keys (``"data.block_size"``) to the run's values.
    """
    for key, want in expected.items():
        have: Any = manifest
        for part in key.split("."):
            have = have.get(part) if isinstance(have, dict) else None
        if have != want:
            raise CacheError(
                f"teacher cache {directory} does not match this run: {key} is "
                f"{_short(have)} in the cache, {_short(want)} for the run"
            )


class CachedTeacher:
    """A teacher read from a cache directory: sparse top-k soft targets, no model in memory.

    Opening verifies the manifest and (unless ``verify=False``) every shard's sha256. Each
    training block is found by its token content; a block absent from the cache is an error.
    """

    def __init__(self, directory: str | Path, *, verify: bool = True):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if verify:
            verify_shards(self.directory, self.manifest)
        self.vocab_rows: int = self.manifest["teacher"]["vocab_rows"]
        self.temperatures = tuple(self.manifest["temperatures"])
        cross = self.manifest.get("cross_tokenizer")
        self._pad: int | None = None if cross is None else int(cross["teacher_pad"])
        self._handles = [
            safe_open(str(self.directory / shard["file"]), framework="pt")
            for shard in self.manifest["shards"]
        ]
        self._index: dict[bytes, tuple[int, int]] = {}
        for shard_index, handle in enumerate(self._handles):
            blocks = handle.get_tensor("input_ids").to(torch.int64)  # (n, T)
            for row in range(blocks.shape[0]):
                self._index.setdefault(self._key(blocks[row]), (shard_index, row))

    def _key(self, block: torch.Tensor) -> bytes:
        """A block's lookup key: its tokens (a cross-tokenizer cache's without trailing pads)."""
        block = block.to(torch.int64)
        if self._pad is not None:
            kept = (block != self._pad).nonzero()
            block = block[: int(kept[-1]) + 1 if len(kept) else 0]
        return block.contiguous().numpy().tobytes()

    def _block(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        found = self._index.get(self._key(input_ids))
        if found is None:
            raise CacheError(
                f"teacher cache {self.directory} holds no block starting with tokens "
                f"{input_ids[:8].tolist()}: was it written for this data?"
            )
        handle = self._handles[found[0]]
        row, width = found[1], input_ids.shape[0]  # a cross-tokenizer row: its first positions
        names = ["ids", "logprobs", "lognorm"] + (["realised"] if self._pad is not None else [])
        return [handle.get_slice(name)[row, :width] for name in names]

    def soft_targets(self, input_ids: torch.Tensor) -> SparseTargets:
        """The cached top-k of each block of ``input_ids`` ``[B, T]``: rows ``[B, T, k]`` (a
        cross-tokenizer cache's with the realised tokens' log-probabilities ``[B, T]``)."""
        parts = [self._block(block) for block in input_ids]
        return SparseTargets(
            ids=torch.stack([p[0] for p in parts]).to(torch.int64),  # (B, T, k)
            logprobs=torch.stack([p[1] for p in parts]).to(torch.float32),  # (B, T, k)
            lognorm=torch.stack([p[2] for p in parts]),  # (B, T, n_T)
            temperatures=self.temperatures,
            realised=torch.stack([p[3] for p in parts]) if self._pad is not None else None,
        )

    def check_temperature(self, temperature: float) -> None:
        """Refuse a loss temperature whose log-normaliser the cache does not hold."""
        if not any(math.isclose(t, temperature, rel_tol=1e-9) for t in self.temperatures):
            raise CacheError(
                f"teacher cache {self.directory} holds log-normalisers for T in "
                f"{list(self.temperatures)}, not loss.temperature={temperature}: rewrite it with "
                f"--set cache.temperatures=[{temperature}]"
            )


def inspect_cache(directory: str | Path, write: Callable[[str], None] = print) -> int:
    """Write the manifest (shards summarised), then verify every shard's sha256.

    Returns the number of shards verified; an incomplete or corrupt cache is a CacheError.
    """
    manifest = read_manifest(directory, complete=False)
    summary = {key: value for key, value in manifest.items() if key != "shards"}
    shards = manifest["shards"]
    summary["shards"] = f"{len(shards)} files, {sum(s['bytes'] or 0 for s in shards):,} bytes"
    write(json.dumps(summary, indent=2))
    if not manifest.get("complete"):
        raise CacheError(
            f"teacher cache {directory} is incomplete: rerun `distill cache` to finish it"
        )
    count = verify_shards(directory, manifest)
    write(f"ok: all {count} shards match their sha256 in {Path(directory) / MANIFEST}")
    return count


def open_run_cache(
    config: RunConfig,
    *,
    teacher_source: str | Path,
    tokenizer: Any,
    train_blocks: torch.Tensor,
    vocab_rows: int,
    teacher: TeacherConfig | None = None,
) -> CachedTeacher:
    """The cache at ``teacher.cache`` (default ``config.teacher``), checked against the run
    before any training (``train_blocks``: the blocks it must hold, with several teachers the
    ones routed to it).

    Refused (CacheError, one line naming the first difference): another tokenizer, block length,
    data or teacher weights, other output rows, an unfinished cache, a shard failing its sha256;
    a divergence other than forward KL, or (tail-bucket loss) a temperature without a stored
    log-normaliser.
    """
    directory = Path(str((teacher or config.teacher).cache))
    manifest = read_manifest(directory)
    if "cross_tokenizer" in manifest:
        raise CacheError(
            f"teacher cache {directory} holds the teacher's side of a cross-tokenizer run's "
            "rows (written with loss.cross_tokenizer), not its own packed blocks: write one "
            "without loss.cross_tokenizer for this run"
        )
    check_run_matches(
        directory,
        manifest,
        {
            "tokenizer_sha256": tokenizer_sha256(tokenizer),
            "data.block_size": int(train_blocks.shape[1]),
            "data.n_blocks": int(train_blocks.shape[0]),
            "data.fingerprint": blocks_fingerprint(train_blocks),
            "teacher.weights_sha256": weights_sha256(teacher_source),
            "teacher.vocab_rows": vocab_rows,
        },
    )
    cached = CachedTeacher(directory)
    loss = config.loss
    if loss.alpha == 1.0 and loss.alpha_schedule == "constant":
        return cached  # labels only: the soft targets are never read
    if loss.divergence != "forward_kl" or not loss.scale_by_t2:
        raise CacheError(
            f"loss.divergence={loss.divergence}, loss.scale_by_t2={loss.scale_by_t2}: training "
            "from a teacher cache supports forward_kl with scale_by_t2 only"
        )
    if loss.sparse == "tail_bucket":
        if loss.temperature_schedule != "constant":
            raise CacheError(
                f"loss.temperature_schedule={loss.temperature_schedule}: the tail-bucket loss "
                "needs a stored log-normaliser for every T; use loss.sparse=renormalized"
            )
        cached.check_temperature(loss.temperature)
    return cached


def open_cross_cache(
    config: RunConfig,
    *,
    teacher_source: str | Path,
    tokenizer: Any,
    student_tokenizer: Any,
    teacher_rows: torch.Tensor,
    vocab_rows: int,
) -> CachedTeacher:
    """The cache at ``teacher.cache`` for a cross-tokenizer run (``loss.cross_tokenizer``),
    checked before any training: it must hold the realised tokens' log-probabilities (a cache
    written before them is refused), be a cross-tokenizer cache, and match the run's teacher,
    both tokenizers, ``teacher_rows`` ``[n, W]`` (the teacher's side of every training row,
    :func:`~distill.train.cross_tokenizer.teacher_rows`) and the teacher's ``vocab_rows``; the
    loss temperature must be a stored one. Each refusal: one line."""
    directory = Path(str(config.teacher.cache))
    manifest = read_manifest(directory)
    kind = config.loss.cross_tokenizer
    if "realised" not in manifest:
        raise CacheError(
            f"teacher cache {directory} was written without the realised tokens' "
            f"log-probabilities (an older distill cache): loss.cross_tokenizer={kind} needs "
            "them; write it again with `distill cache` and this run's config"
        )
    if "cross_tokenizer" not in manifest:
        raise CacheError(
            f"teacher cache {directory} holds the teacher's top-k of its own packed blocks; "
            f"loss.cross_tokenizer={kind} needs it on the teacher's side of this run's rows: "
            "write it with `distill cache` and this run's config (loss.cross_tokenizer set)"
        )
    check_run_matches(
        directory,
        manifest,
        {
            "tokenizer_sha256": tokenizer_sha256(tokenizer),
            "cross_tokenizer.student_tokenizer_sha256": tokenizer_sha256(student_tokenizer),
            "data.block_size": int(teacher_rows.shape[1]),
            "data.n_blocks": int(teacher_rows.shape[0]),
            "data.fingerprint": blocks_fingerprint(teacher_rows),
            "teacher.weights_sha256": weights_sha256(teacher_source),
            "teacher.vocab_rows": vocab_rows,
        },
    )
    cached = CachedTeacher(directory)
    cached.check_temperature(config.loss.temperature)  # a schedule is refused by the config
    return cached
