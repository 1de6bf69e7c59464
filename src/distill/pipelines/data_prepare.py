"""``distill data prepare``: tokenize the run's corpus once into token shards (``data.shards``),
and ``distill data inspect``: print a shard directory's manifest and verify every shard."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill.config import RunConfig
from distill.data.corpus import iter_documents
from distill.data.examples import detect_format
from distill.data.shard_writer import write_shards
from distill.data.shards import SPLITS, read_manifest, tokenizer_identity, verify_shards
from distill.errors import ConfigError
from distill.models import load_teacher_tokenizer, teacher_source

__all__ = ["inspect_shards", "prepare_shards"]


def prepare_shards(config: RunConfig) -> dict[str, Any]:
    """Tokenize ``data.path`` (or the default corpus) with the teacher's tokenizer into
    ``data.shards``, resuming an interrupted preparation; returns the manifest."""
    data = config.data
    if not data.shards:
        raise ConfigError(
            "distill data prepare: set data.shards=DIR (or --out DIR): where to write"
        )
    if data.path is not None and detect_format(data.path, data.format) != "text":
        raise ConfigError(
            f"distill data prepare: data.path {data.path} holds chat or prompt/response rows; "
            "shards hold packed text (set data.format=text to read its text_field as text)"
        )
    tokenizer = load_teacher_tokenizer(config.teacher)
    path = None if data.path is None else str(Path(data.path).resolve())
    identity = {
        "tokenizer": tokenizer_identity(tokenizer, teacher_source(config.teacher)),
        "source": {"path": path, "text_field": data.text_field},
    }
    return write_shards(
        lambda: iter_documents(data.path, data.text_field),
        tokenizer,
        data.shards,
        identity=identity,
        heldout_fraction=data.heldout_fraction,
        shard_tokens=data.shard_tokens,
        where=str(data.path),
    )


def inspect_shards(directory: str | Path, write: Callable[[str], None] = print) -> int:
    """Write a shard directory's manifest summary, then verify every shard's sha256."""
    manifest = read_manifest(directory)
    tokenizer, source, split = manifest["tokenizer"], manifest["source"], manifest["split"]
    write(f"{directory}: {manifest['format']}, {manifest['dtype']} tokens")
    write(
        f"  tokenizer {tokenizer['source']} (vocabulary {tokenizer['vocab_size']}, "
        f"sha256 {tokenizer['sha256'][:12]})"
    )
    write(
        f"  corpus {source['path'] or 'default (pydoc topics)'}, {source['documents']} documents, "
        f"held out {split['heldout_documents']} (heldout_fraction {split['heldout_fraction']})"
    )
    for name in SPLITS:
        part = manifest["splits"][name]
        write(f"  {name}: {part['tokens']:,} tokens in {len(part['shards'])} shards")
    count = verify_shards(directory, manifest)
    write(f"ok: all {count} shards match their sha256 in {Path(directory) / 'manifest.json'}")
    return count
