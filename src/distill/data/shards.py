"""Token shards: a corpus tokenized once (``distill data prepare``), read by training with
constant memory.

A shard directory holds ``manifest.json`` and raw little-endian token files: ``train-00000.bin``,
... and ``heldout-00000.bin``, ... Each split is one token stream (every document's tokens
followed by EOS, in corpus order), cut into shards of ``shard_tokens`` tokens (the last one
shorter). The train / held-out split is the one a run makes in memory
(:func:`distill.data.corpus.split_by_hash` over whole documents), so the blocks of
``data.block_size`` cut from a stream are exactly the blocks
:func:`distill.data.blocks.pack_documents` packs from that split; any block size can be read from
the same shards.

The manifest names the tokenizer (source, vocabulary size, EOS id, the sha256 of its vocabulary
as the teacher cache computes it), the corpus (path, text field, document count, a fingerprint of
every document's sha256), the split rule and each shard's token count and sha256; it carries its
own sha256 (``manifest_sha256``, over the rest). A run refuses shards whose manifest or any shard
fails its checksum, or whose tokenizer is not the run's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distill.errors import DataError
from distill.teacher.cache import sha256_file, tokenizer_sha256

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from distill.config import RunConfig

__all__ = [
    "FORMAT",
    "MANIFEST",
    "SPLITS",
    "ShardError",
    "TokenBlocks",
    "manifest_checksum",
    "open_run_shards",
    "read_manifest",
    "shard_file",
    "token_dtype",
    "tokenizer_identity",
    "verify_shards",
]

FORMAT = "distill-token-shards/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")
SPLIT_RULE = (
    "whole documents, held out in the order of the sha256 of their text until they hold "
    "heldout_fraction of the characters, at least one document kept for training "
    "(distill.data.corpus.split_by_hash)"
)
STREAM_RULE = (
    "each document's tokens (no special tokens added) followed by EOS, in corpus order; blocks "
    "of data.block_size are cut from the stream when read, the last partial block dropped"
)
_NUMPY_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


class ShardError(DataError):
    """Token shards are missing, unfinished, corrupt, or do not match the run."""


def shard_file(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def token_dtype(vocab_size: int) -> str:
    """The narrowest stored type that holds every token id."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def numpy_dtype(name: str) -> np.dtype:
    return _NUMPY_DTYPES[name]


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase, source: str) -> dict[str, Any]:
    """What the manifest records of the tokenizer; a run's must be the same (bar ``source``)."""
    return {
        "source": source,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "sha256": tokenizer_sha256(tokenizer),
    }


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest without its own ``manifest_sha256`` (keys sorted)."""
    body = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The complete manifest of a shard directory, its format and checksum checked."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        unfinished = (Path(directory) / "progress.json").is_file()
        raise ShardError(
            f"data.shards {directory}: no {MANIFEST}; "
            + ("unfinished: rerun" if unfinished else "write it with")
            + " `distill data prepare`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ShardError(f"data.shards {path}: not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ShardError(f"data.shards {path}: format {found!r}, need {FORMAT}")
    if manifest.get("manifest_sha256") != manifest_checksum(manifest):
        raise ShardError(
            f"data.shards {path} fails its checksum (manifest_sha256): changed or corrupt; "
            "prepare the shards again"
        )
    return manifest


def verify_shards(directory: str | Path, manifest: dict[str, Any]) -> int:
    """Check every shard's size and sha256 against the manifest; the count checked."""
    itemsize = numpy_dtype(manifest["dtype"]).itemsize
    count = 0
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            path = Path(directory) / shard["file"]
            if not path.is_file():
                raise ShardError(f"data.shards {directory}: shard {shard['file']} is missing")
            if (
                path.stat().st_size != shard["tokens"] * itemsize
                or sha256_file(path) != shard["sha256"]
            ):
                raise ShardError(
                    f"data.shards {directory}: shard {shard['file']} fails its sha256 check "
                    "(corrupt or changed); prepare the shards again"
                )
            count += 1
    return count


class TokenBlocks:
    """Blocks ``[n, block_size]`` of a token stream stored in shard files, read on demand.

    Each shard is memory-mapped, so memory does not grow with the corpus: indexing (an int, a
    slice or a tensor of block indices, as :class:`~distill.data.blocks.BlockBatches` does)
    reads just those blocks, as int64 like packed blocks. Block ``i`` is tokens
    ``[i * block_size, (i + 1) * block_size)`` of the stream, across shard boundaries.
    """

    def __init__(self, files: list[Path], tokens: list[int], dtype: str, block_size: int):
        self.maps = [
            np.memmap(file, dtype=numpy_dtype(dtype), mode="r", shape=(count,))
            for file, count in zip(files, tokens, strict=True)
            if count
        ]
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])  # stream offset of each shard
        self.block_size = block_size
        self.shape = torch.Size((int(self.starts[-1]) // block_size, block_size))

    def __len__(self) -> int:
        return self.shape[0]

    def _tokens(self, start: int, end: int) -> np.ndarray:
        """Stream tokens ``[start, end)`` as int64, gathered from the shards they lie in."""
        pieces = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < end:
            offset = start - int(self.starts[shard])
            take = min(end - start, len(self.maps[shard]) - offset)
            pieces.append(self.maps[shard][offset : offset + take])
            start += take
            shard += 1
        return np.concatenate(pieces).astype(np.int64)

    def _block(self, index: int) -> np.ndarray:
        if not -len(self) <= index < len(self):
            raise IndexError(f"block {index} out of range for {len(self)} blocks")
        index %= len(self)
        return self._tokens(index * self.block_size, (index + 1) * self.block_size)

    def __getitem__(self, index: int | slice | torch.Tensor | list[int]) -> torch.Tensor:
        if isinstance(index, int):
            return torch.from_numpy(self._block(index))
        if isinstance(index, slice):
            rows = range(*index.indices(len(self)))
        elif isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            rows = torch.nonzero(index).flatten().tolist()
        else:
            rows = torch.as_tensor(index).flatten().tolist()
        if not rows:
            return torch.empty((0, self.block_size), dtype=torch.long)
        return torch.from_numpy(np.stack([self._block(int(row)) for row in rows]))


def _split_blocks(
    directory: Path, manifest: dict[str, Any], split: str, block_size: int
) -> TokenBlocks:
    shards = manifest["splits"][split]["shards"]
    files = [directory / shard["file"] for shard in shards]
    return TokenBlocks(files, [shard["tokens"] for shard in shards], manifest["dtype"], block_size)


def _check_config(directory: Path, manifest: dict[str, Any], config: RunConfig) -> None:
    """The run's data keys must describe the prepared corpus."""
    data = config.data
    fraction = manifest["split"]["heldout_fraction"]
    if data.heldout_fraction != fraction:
        raise ShardError(
            f"data.shards {directory} was split with heldout_fraction {fraction}, the run has "
            f"data.heldout_fraction={data.heldout_fraction}: set it to {fraction} or prepare again"
        )
    source = manifest["source"]
    if data.path is not None:
        path = str(Path(data.path).resolve())
        if (path, data.text_field) != (source["path"], source["text_field"]):
            raise ShardError(
                f"data.shards {directory} holds {source['path'] or 'the default corpus'} "
                f"(text field {source['text_field']!r}), not data.path={data.path} "
                f"(text field {data.text_field!r}): unset data.path or prepare it"
            )


def _check_tokenizer(
    directory: Path, manifest: dict[str, Any], tokenizer: PreTrainedTokenizerBase
) -> None:
    stored = manifest["tokenizer"]
    here = tokenizer_identity(tokenizer, stored["source"])
    if here != stored:
        raise ShardError(
            f"data.shards {directory} was tokenized by {stored['source']} (vocabulary "
            f"{stored['vocab_size']}, sha256 {stored['sha256'][:12]}), not by this run's "
            f"tokenizer (vocabulary {here['vocab_size']}, sha256 {here['sha256'][:12]}): "
            "prepare the shards with this run's teacher"
        )


def open_run_shards(
    config: RunConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[TokenBlocks, torch.Tensor]:
    """``data.shards``: (training blocks, memory-mapped; the first ``eval.max_blocks`` held-out
    blocks ``[n, block_size]``), after checking the manifest's checksum, every shard's sha256,
    the tokenizer and the run's data keys (a :class:`ShardError` naming what differs)."""
    assert config.data.shards is not None
    directory = Path(config.data.shards)
    manifest = read_manifest(directory)
    _check_config(directory, manifest, config)
    _check_tokenizer(directory, manifest, tokenizer)
    verify_shards(directory, manifest)
    block_size = config.data.block_size
    splits = {split: _split_blocks(directory, manifest, split, block_size) for split in SPLITS}
    for split, blocks in splits.items():
        if len(blocks) == 0:
            raise ShardError(
                f"data.shards {directory}: the {split} split holds "
                f"{manifest['splits'][split]['tokens']} tokens, fewer than one block of "
                f"data.block_size={block_size}"
            )
    return splits["train"], splits["heldout"][: config.eval.max_blocks]
