"""GGUF export: tiny Llama -> GGUF F16 / Q8_0 / Q4_0 / Q4_1 -> transformers' GGUF loader -> close
logits; quantized students export as their own directory plus GGUF files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_llama, save_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.cli import main
from distill.compress import QuantizeSpec, load_model
from distill.compress import save_model as save_compressed
from distill.compress.quantize import dequantize_groups, quantize_groups
from distill.errors import ModelError
from distill.export import FILE_TOLERANCE, export_gguf, verify_gguf
from distill.export.gguf import _permute_rotary, gguf_tensor_name, on_file_grid, q4_1_blocks
from distill.pipelines.export import export_model

# what each type's quantization may cost a tiny random model (max |difference| / max |logit|)
QUANTIZATION_COST = {"f16": 5e-3, "q8_0": 5e-2, "q4_0": 0.3, "q4_1": 0.3}


@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0", "q4_1"])
def test_gguf_round_trip_logits(tmp_path, tiny_tokenizer, kind):
    model = make_llama(len(tiny_tokenizer), hidden=64)
    path = export_gguf(model, tiny_tokenizer, tmp_path / f"tiny-{kind}.gguf", kind)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name).eval()
    ids = torch.randint(0, len(tiny_tokenizer), (2, 20))
    with torch.no_grad():
        reference = model(ids).logits
        logits = loaded(ids).logits
        on_grid = on_file_grid(model, kind)(ids).logits
    relative = float((logits - reference).abs().max() / reference.abs().max())
    assert relative <= QUANTIZATION_COST[kind]
    assert relative > 0 or kind == "f16"  # Q8_0 really is quantized
    # the file holds exactly the weights of the in-memory grid
    assert float((logits - on_grid).abs().max() / on_grid.abs().max()) <= FILE_TOLERANCE
    errors = verify_gguf(model, path, ids, kind)
    assert errors["file_logit_error"] <= FILE_TOLERANCE
    assert errors["relative_logit_error"] == pytest.approx(relative)
    assert loaded.config.tie_word_embeddings and loaded.config.num_key_value_heads == 2


def test_verify_refuses_a_file_with_the_wrong_layout(tmp_path, tiny_tokenizer, monkeypatch):
    """A file written without llama.cpp's rotary permutation loads, but computes something
    else: the check against the model's own grid says so, however coarse the grid."""
    import distill.export.gguf as gguf_module

    model = make_llama(len(tiny_tokenizer), hidden=64)
    monkeypatch.setattr(gguf_module, "_permute_rotary", lambda weight, heads: weight)
    path = export_gguf(model, tiny_tokenizer, tmp_path / "unpermuted.gguf", "q4_1")
    ids = torch.randint(0, len(tiny_tokenizer), (2, 20))
    with pytest.raises(ModelError, match="q4_1 weights it should hold"):
        verify_gguf(model, path, ids, "q4_1")


def test_gguf_tokenizer_round_trip(tmp_path, tiny_tokenizer):
    export_gguf(make_llama(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "t.gguf", "f16")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    text = "The for statement iterates: for x in items:\n    print(x)  # done"
    assert loaded(text, add_special_tokens=False).input_ids == tiny_tokenizer(text).input_ids


def test_rotary_permutation_is_undone_by_the_reference_inverse():
    heads, head_dim, hidden = 4, 8, 12
    weight = np.arange(heads * head_dim * hidden, dtype=np.float32).reshape(-1, hidden)
    permuted = _permute_rotary(weight, heads)
    # inverse as llama.cpp documents it: rows (head, pair, 2) -> (head, 2, pair)
    inverse = permuted.reshape(heads, head_dim // 2, 2, hidden).swapaxes(1, 2).reshape(weight.shape)
    assert np.array_equal(inverse, weight)
    assert not np.array_equal(permuted, weight)


def test_tensor_names_and_errors(tmp_path, tiny_tokenizer):
    assert gguf_tensor_name("model.layers.3.self_attn.o_proj.weight") == "blk.3.attn_output.weight"
    assert gguf_tensor_name("model.embed_tokens.weight") == "token_embd.weight"
    with pytest.raises(ModelError, match="no GGUF name"):
        gguf_tensor_name("model.layers.0.mystery.weight")


def test_q4_1_blocks_hold_distills_int4_grid_and_keep_zeros():
    """Q4_1 bytes written here decode (by the gguf package's reader) to exactly the int4 group-32
    grid, exact zeros included, where the package's own min-to-max Q4_1 moves them."""
    import gguf
    from gguf.quants import dequantize, quantize

    weight = np.random.default_rng(0).normal(0, 0.05, (6, 96)).astype(np.float32)
    weight[:, ::7] = 0.0
    blocks = q4_1_blocks(weight)
    assert blocks.dtype == np.uint8 and blocks.shape == (6, 96 // 32 * 20)
    decoded = dequantize(blocks, gguf.GGMLQuantizationType.Q4_1).reshape(weight.shape)
    tensor = torch.from_numpy(weight)
    expected = dequantize_groups(*quantize_groups(tensor, 32), 32).numpy()
    assert np.array_equal(decoded, expected)
    # 0 sits on the grid up to the float16 minimum's rounding (2^-11 of a step's 15)
    steps = quantize_groups(tensor, 32)[1].float().numpy().repeat(32, axis=1)
    assert np.all(np.abs(decoded[:, ::7]) <= 15 * 2**-11 * steps[:, ::7])
    theirs = dequantize(
        quantize(weight, gguf.GGMLQuantizationType.Q4_1), gguf.GGMLQuantizationType.Q4_1
    )
    assert np.abs(theirs.reshape(weight.shape)[:, ::7]).max() > 10 * np.abs(decoded[:, ::7]).max()


def test_quantized_student_exports_and_loads_back(tmp_path, tiny_tokenizer):
    """An int4 (group 32) student: its directory loads back through distill.compress.load_model,
    and its Q4_1 GGUF holds exactly its grid (Q4_1 = blocks of 32 with a scale and a minimum)."""
    model = make_llama(len(tiny_tokenizer), hidden=64)
    source = save_compressed(
        model, tiny_tokenizer, tmp_path / "q", quantize=QuantizeSpec("int4", group_size=32)
    )
    artifacts = export_model(source, tmp_path / "out", ["q4_0", "q4_1"])
    assert artifacts["hf"]["loader"] == "distill.compress.load_model"
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12))
    with torch.no_grad():
        original = load_model(source)(ids).logits
        assert torch.equal(load_model(tmp_path / "out" / "hf")(ids).logits, original)
    assert artifacts["q4_1"]["relative_logit_error"] < artifacts["q4_0"]["relative_logit_error"]
    # the decoder's grid unchanged; the int8-row embedding re-rounded to Q8_0 blocks
    assert artifacts["q4_1"]["relative_logit_error"] <= 2e-2
    assert artifacts["q4_1"]["file_logit_error"] <= FILE_TOLERANCE


def test_export_cli_writes_hf_and_verified_gguf(tmp_path, tiny_tokenizer, capsys):
    source = save_model(make_llama(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "student")
    main(["export", str(source), "--out", str(tmp_path / "out"), "--gguf", "f16", "--gguf", "q8_0"])
    out = capsys.readouterr().out
    assert "relative_logit_error" in out and "file_logit_error" in out
    assert (tmp_path / "out" / "hf" / "model.safetensors").is_file()
    for kind in ("f16", "q8_0"):
        assert (tmp_path / "out" / f"student-{kind}.gguf").stat().st_size > 0
    f16 = (tmp_path / "out" / "student-f16.gguf").stat().st_size
    assert (tmp_path / "out" / "student-q8_0.gguf").stat().st_size < 0.7 * f16


def test_load_causal_lm_reads_the_gguf_that_export_writes(tmp_path, tiny_tokenizer):
    """``distill export --gguf f16`` then ``load_causal_lm``/``load_tokenizer`` on the .gguf (the
    path a teacher or student given as a GGUF file takes): the same logits as the exported model
    (F16 tolerance), a plain float model (no quantization marker) that saves as a checkpoint."""
    from distill.models import load_causal_lm, load_tokenizer

    model = make_llama(len(tiny_tokenizer))
    source = save_model(model, tiny_tokenizer, tmp_path / "student")
    main(["export", str(source), "--out", str(tmp_path / "out"), "--gguf", "f16"])
    gguf = tmp_path / "out" / "student-f16.gguf"
    loaded = load_causal_lm(gguf).eval()
    assert getattr(loaded.config, "quantization_config", None) is None
    assert next(loaded.parameters()).dtype == torch.float32
    ids = torch.randint(0, len(tiny_tokenizer), (2, 16))
    with torch.no_grad():
        reference = model(ids).logits
        relative = float((loaded(ids).logits - reference).abs().max() / reference.abs().max())
    assert relative <= QUANTIZATION_COST["f16"]
    text = "for x in items: print(x)"
    assert load_tokenizer(gguf)(text).input_ids == tiny_tokenizer(text).input_ids
    loaded.save_pretrained(tmp_path / "resaved")
    assert (tmp_path / "resaved" / "model.safetensors").is_file()
