"""Weight-only int8 / int4 quantization, smoothed dynamic int8 and quantization-aware
distillation: grids against float64 references, runtime modules against the de-quantized
weights, fake quantization against the real quantized model, the straight-through gradient, a
tiny QAD that lowers the KL, exact resume after SIGKILL, and one-line refusals."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import make_llama
from safetensors.torch import load_file

from distill import distill
from distill.compress import (
    QuantizeSpec,
    dequantize_groups,
    load_model,
    model_bytes,
    quantize_groups,
    save_model,
    torchao_weights,
)
from distill.compress import quantize as quantize_module
from distill.compress.calibrate import _captured_inputs, plan_int8
from distill.compress.qad import (
    attach_fake_quantize,
    detach_fake_quantize,
    quantization_aware_distill,
)
from distill.compress.quantize import (
    DynamicInt8Linear,
    WeightOnlyLinear,
    dequantize_rows,
    fake_quantize_groups,
    fake_quantize_rows,
    linear_names,
    pack_int4,
    quantize_rows,
    split_outliers,
    unpack_int4,
)
from distill.compress.torchao_weights import TORCHAO_MAX_WEIGHTS
from distill.config import LossConfig, TrainConfig, load_config
from distill.errors import ConfigError
from distill.pipelines.compress import check_group_size
from distill.teacher import LiveTeacher


def _reference_groups(w: torch.Tensor, g: int):
    """float64 int4 groups: the range widened to hold 0, a float16 scale, the minimum a whole
    number of steps below 0 (float16), codes in [0, 15]."""
    groups = w.double().reshape(w.shape[0], -1, g)
    low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scale = ((high - low) / 15).half().double()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_code = torch.clamp(torch.round(-low / scale), 0, 15)
    low16 = (-zero_code * scale).half().double()
    codes = torch.clamp(torch.round((groups - low16[..., None]) / scale[..., None]), 0, 15)
    return codes.reshape(w.shape), scale, low16, zero_code


@pytest.mark.parametrize("shape, g", [((7, 96), 32), ((5, 192), 64), ((3, 256), 128)])
def test_int4_groups_match_float64_reference(shape, g):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 0.05
    w[1, :g] = 0.01  # a constant group: 0 joins its range
    w[2, g : 2 * g] += 0.2  # a group far from 0 on one side
    w[0, ::5] = 0.0  # exact zeros in every group
    q, scale, low = quantize_groups(w, g)
    ref_q, ref_scale, ref_low, zero_code = _reference_groups(w, g)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert (q.double() - ref_q).abs().max() <= 1  # float32 rounding at exact .5 ties
    assert torch.equal(scale.double(), ref_scale) and torch.equal(low.double(), ref_low)
    restored = dequantize_groups(q, scale, low, g).double()
    # 0 is a grid point up to the float16 rounding of the minimum (2^-11 of it, relative)
    zero_error = (ref_low + zero_code * ref_scale).abs()  # [out, in/g]
    assert torch.all(zero_error <= ref_low.abs() * 2**-11 + 1e-12)
    zeros = restored[0, ::5].reshape(-1)
    assert torch.all(zeros.abs() <= zero_error[0].repeat_interleave(g)[::5] + 1e-12)
    # half a step everywhere; the minimum's rounding moves the grid, and the float16 scale
    # can leave the top of the range up to 15 x its rounding (2^-11) above the grid
    error = (restored - w.double()).reshape(shape[0], -1, g).abs().amax(-1)
    assert torch.all(error <= ref_scale * (0.5 + 15 * 2**-11) + zero_error + 1e-7)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    assert pack_int4(q).shape == (shape[0], shape[1] // 2)


def test_group_size_must_divide_the_width():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_groups(torch.randn(4, 96), 64)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("path", ["torchao", "kernel", "dequantize"])
def test_weight_only_linear_matches_float64_dequantized(bits, path):
    torch.manual_seed(0)
    w, bias, x = torch.randn(48, 128) * 0.1, torch.randn(48), torch.randn(3, 5, 128)
    if bits == 8:
        q, scale = quantize_rows(w)
        layer = WeightOnlyLinear(q, scale, bias, path=path)
    else:
        q, scale, low = quantize_groups(w, 32)
        layer = WeightOnlyLinear(q, scale, bias, low=low, group_size=32, path=path)
    assert layer.path == path  # each runs here (torchao from the dev extra)
    reference = x.double() @ layer.dequantized().double().T + bias.double()
    got = layer(x)
    assert got.shape == (3, 5, 48)
    # float32 accumulation over 128 inputs: 1e-5 of the output scale
    assert (got.double() - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_linear_runs_small_weights_on_torchao_and_large_on_the_kernel(bits):
    def layer(out_features):
        w = torch.randn(out_features, 64)
        if bits == 8:
            return WeightOnlyLinear(*quantize_rows(w))
        q, scale, low = quantize_groups(w, 32)
        return WeightOnlyLinear(q, scale, low=low, group_size=32)

    small = layer(16)
    assert small.path == "torchao"
    # torchao's tensor reads the stored codes in place: no second copy of the weight
    codes = small.weight_int8 if bits == 8 else small.codes
    assert small.torchao_weight.qdata.data_ptr() == codes.data_ptr()
    assert "torchao_weight" not in small.state_dict()
    rows = (TORCHAO_MAX_WEIGHTS // 64 // 64 + 1) * 64  # just above the limit; the int4 kernel
    assert layer(rows).path == "kernel"  # wants whole blocks of output rows


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("path", ["torchao", "kernel"])
def test_weight_only_linear_computes_with_a_state_dict_loaded_into_it(tmp_path, bits, path):
    def layer(seed):
        w = torch.randn(48, 128, generator=torch.Generator().manual_seed(seed))
        if bits == 8:
            return WeightOnlyLinear(*quantize_rows(w), path=path)
        q, scale, low = quantize_groups(w, 32)
        return WeightOnlyLinear(q, scale, low=low, group_size=32, path=path)

    target, source = layer(0), layer(1)
    torch.save(source.state_dict(), tmp_path / "layer.pt")
    target.load_state_dict(torch.load(tmp_path / "layer.pt", weights_only=True))
    x = torch.randn(3, 128)
    reference = x.double() @ source.dequantized().double().T
    # the derived tensors (torchao's zero points, the packed int4 weight) follow the new buffers
    assert target.path == path
    assert (target(x).double() - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_weight_only_linear_without_torchao_uses_the_kernel(monkeypatch):
    monkeypatch.setattr(torchao_weights, "_quantization", False)  # as if not installed
    assert (
        torchao_weights.torchao_weight(torch.zeros(2, 4, dtype=torch.int8), torch.ones(2)) is None
    )
    layer = WeightOnlyLinear(*quantize_rows(torch.randn(8, 32)))
    assert layer.path == "kernel"
    with pytest.raises(ValueError, match="does not run here"):
        WeightOnlyLinear(*quantize_rows(torch.randn(8, 32)), path="torchao")


def test_weight_only_linear_falls_back_when_torchao_builds_no_tensor(monkeypatch):
    def changed_api(*args, **kwargs):
        raise TypeError("__init__() got an unexpected keyword argument")

    monkeypatch.setattr(quantize_module, "torchao_weight", changed_api)
    q, scale, low = quantize_groups(torch.randn(48, 128), 32)  # a shape the int4 kernel takes
    assert WeightOnlyLinear(q, scale, low=low, group_size=32).path == "kernel"


@pytest.mark.parametrize("method", ["int8-weight-only", "int4"])
def test_fake_quantized_forward_equals_the_real_quantized_model(tmp_path, tiny_tokenizer, method):
    model = make_llama(len(tiny_tokenizer), hidden=64)
    spec = QuantizeSpec(method, group_size=32)
    loaded = load_model(save_model(model, tiny_tokenizer, tmp_path / method, quantize=spec))
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12))
    attach_fake_quantize(model, spec)
    with torch.no_grad():
        fake, real = model(ids).logits, loaded(ids).logits
    detach_fake_quantize(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie kept
    # same grids; only the kernels' float32 summation order differs: 1e-5 of the logit range
    assert (fake - real).abs().max() <= 1e-5 * real.abs().max()


def test_int8_fake_quantized_weights_equal_the_stored_ones_with_outliers(tmp_path, tiny_tokenizer):
    model = make_llama(len(tiny_tokenizer), hidden=64)
    blocks = torch.randint(0, len(tiny_tokenizer), (2, 16))
    plan = plan_int8(model, blocks, alpha=0.5, float_layers=1, outlier_channels=3)
    spec = QuantizeSpec(
        "int8", smooth=plan.smooth, outliers=plan.outliers, keep_float=plan.keep_float
    )
    stored = load_model(
        save_model(model, tiny_tokenizer, tmp_path / "i8", quantize=spec), dequantize=True
    )
    attach_fake_quantize(model, spec)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                want = stored.get_submodule(name).weight
                # the same grid; smoothing divides back in float32: 1e-6 of the weight scale
                assert (module.weight - want).abs().max() <= 1e-6 * want.abs().max(), name
    detach_fake_quantize(model)


def test_int4_model_is_small_and_loads_back(tmp_path, tiny_tokenizer):
    model = make_llama(len(tiny_tokenizer), hidden=64)
    float_bytes = model_bytes(save_model(model, tiny_tokenizer, tmp_path / "float"))
    out = save_model(model, tiny_tokenizer, tmp_path / "int4", quantize=QuantizeSpec("int4", 32))
    manifest = json.loads((out / "distill_compression.json").read_text())
    assert manifest["group_size"] == 32 and len(manifest["int4_weights"]) == 4 * 7
    stored = load_file(out / "model.safetensors")
    assert stored["model.layers.0.mlp.down_proj.weight"].shape == (64, 64)  # [out, in/2] bytes
    assert model_bytes(out) == (out / "model.safetensors").stat().st_size
    assert model_bytes(out) < 0.3 * float_bytes
    ids = torch.randint(0, len(tiny_tokenizer), (1, 8))
    generated = load_model(out).generate(
        ids, max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(ids)
    )
    assert generated.shape == (1, 11)


def test_straight_through_gradient_is_float_inside_and_zero_when_clipped():
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    upstream = torch.randn(4, 64)
    # rows: a scale that clips the largest weights of each row
    scale = w.abs().amax(dim=1) / 127 * 0.5
    leaf = w.clone().requires_grad_(True)
    (fake_quantize_rows(leaf, scale) * upstream).sum().backward()
    inside = w.abs() <= 127 * scale[:, None]
    assert (~inside).any() and inside.any()
    assert torch.equal(leaf.grad[inside], upstream[inside])
    assert torch.all(leaf.grad[~inside] == 0)
    # groups: a range that clips the top of each group
    g = 32
    groups = w.reshape(4, -1, g)
    low = groups.amin(-1)
    step = (groups.amax(-1) - low) / 15 * 0.6
    leaf = w.clone().requires_grad_(True)
    (fake_quantize_groups(leaf, g, step, low) * upstream).sum().backward()
    # rounded (within half a step of the grid's ends) or clipped (beyond)
    bottom = (low - step / 2).repeat_interleave(g, dim=1)
    top = (low + 15.5 * step).repeat_interleave(g, dim=1)
    inside = (w >= bottom) & (w <= top)
    assert (~inside).any() and inside.any()
    assert torch.equal(leaf.grad[inside], upstream[inside])
    assert torch.all(leaf.grad[~inside] == 0)
    # with its own scales only a group's ends can fall outside (by float16 rounding)
    leaf = w.clone().requires_grad_(True)
    (fake_quantize_groups(leaf, g) * upstream).sum().backward()
    changed = (leaf.grad != upstream).reshape(4, -1, g).sum(-1)
    assert int(changed.max()) <= 2
    leaf = w.clone().requires_grad_(True)
    (fake_quantize_rows(leaf) * upstream).sum().backward()
    assert torch.equal(leaf.grad, upstream)


def _kl(teacher, model, blocks) -> float:
    with torch.no_grad():
        p = torch.log_softmax(teacher(blocks).logits, -1)
        q = torch.log_softmax(model(blocks).logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _kl_before_and_after_qad(
    tmp_path, tokenizer, teacher, student, spec, lr
) -> tuple[float, float]:
    """KL to the teacher of ``student`` quantized by ``spec``, before and after 12 QAD steps."""
    vocab = len(tokenizer)
    blocks = torch.randint(0, vocab, (8, 32))
    before = load_model(save_model(student, tokenizer, tmp_path / "ptq", quantize=spec))
    quantization_aware_distill(
        student,
        LiveTeacher(teacher, vocab),
        blocks,
        spec,
        steps=12,
        lr=lr,
        loss_config=LossConfig(alpha=0.0, temperature=1.0),
        train_config=TrainConfig(batch_size=4, warmup_steps=0, threads=1),
        seed=0,
    )
    after = load_model(save_model(student, tokenizer, tmp_path / "qad", quantize=spec))
    return _kl(teacher, before, blocks), _kl(teacher, after, blocks)


def test_tiny_qad_lowers_the_kl_of_a_quantized_student(tmp_path, tiny_tokenizer):
    teacher = make_llama(len(tiny_tokenizer), layers=2, hidden=64, seed=1)
    student = copy.deepcopy(teacher)  # all of its KL is int4's
    spec = QuantizeSpec("int4", group_size=32)
    kl_before, kl_after = _kl_before_and_after_qad(
        tmp_path, tiny_tokenizer, teacher, student, spec, lr=1e-4
    )
    assert kl_after < 0.7 * kl_before, (kl_before, kl_after)
    blocks = torch.randint(0, len(tiny_tokenizer), (8, 32))
    with pytest.raises(ConfigError, match="no teacher"):
        quantization_aware_distill(
            student,
            None,
            blocks,
            spec,
            steps=1,
            lr=1e-3,
            loss_config=LossConfig(),
            train_config=TrainConfig(),
            seed=0,
        )


@pytest.mark.parametrize("method", ["int8", "int8-weight-only"])
def test_tiny_int8_qad_lowers_the_kl_of_a_quantized_student(tmp_path, tiny_tokenizer, method):
    # A copy of the teacher loses only ~1e-6 nats to int8, less than 12 Adam steps move it: the
    # student is another random model, so the KL that QAD (through the int8 grid) lowers is real.
    teacher = make_llama(len(tiny_tokenizer), layers=2, hidden=64, seed=1)
    student = make_llama(len(tiny_tokenizer), layers=2, hidden=64, seed=2)
    kl_before, kl_after = _kl_before_and_after_qad(
        tmp_path, tiny_tokenizer, teacher, student, QuantizeSpec(method), lr=1e-3
    )
    assert kl_after < 0.7 * kl_before, (kl_before, kl_after)


def test_int8_plan_smooths_outliers_and_keeps_the_worst_layer_float(tiny_tokenizer):
    model = make_llama(len(tiny_tokenizer), layers=2, hidden=64)
    with torch.no_grad():  # an outlier input channel of every down_proj, as in real LMs
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[5] *= 60.0
    blocks = torch.randint(0, len(tiny_tokenizer), (4, 32))
    plain = plan_int8(model, blocks, alpha=0.0, float_layers=0)
    smoothed = plan_int8(model, blocks, alpha=0.5, float_layers=1)
    name = "model.layers.0.mlp.down_proj"
    assert smoothed.errors[name] < 0.5 * plain.errors[name]
    worst = max(smoothed.errors, key=smoothed.errors.get)
    assert list(smoothed.keep_float) == [worst] and worst not in smoothed.smooth
    assert "largest int8 output error" in smoothed.describe()[0]


def _linear_with_outlier_inputs(rows: int = 16, width: int = 96, out: int = 40):
    """A float64 weight, inputs whose channel 7 is 300x the rest and whose first token is 50x
    the others (the two kinds of outliers SmolLM2's activations have)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out, width, generator=generator, dtype=torch.float64) / width**0.5
    x = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    x[:, 7] *= 300.0
    x[0] *= 50.0
    return weight, x


def _int8_layer(weight: torch.Tensor, index: torch.Tensor) -> DynamicInt8Linear:
    q, scale, columns = split_outliers(weight.float(), index)
    return DynamicInt8Linear(q, scale, outlier_index=index, outlier_weight=columns.float())


def test_int8_layer_is_per_token_a_row_does_not_depend_on_the_others():
    weight, x = _linear_with_outlier_inputs()
    layer = _int8_layer(weight, torch.tensor([7]))
    together = layer(x.float())
    pairs = torch.cat([layer(x[i : i + 2].float()) for i in range(0, len(x), 2)])
    # per-tensor activation steps would change every row when row 0 (50x) joins the batch
    assert torch.equal(together, pairs)
    # one row (decoding) runs on its own range: the same within one activation step
    alone = torch.cat([layer(x[i : i + 1].float()) for i in range(len(x))])
    step = x.abs().amax(1, keepdim=True).float() / 63.0 * weight.abs().sum(1).float()
    assert ((alone - together).abs() <= step).all()


def test_int8_outlier_channels_are_exact_and_cut_the_error():
    weight, x = _linear_with_outlier_inputs()
    reference = x @ weight.T  # float64
    index = torch.tensor([7])
    q, scale, columns = split_outliers(weight.float(), index)
    assert torch.equal(q[:, 7], torch.zeros_like(q[:, 7]))
    assert torch.equal(columns.float(), weight[:, 7:8].half().float())  # stored as float16
    # the row step ignores the outlier column: the int8 part equals quantize_rows of the rest
    rest = weight.float().index_fill(1, index, 0.0)
    assert torch.equal(q, quantize_rows(rest)[0])

    def error(layer) -> float:
        got = layer(x.float()).double()
        return float((got - reference).norm() / reference.norm())

    with_outliers = error(_int8_layer(weight, index))
    without = error(_int8_layer(weight, torch.zeros(0, dtype=torch.long)))
    assert with_outliers < 0.25 * without
    # what is left is the int8 error of the other channels: weights per row, 7-bit activations
    expected = x.clone()
    expected[:, 7] = 0
    float_part = x[:, 7:8] @ columns.double().T
    bound = (expected.abs().amax(1, keepdim=True) / 63.0) * weight.abs().sum(
        1
    )  # one step per input
    got = _int8_layer(weight, index)(x.float()).double()
    assert (
        (got - float_part - expected @ dequantize_rows(q, scale).double().T).abs() <= bound
    ).all()


def test_int8_plan_picks_the_outlier_channel_and_saves_it(tmp_path, tiny_tokenizer):
    model = make_llama(len(tiny_tokenizer), layers=2, hidden=64)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[5] *= 60.0  # down_proj input channel 5 is large
    blocks = torch.randint(0, len(tiny_tokenizer), (4, 32))
    plain = plan_int8(model, blocks, alpha=0.0, float_layers=0)
    split = plan_int8(model, blocks, alpha=0.0, float_layers=0, outlier_channels=2)
    name = "model.layers.0.mlp.down_proj"
    assert 5 in split.outliers[name].tolist() and len(split.outliers[name]) == 2
    assert split.errors[name] < 0.5 * plain.errors[name]
    assert "float outlier input channels" in split.describe()[0]
    spec = QuantizeSpec("int8", outliers=split.outliers)
    saved = save_model(model, tiny_tokenizer, tmp_path / "int8", quantize=spec)
    loaded, dequantized = load_model(saved), load_model(saved, dequantize=True)
    down = loaded.get_submodule(name)
    assert torch.equal(down.outlier_index, split.outliers[name])
    # de-quantized weights: int8 rows everywhere but the outlier columns, float16 there
    weight = model.get_submodule(name).weight.detach()
    restored = dequantized.get_submodule(name).weight.detach()
    assert torch.equal(restored[:, 5], weight[:, 5].half().float())
    assert (restored - weight).abs().max() <= weight.abs().amax() / 127
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12))
    with torch.no_grad():
        reference = model(ids).logits
        assert (loaded(ids).logits - reference).abs().max() <= 0.05 * reference.abs().max()


def test_int8_outlier_threshold_keeps_only_channels_far_above_the_median(tiny_tokenizer):
    model = make_llama(len(tiny_tokenizer), layers=2, hidden=64)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[5] *= 60.0  # down_proj input channel 5 is large
    blocks = torch.randint(0, len(tiny_tokenizer), (4, 32))
    threshold = 8.0
    plan = plan_int8(
        model, blocks, alpha=0.0, float_layers=0, outlier_channels=16, outlier_threshold=threshold
    )
    inputs = _captured_inputs(model, blocks, linear_names(model), 1024)
    for name in linear_names(model):
        channel_max = inputs[name].abs().amax(dim=0)  # (in,)
        above = (channel_max > threshold * channel_max.median()).nonzero().squeeze(1)
        want = above if len(above) <= 16 else torch.topk(channel_max, 16).indices.sort().values
        got = plan.outliers.get(name, torch.zeros(0, dtype=torch.long))
        assert torch.equal(got, want), name
    down = "model.layers.0.mlp.down_proj"
    assert 5 in plan.outliers[down].tolist()
    # a threshold no channel reaches leaves every layer without float columns
    none = plan_int8(
        model, blocks, alpha=0.0, float_layers=0, outlier_channels=16, outlier_threshold=1e9
    )
    assert none.outliers == {}


# --- the job: resume after SIGKILL, refusals ---------------------------------------------------


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "distill", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _steps(path) -> list[int]:
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def tiny_run(tiny_run_config):
    tiny_run_config["eval"]["speed"] = False
    tiny_run_config["train"]["threads"] = 1
    return distill(tiny_run_config).run_dir


def test_qad_killed_with_sigkill_resumes_bit_exact(tmp_path, tiny_run):
    steps = 16
    args = ["--quantize", "int4", "--group-size", "32", "--qad-steps", str(steps)]
    args += ["--set", "checkpoint.every=1", "--set", "compress.qad_lr=3e-3"]
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    shutil.copytree(tiny_run, straight_dir)
    shutil.copytree(tiny_run, killed_dir)
    straight = _cli("compress", str(straight_dir), *args)
    assert straight.wait(timeout=300) == 0, straight.stderr.read()

    process = _cli("compress", str(killed_dir), *args)
    metrics = killed_dir / f"metrics_qad_int4g32_qad{steps}.jsonl"
    deadline = time.time() + 240
    while len(_steps(metrics)) < 4 and time.time() < deadline:
        assert process.poll() is None, "the job ended before it could be killed"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 0 < len(_steps(metrics)) < steps
    resumed = _cli("compress", str(killed_dir), *args, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert _steps(metrics) == list(range(1, steps + 1))
    label = f"int4g32_qad{steps}"
    one = load_file(straight_dir / "compressed" / label / "model.safetensors")
    two = load_file(killed_dir / "compressed" / label / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(one[name], two[name]), name
    evaluation = json.loads((killed_dir / "evaluation.json").read_text())["models"]
    before, after = evaluation["student_int4g32"], evaluation[f"student_{label}"]
    assert before["qad_steps"] == 0 and after["qad_steps"] == steps
    for row in (before, after):
        assert {"bytes", "perplexity", "kl_to_teacher", "top1_agreement"} <= row.keys()
        assert set(row["weight_only_paths"]) <= {"torchao", "kernel"}  # never de-quantizing
    report = (killed_dir / "report.md").read_text()
    assert "student_" + label in report and "QAD steps: KL to the teacher" in report


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quantize", "int3"], "compress.quantize"),
        (["--quantize", "int4", "--group-size", "48"], "compress.group_size"),
        (["--quantize", "int4", "--group-size", "128"], "does not divide the input width"),
        (["--quantize", "int4", "--qad-steps", "2", "--set", "loss.alpha=1"], "no teacher"),
        (["--qad-steps", "2"], "set compress.quantize"),
    ],
)
def test_bad_quantize_input_is_one_line_and_exit_2(tiny_run, args, message):
    process = _cli("compress", str(tiny_run), *args)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]  # no log, warning or traceback
    assert len(lines) == 1 and lines[0].startswith("distill: error: "), stderr
    assert message in lines[0], stderr


def test_group_size_rules_from_the_config_and_the_model():
    with pytest.raises(ConfigError, match="does not divide student.hidden=96"):
        load_config(
            overrides=["compress.quantize=int4", "compress.group_size=64", "student.hidden=96"]
        )
    with pytest.raises(ConfigError, match="group_size=64 does not divide"):
        check_group_size(make_llama(32, layers=1, hidden=32), 64)
