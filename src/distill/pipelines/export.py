"""``distill export MODEL --out DIR``: a Hugging Face directory plus verified GGUF files.

A float or pruned student: ``DIR/hf/`` is ``save_pretrained`` output (``transformers`` loads
it). A quantized student (``distill compress`` output): ``DIR/hf/`` is a copy of its directory
(config, tokenizer, int8 / int4 safetensors, manifest), loaded by ``distill.compress.load_model``;
its GGUF files are written from the de-quantized weights, and each round trip is compared with
that de-quantized model.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from distill.compress.store import load_model, read_manifest, save_model
from distill.export.gguf import export_gguf, verify_gguf
from distill.models import load_tokenizer

__all__ = ["export_model"]

log = logging.getLogger(__name__)


def export_model(
    model_path: str | Path, out_dir: str | Path, gguf_types: list[str], name: str | None = None
) -> dict[str, dict]:
    """Write ``out_dir/hf/`` and ``out_dir/<name>-<type>.gguf`` per type; verify each GGUF.

    Returns ``{artifact: {"path", "bytes", "relative_logit_error"?, "file_logit_error"?}}``.
    """
    source = Path(model_path)
    manifest = read_manifest(source) if source.is_dir() else None
    quantized = manifest is not None and bool(manifest.get("quantize"))
    model = load_model(source, dequantize=True)
    tokenizer = load_tokenizer(source)
    out = Path(out_dir)
    if quantized:
        shutil.rmtree(out / "hf", ignore_errors=True)
        shutil.copytree(source, out / "hf")
    else:
        save_model(model, tokenizer, out / "hf")
    artifacts = {
        "hf": {
            "path": str(out / "hf"),
            "bytes": sum(f.stat().st_size for f in (out / "hf").glob("*.safetensors")),
            "loader": "distill.compress.load_model" if quantized else "transformers",
        }
    }
    base = name or (source.stem if source.is_file() else source.name)
    probe = torch.tensor([tokenizer("def f(x): return x", add_special_tokens=False)["input_ids"]])
    for kind in gguf_types:
        path = export_gguf(model, tokenizer, out / f"{base}-{kind}.gguf", kind, name=base)
        errors = verify_gguf(model, path, probe, kind)
        log.info(
            "%s: relative logit error %.2e against the model (the quantization), %.2e against "
            "its weights on the file's grid (the file)",
            path,
            errors["relative_logit_error"],
            errors["file_logit_error"],
        )
        artifacts[kind] = {"path": str(path), "bytes": path.stat().st_size, **errors}
    return artifacts
