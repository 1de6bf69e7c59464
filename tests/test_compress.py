"""Compression: int8 rows vs a float64 reference, 2:4 and magnitude pruning, healing that keeps
the zeros, quantized/pruned models that load, run and report the sizes of their files, and
`distill compress` on a finished tiny run."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import make_llama

from distill import distill
from distill.cli import main
from distill.compress import (
    apply_pruning,
    dequantize_rows,
    load_model,
    make_permanent,
    mask_2_4,
    model_bytes,
    quantize_rows,
    save_model,
    sparsity,
)
from distill.compress.heal import heal
from distill.compress.prune import prunable_linears
from distill.compress.quantize import weight_only_paths
from distill.config import CompressConfig, LossConfig, TrainConfig, load_config
from distill.errors import ConfigError
from distill.pipelines.compress import compress_label, compress_run
from distill.pipelines.eval import evaluate_models
from distill.teacher import LiveTeacher


@pytest.mark.parametrize("rows, cols", [(8, 24), (7, 33), (1, 5), (13, 1)])
def test_quantize_rows_matches_float64_reference(rows, cols):
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    if rows > 1:
        weight[rows // 2] = 0.0  # an all-zero row stays zero
    q, scale = quantize_rows(weight)
    w64 = weight.double()
    for row in range(rows):
        amax = float(w64[row].abs().max())
        ref_scale = amax / 127 if amax > 0 else 1.0
        ref_q = torch.clamp(torch.round(w64[row] / ref_scale), -127, 127)
        assert float(scale[row]) == pytest.approx(ref_scale, rel=1e-6)
        assert (q[row].double() - ref_q).abs().max() <= 1  # float32 rounding at exact .5 ties
        error = (dequantize_rows(q, scale)[row].double() - w64[row]).abs().max()
        assert error <= ref_scale / 2 * (1 + 1e-5)
        assert int(q[row].abs().max()) == (127 if amax > 0 else 0)
    assert q.dtype == torch.int8


def test_mask_2_4_keeps_the_two_largest_of_every_four():
    weight = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    mask = mask_2_4(weight)
    for row in range(6):
        for group in range(4):
            values = weight[row, 4 * group : 4 * group + 4].abs().tolist()
            kept = mask[row, 4 * group : 4 * group + 4].tolist()
            largest = sorted(range(4), key=values.__getitem__)[2:]
            assert [int(k) for k in kept] == [int(i in largest) for i in range(4)]
    with pytest.raises(ValueError, match="divisible by 4"):
        mask_2_4(torch.randn(2, 6))


@pytest.mark.parametrize("pattern, amount", [("unstructured", 0.3), ("2:4", 0.5)])
def test_pruned_model_saves_loads_and_reports_its_file_size(
    tmp_path, tiny_tokenizer, pattern, amount
):
    model = make_llama(len(tiny_tokenizer))
    head_before = model.lm_head.weight.clone()
    apply_pruning(model, amount, pattern)
    make_permanent(model)
    assert not any(hasattr(m, "weight_orig") for m in model.modules())
    for linear in prunable_linears(model).values():  # every layer, not just on average
        assert (linear.weight == 0).float().mean().item() == pytest.approx(amount, abs=0.01)
    assert torch.equal(model.lm_head.weight, head_before)  # head and embeddings stay dense
    out = save_model(model, tiny_tokenizer, tmp_path / "pruned", info={"prune": amount})
    loaded = load_model(out)
    assert sparsity(loaded) == pytest.approx(amount, abs=0.01)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 10))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    assert model_bytes(out) == (out / "model.safetensors").stat().st_size


def test_int8_model_loads_runs_and_is_smaller(tmp_path, tiny_tokenizer):
    model = make_llama(len(tiny_tokenizer), hidden=64)
    float_dir = save_model(model, tiny_tokenizer, tmp_path / "float")
    int8_dir = save_model(model, tiny_tokenizer, tmp_path / "int8", quantize="int8")
    loaded = load_model(int8_dir)
    assert type(loaded.lm_head).__name__ == "DynamicInt8Linear"
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12))
    with torch.no_grad():
        reference = model(ids).logits
        logits = loaded(ids).logits
    # int8 weights (per row) and int8 activations (per token): 5% of the logit range
    assert (logits - reference).abs().max() <= 0.05 * reference.abs().max()
    on_disk = sum(f.stat().st_size for f in int8_dir.glob("*.safetensors"))
    assert model_bytes(int8_dir) == on_disk
    assert on_disk < 0.35 * model_bytes(float_dir)  # int8 + scales vs float32
    generated = loaded.generate(
        ids[:1], max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(ids[:1])
    )
    assert generated.shape == (1, 15)


def test_int8_weight_only_model_loads_and_matches_the_float_one(tmp_path, tiny_tokenizer):
    model = make_llama(len(tiny_tokenizer))
    loaded = load_model(
        save_model(model, tiny_tokenizer, tmp_path / "wo", quantize="int8-weight-only")
    )
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "WeightOnlyLinear"
    # every layer of a tiny model is small enough for torchao's tensors (the dev extra has it)
    paths = weight_only_paths(loaded)
    assert list(paths) == ["torchao"] and paths["torchao"] >= 7
    ids = torch.randint(0, len(tiny_tokenizer), (1, 8))
    with torch.no_grad():
        reference = model(ids).logits
        assert (loaded(ids).logits - reference).abs().max() <= 0.02 * reference.abs().max()


def test_heal_keeps_the_pruned_zeros_and_changes_the_rest(tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    teacher = make_llama(vocab, seed=1)
    student = make_llama(vocab, layers=2, seed=2)
    apply_pruning(student, 0.4)
    before = {n: m.weight.detach().clone() for n, m in prunable_linears(student).items()}
    blocks = torch.randint(0, vocab, (4, 16))
    heal(
        student,
        LiveTeacher(teacher, vocab),
        blocks,
        steps=3,
        lr=1e-2,
        loss_config=LossConfig(),
        train_config=TrainConfig(batch_size=2, warmup_steps=0),
        seed=0,
    )
    make_permanent(student)
    for name, linear in prunable_linears(student).items():
        zeros = before[name] == 0
        assert torch.all(linear.weight[zeros] == 0), name
        assert not torch.equal(linear.weight[~zeros], before[name][~zeros]), name


def test_compress_config_and_labels():
    assert compress_label(CompressConfig(quantize="int8", prune=0.3, heal_steps=100)) == (
        "pruned30_healed100_int8"
    )
    assert compress_label(CompressConfig(prune=0.5, prune_pattern="2:4")) == "pruned2of4"
    with pytest.raises(ValueError, match="prune=0.5"):
        CompressConfig(prune=0.3, prune_pattern="2:4")


def test_compress_run_and_cli(tiny_run_config):
    tiny_run_config["eval"]["speed"] = False
    result = distill(tiny_run_config)
    compressed = compress_run(
        result.run_dir,
        ["compress.quantize=int8", "compress.prune=0.3", "compress.heal_steps=2"],
    )
    assert compressed.label == "pruned30_healed2_int8"
    metrics = compressed.metrics
    assert metrics["bytes"] == (compressed.model_dir / "model.safetensors").stat().st_size
    assert metrics["sparsity"] == pytest.approx(0.3, abs=0.01)
    evaluation = json.loads((result.run_dir / "evaluation.json").read_text())
    recorded = evaluation["models"]["student_pruned30_healed2_int8"]
    # `distill eval` on the written model, with the run's config: the same held-out numbers.
    config = load_config(result.run_dir / "config.yaml", ["eval.speed=false"])
    rescored = evaluate_models([str(compressed.model_dir)], config)["models"]
    (row,) = [m for name, m in rescored.items() if name != "teacher"]
    for key in ("perplexity", "kl_to_teacher", "top1_agreement"):
        assert row[key] == pytest.approx(recorded[key], rel=1e-5, abs=1e-7), key
    assert recorded["kl_to_teacher"] != pytest.approx(
        evaluation["models"]["student_after"]["kl_to_teacher"], rel=1e-6
    )  # pruning and int8 changed the model
    report = json.loads((result.run_dir / "report.json").read_text())
    assert "student_pruned30_healed2_int8" in report["models"]
    assert (result.run_dir / "metrics_heal_pruned30_healed2_int8.jsonl").is_file()
    html = (result.run_dir / "report.html").read_text()
    assert "student_pruned30_healed2_int8" in html

    main(["compress", str(result.run_dir), "--prune", "2:4"])
    pruned = load_model(result.run_dir / "compressed" / "pruned2of4")
    assert sparsity(pruned) == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ConfigError, match="nothing to do"):
        compress_run(result.run_dir, [])


def test_compress_config_file_sections_replace_the_runs(tmp_path):
    """``distill compress RUN --config FILE``: FILE's sections replace the run's, the rest of
    the run's config stays, and --set applies last."""
    from distill.pipelines.compress import _run_config

    run_dir = tmp_path / "run"
    (run_dir / "student").mkdir(parents=True)
    saved = load_config(overrides=["seed=7", "compress.quantize=int8", "compress.heal_lr=0.5"])
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved.model_dump(mode="json")))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("compress:\n  prune: 0.3\n  heal_steps: 5\n")
    config = _run_config(run_dir, ["compress.heal_steps=7"], recipe)
    assert config.seed == 7  # the run's own
    assert (config.compress.prune, config.compress.heal_steps) == (0.3, 7)
    assert config.compress.quantize == "none"  # the file's section replaced the run's whole
