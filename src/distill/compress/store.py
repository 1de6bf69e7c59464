"""Saving and loading compressed students; one loader for every model distill can evaluate.

A quantized student is a directory: ``config.json``, the tokenizer, ``distill_compression.json``
(the method, which tensors are int8 / int4, the smoothed and the float-kept layers) and one
``model.safetensors`` holding, per quantized weight ``W``:

- int8 rows: ``W`` (int8 ``[out, in]``) and ``W_scale`` (float32 ``[out]``); a smoothed dynamic
  int8 layer also ``W_smooth`` (float32 ``[in]``; ``W`` then quantizes ``W * smooth``); a
  dynamic int8 layer with float outlier channels also ``W_outlier_index`` (int64 ``[k]``) and
  ``W_outlier_weight`` (float16 ``[out, k]``, those columns; zeros in ``W`` there);
- int4 groups: ``W`` (uint8 ``[out, in/2]``, two 4-bit codes a byte), ``W_scale`` and ``W_low``
  (float16 ``[out, in/g]``).

The input embedding is stored as int8 rows and de-quantized on load (a lookup reads one row per
token); with tied embeddings the output head reuses those rows, so they are stored once.
Everything else (norms, layers kept in float) stays float32. :func:`load_model` reads it back.
Plain (float or pruned) students are ordinary ``save_pretrained`` output.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from distill.compress.quantize import (
    QUANTIZE_METHODS,
    dequantize_groups,
    dequantize_rows,
    install_quantized_linears,
    linear_names,
    pack_int4,
    quantize_groups,
    quantize_rows,
    split_outliers,
    unpack_int4,
)
from distill.errors import ModelError
from distill.io import atomic_directory, atomic_write_json
from distill.models import load_causal_lm

__all__ = [
    "MANIFEST",
    "QuantizeSpec",
    "save_model",
    "load_model",
    "model_bytes",
    "quantized_params",
    "read_manifest",
]

MANIFEST = "distill_compression.json"
_SCALE, _LOW, _SMOOTH = "_scale", "_low", "_smooth"
_INDEX, _COLUMNS = "_outlier_index", "_outlier_weight"


@dataclass
class QuantizeSpec:
    """How to quantize: ``method`` (see :data:`QUANTIZE_METHODS`); int4 ``group_size``;
    ``head`` (the output head and input embedding as int8 rows, else float32); ``smooth``
    (dynamic int8: Linear name -> SmoothQuant factors ``[in]``); ``outliers`` (dynamic int8:
    Linear name -> input channels ``[k]`` multiplied in float); ``keep_float`` (Linear name ->
    why it stays float32)."""

    method: str
    group_size: int = 64
    head: bool = True
    smooth: dict[str, torch.Tensor] = field(default_factory=dict)
    outliers: dict[str, torch.Tensor] = field(default_factory=dict)
    keep_float: dict[str, str] = field(default_factory=dict)


def _tied(model: PreTrainedModel) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def _quantized_state(
    model: PreTrainedModel, spec: QuantizeSpec
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors to store and the layout written to the manifest."""
    state = {key: value.detach().float().contiguous() for key, value in model.state_dict().items()}
    names = {module: name for name, module in model.named_modules()}
    embedding_key = f"{names[model.get_input_embeddings()]}.weight"
    head_name = names[model.get_output_embeddings()]
    tied = _tied(model)
    if tied:
        state.pop(f"{head_name}.weight", None)
    decoder = [
        name for name in linear_names(model) if name != head_name and name not in spec.keep_float
    ]
    int8_keys, int4_keys = [], []
    if spec.head:
        int8_keys.append(embedding_key)
        if not tied and head_name not in spec.keep_float:
            int8_keys.append(f"{head_name}.weight")
    for name in decoder:
        key = f"{name}.weight"
        if spec.method == "int4":
            q, scale, low = quantize_groups(state[key], spec.group_size)
            state[key], state[key + _SCALE], state[key + _LOW] = pack_int4(q), scale, low
            int4_keys.append(key)
            continue
        if name in spec.smooth:
            smooth = spec.smooth[name].float()
            state[key] = state[key] * smooth[None, :]
            state[key + _SMOOTH] = smooth.contiguous()
        int8_keys.append(key)
    linear_of = {f"{name}.weight": name for name in decoder}
    linear_of[embedding_key if tied else f"{head_name}.weight"] = head_name
    for key in int8_keys:
        index = spec.outliers.get(linear_of.get(key, "")) if spec.method == "int8" else None
        if index is None:
            state[key], state[key + _SCALE] = quantize_rows(state[key])
            continue
        index = index.long()
        state[key], state[key + _SCALE], state[key + _COLUMNS] = split_outliers(state[key], index)
        state[key + _INDEX] = index.contiguous()
    head_quantized = spec.head and head_name not in spec.keep_float
    layout = {
        "int8_weights": sorted(int8_keys),
        "int4_weights": sorted(int4_keys),
        "group_size": spec.group_size if int4_keys else None,
        "smoothed": sorted(name for name in decoder if name in spec.smooth),
        "outlier_channels": {
            linear_of[key]: len(state[key + _INDEX]) for key in int8_keys if key + _INDEX in state
        },
        "float_layers": dict(spec.keep_float),
        "embedding": embedding_key,
        "head": head_name,
        "head_quantized": head_quantized,
        "tied_head": tied,
    }
    return state, layout


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    quantize: str | QuantizeSpec | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` to ``out_dir`` atomically: ``save_pretrained`` when not quantized."""
    spec = QuantizeSpec(quantize) if isinstance(quantize, str) else quantize
    if spec is not None and spec.method not in QUANTIZE_METHODS:
        raise ValueError(f"quantize must be None or one of {QUANTIZE_METHODS}, got {spec.method!r}")
    with atomic_directory(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        if spec is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            state, layout = _quantized_state(model, spec)
            model.config.save_pretrained(tmp)
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            atomic_write_json(tmp / MANIFEST, {"quantize": spec.method, **layout, **(info or {})})
        if spec is None and info:
            atomic_write_json(tmp / MANIFEST, {"quantize": None, **info})
    return Path(out_dir)


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The compression manifest of a model directory, or None for a plain model."""
    manifest = Path(path) / MANIFEST
    return json.loads(manifest.read_text()) if manifest.is_file() else None


def _load_quantized(path: Path, manifest: dict[str, Any], runtime: bool) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    stored = load_file(str(path / "model.safetensors"))
    int8_keys, int4_keys = set(manifest["int8_weights"]), set(manifest.get("int4_weights", []))
    group_size = manifest.get("group_size") or 0
    parts: dict[str, dict[str, torch.Tensor]] = {}
    state = {}
    for key, value in stored.items():
        if key.endswith((_SCALE, _LOW, _SMOOTH, _INDEX, _COLUMNS)):
            continue
        if key in int8_keys:
            parts[key] = {"q": value, "scale": stored[key + _SCALE]}
            state[key] = dequantize_rows(value, stored[key + _SCALE])
            if key + _INDEX in stored:
                index, columns = stored[key + _INDEX], stored[key + _COLUMNS].float()
                parts[key] |= {"outlier_index": index, "outlier_weight": columns}
                state[key][:, index] = columns
            if key + _SMOOTH in stored:
                parts[key]["smooth"] = stored[key + _SMOOTH]
                state[key] = state[key] / stored[key + _SMOOTH][None, :]
        elif key in int4_keys:
            q = unpack_int4(value)
            scale, low = stored[key + _SCALE], stored[key + _LOW]
            parts[key] = {"q": q, "scale": scale, "low": low, "group_size": group_size}
            state[key] = dequantize_groups(q, scale, low, group_size)
        else:
            state[key] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    head_key = f"{manifest['head']}.weight"
    if unexpected or [key for key in missing if key != head_key]:
        raise ModelError(f"{path}: weights do not match config.json ({missing + unexpected})")
    embedding = parts.pop(manifest["embedding"], None)
    if manifest["tied_head"]:
        model.tie_weights()
        if embedding is not None and manifest.get("head_quantized", True):
            parts[head_key] = embedding
    if not runtime:
        return model.eval()
    linears = {key.removesuffix(".weight"): value for key, value in parts.items()}
    if manifest["quantize"] != "int8":  # weight-only methods: the head is int8 weight-only
        return install_quantized_linears(model.eval(), linears, "int8-weight-only")
    return install_quantized_linears(model.eval(), linears, "int8")


def load_model(path: str | Path, *, dequantize: bool = False) -> PreTrainedModel:
    """Any model distill writes or reads: HF directory, ``.gguf`` file, or quantized directory.

    A quantized directory loads with its int8 / int4 runtime layers; ``dequantize`` gives a plain
    float32 model holding the de-quantized weights instead (for export)."""
    model_path = Path(path)
    manifest = read_manifest(model_path) if model_path.is_dir() else None
    if manifest is None or manifest.get("quantize") is None:
        return load_causal_lm(model_path).eval()
    return _load_quantized(model_path, manifest, runtime=not dequantize)


def quantized_params(path: str | Path) -> int:
    """Parameters of a quantized directory's model, counted from the stored tensors (not scales)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
            if not key.endswith((_SCALE, _LOW, _SMOOTH, _INDEX, _COLUMNS)):
                total += math.prod(handle.get_slice(key).get_shape())
    return total


def model_bytes(path: str | Path) -> int:
    """Bytes of a model's weights on disk: its safetensors files, or the ``.gguf`` file."""
    model_path = Path(path)
    if model_path.is_file():
        return model_path.stat().st_size
    return sum(f.stat().st_size for f in model_path.glob("*.safetensors"))
