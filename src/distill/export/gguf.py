"""GGUF export (F16, Q8_0, Q4_0, Q4_1) of Llama-family students, for llama.cpp and the tools
built on it.

Tensor names and the rotary permutation of ``attn_q`` / ``attn_k`` follow llama.cpp's
``convert_hf_to_gguf.py`` (llama.cpp rotates adjacent pairs, Hugging Face rotates halves).
Norms stay float32; 2-D weights are F16, Q8_0 (blocks of 32 int8 values with one F16 scale),
Q4_0 (blocks of 32 4-bit values, one F16 scale, symmetric) or Q4_1 (one F16 scale and one F16
minimum per 32), quantized by the ``gguf`` package, except Q4_1: its blocks are written here
from :func:`~distill.compress.quantize.quantize_groups` at group 32, the grid of ``distill
compress --quantize int4 --group-size 32``, which keeps 0 on the grid (the ``gguf`` package's
min-to-max Q4_1 does not, and a trained student does not survive that). With the 4-bit types
the embedding and output head are Q8_0 (``distill compress`` keeps them int8 too). A byte-level
BPE tokenizer is written as ``gpt2``.
:func:`verify_gguf` loads the file back through ``transformers``' GGUF loader and compares its
logits with the model's own weights put on the file's grid in memory (:func:`on_file_grid`), to
:data:`FILE_TOLERANCE`, and reports how far both are from the original model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from distill.compress.quantize import quantize_groups
from distill.errors import ModelError

__all__ = [
    "GGUF_TYPES",
    "FILE_TOLERANCE",
    "gguf_tensor_name",
    "on_file_grid",
    "q4_1_blocks",
    "export_gguf",
    "special_token_ids",
    "verify_gguf",
]

GGUF_TYPES = ("f16", "q8_0", "q4_0", "q4_1")
# max |logit difference| / max |logit| allowed between a GGUF file, loaded back, and the model's
# weights on that file's grid (the same float32 values: only the order of the sums differs)
FILE_TOLERANCE = 1e-4
_FILE_TYPES = {
    "f16": "MOSTLY_F16",
    "q8_0": "MOSTLY_Q8_0",
    "q4_0": "MOSTLY_Q4_0",
    "q4_1": "MOSTLY_Q4_1",
}

_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name for a Hugging Face Llama tensor name."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".")  # model.layers.N.<module...>.weight
    if parts[:2] != ["model", "layers"] or parts[-1] != "weight":
        raise ModelError(f"no GGUF name for tensor {hf_name}")
    module = ".".join(parts[3:-1])
    if module not in _LAYER_NAMES:
        raise ModelError(f"no GGUF name for tensor {hf_name}")
    return f"blk.{parts[2]}.{_LAYER_NAMES[module]}.weight"


def _permute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF half-rotation rows -> llama.cpp pair-rotation rows, per head. ``[heads*d, in]``."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _check_llama(model: PreTrainedModel) -> None:
    config = model.config
    if config.model_type != "llama":
        raise ModelError(f"GGUF export supports Llama-family models, not {config.model_type!r}")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ModelError(f"GGUF export: rope_type {rope.get('rope_type')!r} is not supported")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ModelError("GGUF export: Llama models with attention or MLP biases are not supported")


def _add_metadata(writer, model: PreTrainedModel, kind: str, name: str) -> None:
    import gguf

    config = model.config
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[kind]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(
    writer, tokenizer: PreTrainedTokenizerBase, vocab_rows: int, model_bos: int | None = None
) -> None:
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if spec.get("type") != "BPE":
        raise ModelError(f"GGUF export supports byte-level BPE tokenizers, not {spec.get('type')}")
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for index in range(vocab_rows):
        if index in by_id:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if index in special else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, token_id in special_token_ids(tokenizer, model_bos, vocab_rows).items():
        getattr(writer, f"add_{key}_token_id")(token_id)  # tokenizer.ggml.<key>_token_id
    bos = tokenizer.bos_token_id
    encoded = tokenizer("a").input_ids if bos is not None else []
    writer.add_add_bos_token(bool(encoded) and encoded[0] == bos)  # GPT-2 style: no BOS added


def special_token_ids(
    tokenizer: PreTrainedTokenizerBase, model_bos: int | None, vocab_rows: int
) -> dict[str, int]:
    """The ``tokenizer.ggml.{bos,eos,pad,unk}_token_id`` values of the GGUF file.

    Every GGUF carries a BOS id (llama.cpp and transformers' GGUF tokenizer loader expect one):
    the tokenizer's, else the model config's ``bos_token_id``, else the EOS id. Pad and unk are
    written only when the tokenizer has them."""
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "unk": tokenizer.unk_token_id,
    }
    if ids["bos"] is None:
        fallback = model_bos if model_bos is not None and 0 <= model_bos < vocab_rows else None
        ids["bos"] = fallback if fallback is not None else ids["eos"]
    return {key: int(value) for key, value in ids.items() if value is not None}


def export_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    kind: str = "f16",
    name: str = "distill-student",
) -> Path:
    """Write ``model`` (float, Llama family) and its tokenizer to a GGUF file of type ``kind``."""
    import gguf

    if kind not in GGUF_TYPES:
        raise ValueError(f"kind must be one of {GGUF_TYPES}, got {kind!r}")
    _check_llama(model)
    config = model.config
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    _add_metadata(writer, model, kind, name)
    _add_tokenizer(writer, tokenizer, config.vocab_size, getattr(config, "bos_token_id", None))
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        data = tensor.detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute_rotary(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute_rotary(data, config.num_key_value_heads)
        gguf_name = gguf_tensor_name(hf_name)
        if data.ndim == 1:
            writer.add_tensor(gguf_name, data.astype(np.float32))
            continue
        qtype = _weight_type(gguf_name, data.shape, kind)
        if qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, data.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, _encode(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(target)
    return target


def _weight_type(gguf_name: str, shape: tuple[int, ...], kind: str):
    """The GGUF type a 2-D tensor is stored as in a file of type ``kind``."""
    import gguf

    types = gguf.GGMLQuantizationType
    if kind == "f16" or shape[-1] % 32:
        return types.F16  # blocks of 32 must tile the row
    if kind.startswith("q4") and gguf_name in ("token_embd.weight", "output.weight"):
        return types.Q8_0  # embedding / head: 8 bits, as distill compress stores them
    return getattr(types, kind.upper())


def _encode(data: np.ndarray, qtype) -> np.ndarray:
    """The bytes of ``data`` [out, in] quantized as ``qtype`` (not F16)."""
    import gguf
    from gguf.quants import quantize

    if qtype == gguf.GGMLQuantizationType.Q4_1:
        return q4_1_blocks(data)
    return quantize(data, qtype)


@torch.no_grad()
def on_file_grid(model: PreTrainedModel, kind: str) -> PreTrainedModel:
    """A copy of ``model`` holding, de-quantized, the weights a ``kind`` file stores: what the
    file must reproduce, whatever the quantization itself costs."""
    import copy

    import gguf
    from gguf.quants import dequantize

    grid = copy.deepcopy(model).eval()
    for hf_name, weight in grid.named_parameters():  # a tied head is the embedding
        if weight.ndim != 2:
            continue
        data = weight.detach().float().numpy()
        qtype = _weight_type(gguf_tensor_name(hf_name), data.shape, kind)
        if qtype == gguf.GGMLQuantizationType.F16:
            values = data.astype(np.float16).astype(np.float32)
        else:
            values = dequantize(_encode(data, qtype), qtype).reshape(data.shape)
        weight.copy_(torch.from_numpy(values))
    return grid


def q4_1_blocks(weight: np.ndarray) -> np.ndarray:
    """GGUF Q4_1 bytes ``[out, in/32 * 20]`` of float ``weight`` ``[out, in]`` on distill's int4
    grid at group 32: per block of 32 inputs, a float16 step and minimum, then 16 bytes holding
    codes ``j`` (low nibble) and ``j + 16`` (high nibble), llama.cpp's layout."""
    codes, scale, low = quantize_groups(torch.from_numpy(weight), 32)
    out_features = weight.shape[0]
    codes = codes.numpy().reshape(out_features, -1, 2, 16)  # (out, blocks, halves, 16)
    packed = codes[:, :, 0, :] | (codes[:, :, 1, :] << np.uint8(4))  # (out, blocks, 16)
    step = scale.numpy().view(np.uint8).reshape(out_features, -1, 2)  # float16 bytes
    minimum = low.numpy().view(np.uint8).reshape(out_features, -1, 2)
    return np.concatenate([step, minimum, packed], axis=-1).reshape(out_features, -1)


@torch.no_grad()
def verify_gguf(
    model: PreTrainedModel, gguf_path: str | Path, input_ids: torch.Tensor, kind: str
) -> dict[str, float]:
    """Load the GGUF file through transformers and compare its logits on ``input_ids``.

    Returns the relative max logit difference (max |difference| / max |logit|) against
    ``model`` (what the quantization costs, reported) and against :func:`on_file_grid`'s copy
    (what the file reproduces); raises :class:`ModelError` when the latter exceeds
    :data:`FILE_TOLERANCE`: a wrong layout, name or permutation, not a coarse grid.
    """
    path = Path(gguf_path)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    logits = loaded(input_ids=input_ids).logits

    def relative(reference: torch.Tensor) -> float:
        return float((logits - reference).abs().max() / reference.abs().max())

    file_error = relative(on_file_grid(model, kind)(input_ids=input_ids).logits)
    if file_error > FILE_TOLERANCE:
        raise ModelError(
            f"{path}: logits differ from the {kind} weights it should hold by {file_error:.2e} "
            f"(relative), more than {FILE_TOLERANCE:.0e}"
        )
    return {
        "relative_logit_error": relative(model.eval()(input_ids=input_ids).logits),
        "file_logit_error": file_error,
    }
