"""Saving and loading compressed students; one loader for every model distill can evaluate.

A quantized student is a directory: ``config.json``, the tokenizer, ``distill_compression.json``
(the method and which tensors are int8) and one ``model.safetensors`` in which each quantized
weight ``W`` is stored as ``W`` (int8 ``[out, in]``) plus ``W_scale`` (float32 ``[out]``); other
tensors stay float32. Plain (float or pruned) students are ordinary ``save_pretrained`` output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from distill.compress.quantize import (
    QUANTIZE_METHODS,
    dequantize_rows,
    install_int8_linears,
    linear_names,
    quantize_rows,
)
from distill.errors import ModelError
from distill.io import atomic_directory, atomic_write_json
from distill.models import load_causal_lm

__all__ = [
    "MANIFEST",
    "save_model",
    "load_model",
    "model_bytes",
    "quantized_params",
    "read_manifest",
]

MANIFEST = "distill_compression.json"
_SCALE = "_scale"


def _tied(model: PreTrainedModel) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def _quantized_state(model: PreTrainedModel) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors to store (int8 + scales for Linear and embedding weights) and the layout."""
    state = {key: value.detach().float().contiguous() for key, value in model.state_dict().items()}
    names = {module: name for name, module in model.named_modules()}
    embedding_key = f"{names[model.get_input_embeddings()]}.weight"
    head_name = names[model.get_output_embeddings()]
    tied = _tied(model)
    if tied:
        state.pop(f"{head_name}.weight", None)
    keys = [f"{name}.weight" for name in linear_names(model) if not (tied and name == head_name)]
    for key in [*keys, embedding_key]:
        q, scale = quantize_rows(state[key])
        state[key], state[key + _SCALE] = q, scale
    layout = {
        "int8_weights": sorted(keys + [embedding_key]),
        "embedding": embedding_key,
        "head": head_name,
        "tied_head": tied,
    }
    return state, layout


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    quantize: str | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` to ``out_dir`` atomically: ``save_pretrained`` when not quantized."""
    if quantize is not None and quantize not in QUANTIZE_METHODS:
        raise ValueError(f"quantize must be None or one of {QUANTIZE_METHODS}, got {quantize!r}")
    with atomic_directory(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        if quantize is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            state, layout = _quantized_state(model)
            model.config.save_pretrained(tmp)
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            atomic_write_json(tmp / MANIFEST, {"quantize": quantize, **layout, **(info or {})})
        if quantize is None and info:
            atomic_write_json(tmp / MANIFEST, {"quantize": None, **info})
    return Path(out_dir)


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The compression manifest of a model directory, or None for a plain model."""
    manifest = Path(path) / MANIFEST
    return json.loads(manifest.read_text()) if manifest.is_file() else None


def _load_quantized(path: Path, manifest: dict[str, Any]) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    stored = load_file(str(path / "model.safetensors"))
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    state = {}
    for key, value in stored.items():
        if key.endswith(_SCALE):
            continue
        if key in manifest["int8_weights"]:
            quantized[key] = (value, stored[key + _SCALE])
            state[key] = dequantize_rows(value, stored[key + _SCALE])
        else:
            state[key] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    head_key = f"{manifest['head']}.weight"
    if unexpected or [key for key in missing if key != head_key]:
        raise ModelError(f"{path}: weights do not match config.json ({missing + unexpected})")
    if manifest["tied_head"]:
        model.tie_weights()
        quantized[head_key] = quantized[manifest["embedding"]]
    linears = {
        key.removesuffix(".weight"): value
        for key, value in quantized.items()
        if key != manifest["embedding"]
    }
    return install_int8_linears(model.eval(), linears, manifest["quantize"])


def load_model(path: str | Path) -> PreTrainedModel:
    """Any model distill writes or reads: HF directory, ``.gguf`` file, or quantized directory."""
    model_path = Path(path)
    manifest = read_manifest(model_path) if model_path.is_dir() else None
    if manifest is None or manifest.get("quantize") is None:
        return load_causal_lm(model_path).eval()
    return _load_quantized(model_path, manifest)


def quantized_params(path: str | Path) -> int:
    """Parameters of a quantized directory's model, counted from the stored tensors (not scales)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
            if not key.endswith(_SCALE):
                total += math.prod(handle.get_slice(key).get_shape())
    return total


def model_bytes(path: str | Path) -> int:
    """Bytes of a model's weights on disk: its safetensors files, or the ``.gguf`` file."""
    model_path = Path(path)
    if model_path.is_file():
        return model_path.stat().st_size
    return sum(f.stat().st_size for f in model_path.glob("*.safetensors"))
