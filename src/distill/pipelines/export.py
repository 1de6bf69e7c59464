"""``distill export MODEL --out DIR``: a Hugging Face directory plus verified GGUF files."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from distill.compress.store import load_model, read_manifest, save_model
from distill.errors import ModelError
from distill.export.gguf import export_gguf, verify_gguf
from distill.models import load_tokenizer

__all__ = ["export_model"]

log = logging.getLogger(__name__)


def export_model(
    model_path: str | Path, out_dir: str | Path, gguf_types: list[str], name: str | None = None
) -> dict[str, dict]:
    """Write ``out_dir/hf/`` and ``out_dir/<name>-<type>.gguf`` per type; verify each GGUF.

    Returns ``{artifact: {"path", "bytes", "relative_logit_error"?}}``.
    """
    source = Path(model_path)
    manifest = read_manifest(source) if source.is_dir() else None
    if manifest is not None and manifest.get("quantize"):
        raise ModelError(f"{source} is int8-quantized: export the float (or pruned) student")
    model = load_model(source)
    tokenizer = load_tokenizer(source)
    out = Path(out_dir)
    save_model(model, tokenizer, out / "hf")
    artifacts = {
        "hf": {
            "path": str(out / "hf"),
            "bytes": sum(f.stat().st_size for f in (out / "hf").glob("*.safetensors")),
        }
    }
    base = name or (source.stem if source.is_file() else source.name)
    probe = torch.tensor([tokenizer("def f(x): return x", add_special_tokens=False)["input_ids"]])
    for kind in gguf_types:
        path = export_gguf(model, tokenizer, out / f"{base}-{kind}.gguf", kind, name=base)
        error = verify_gguf(model, path, probe, kind)
        log.info("%s: relative logit error after the round trip %.2e", path, error)
        artifacts[kind] = {
            "path": str(path),
            "bytes": path.stat().st_size,
            "relative_logit_error": error,
        }
    return artifacts
