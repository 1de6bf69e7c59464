"""Intermediate-layer losses against float64 references, the hook-based distiller, and a run
with them: terms logged apart, projection trained but not saved."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from conftest import make_llama
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from distill import distill
from distill.config import IntermediateConfig, LossConfig, TrainConfig
from distill.data import BlockBatches
from distill.errors import ConfigError
from distill.losses.intermediate import attention_kl, hidden_state_loss, value_relation_kl
from distill.student import WidthTargets, build_student, measure_importance, prune_width
from distill.student.intermediate import IntermediateDistiller, uniform_layer_map
from distill.teacher import LiveTeacher
from distill.train import CausalLMTask, CheckpointPlan, train

VOCAB = 64


# ---- float64 references -------------------------------------------------------------------


def ref_hidden(student, teacher, kind) -> float:
    total = 0.0
    for s, t in zip(
        student.reshape(-1, student.shape[-1]).double(),
        teacher.reshape(-1, teacher.shape[-1]).double(),
        strict=True,
    ):
        if kind == "mse":
            total += float(((s - t) ** 2).sum() / s.numel())
        else:
            total += 1.0 - float(s @ t / (s.norm() * t.norm()))
    return total


def ref_kl_rows(p, q) -> float:
    """Sum over rows of KL(p || q), rows of the last dim, 0 log 0 = 0."""
    total = 0.0
    for p_row, q_row in zip(
        p.reshape(-1, p.shape[-1]).double(), q.reshape(-1, q.shape[-1]).double(), strict=True
    ):
        total += sum(float(a * math.log(a / b)) for a, b in zip(p_row, q_row, strict=True) if a > 0)
    return total


def ref_relations(states, heads):
    b, t, w = states.shape
    d = w // heads
    out = torch.zeros(b, heads, t, t, dtype=torch.float64)
    for bi in range(b):
        for r in range(heads):
            x = states[bi, :, r * d : (r + 1) * d].double()
            for i in range(t):
                scores = torch.tensor(
                    [float(x[i] @ x[j]) / math.sqrt(d) for j in range(i + 1)], dtype=torch.float64
                )
                out[bi, r, i, : i + 1] = torch.softmax(scores, dim=0)
    return out


def causal_probs(b, h, t, generator):
    scores = torch.randn(b, h, t, t, generator=generator)
    return scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf).softmax(-1)


# ---- pure losses ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_loss_matches_reference(kind):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    total, n = hidden_state_loss(s, t, kind=kind)
    assert n == 10
    assert float(total) == pytest.approx(ref_hidden(s, t, kind), rel=1e-5)
    assert float(hidden_state_loss(t, t, kind=kind)[0]) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        hidden_state_loss(s, t[..., :4])


def test_attention_kl_matches_reference():
    g = torch.Generator().manual_seed(1)
    s, t = causal_probs(2, 3, 6, g), causal_probs(2, 3, 6, g)
    total, n = attention_kl(s, t, query_rows=5)
    assert n == 10
    expected = ref_kl_rows(t[:, :, :5], s[:, :, :5]) / 3  # mean over heads
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert float(attention_kl(t, t)[0]) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="head counts"):
        attention_kl(s[:, :2], t)


def test_value_relation_kl_matches_reference_and_gradient():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 5, 12, generator=g, requires_grad=True)  # 12 = 3 heads x 4 (student)
    t = torch.randn(2, 5, 8, generator=g)  # 8 = 2 heads x 4 (teacher): different head counts
    total, n = value_relation_kl(s, t, relation_heads=4, query_rows=4)
    assert n == 8
    s64 = s.detach().double().requires_grad_(True)
    ref_s, ref_t = ref_relations(s64.detach(), 4), ref_relations(t, 4)
    expected = ref_kl_rows(ref_t[:, :, :4], ref_s[:, :, :4]) / 4
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    # gradient against float64 autograd of the same formula
    d = 3
    split = s64.view(2, 5, 4, d).transpose(1, 2)
    scores = (split @ split.transpose(-1, -2) / math.sqrt(d)).masked_fill(
        torch.ones(5, 5, dtype=torch.bool).triu(1), -math.inf
    )
    log_q = scores.log_softmax(-1)[:, :, :4]
    p = ref_t[:, :, :4]
    ref_loss = (torch.xlogy(p, p) - p * log_q.masked_fill(p == 0, 0)).sum(-1).mean(1).sum()
    ref_loss.backward()
    total.backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="relation_heads"):
        value_relation_kl(s, t, relation_heads=5)


def test_uniform_layer_map():
    assert uniform_layer_map(2, 4) == [1, 3]
    assert uniform_layer_map(3, 30) == [9, 19, 29]
    assert uniform_layer_map(4, 4) == [0, 1, 2, 3]


# ---- the distiller --------------------------------------------------------------------------


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


def run_pair(student, teacher, distiller, ids):
    with torch.no_grad():
        teacher(input_ids=ids)
    student(input_ids=ids)
    return distiller(ids)


def test_identical_student_has_zero_intermediate_loss(ids):
    teacher = make_llama(VOCAB, layers=3, seed=1)
    student = build_student(teacher, [0, 1, 2])
    config = IntermediateConfig(hidden_weight=1.0, attention_weight=1.0, attention_layers=[0, -1])
    distiller = IntermediateDistiller(student, teacher, config, origin=[0, 1, 2])
    assert distiller.attention_kind == "attention_kl"
    terms = run_pair(student, teacher, distiller, ids)
    assert set(terms) == {"hidden_loss", "attention_loss"}
    assert terms["hidden_loss"].item() == pytest.approx(0.0, abs=1e-10)
    assert terms["attention_loss"].item() == pytest.approx(0.0, abs=1e-6)


def capture(modules, store):
    """Forward hooks storing each module's output (tensor) under its key."""
    return [
        module.register_forward_hook(lambda m, a, out, key=key: store.__setitem__(key, out))
        for key, module in modules.items()
    ]


def test_distiller_terms_equal_manual_computation(ids):
    """Layer map from the kept layers; weights applied; teacher rerun when the loop did not."""
    teacher = make_llama(VOCAB, layers=4, seed=1)
    student = build_student(teacher, [0, 3])
    with torch.no_grad():  # make the student differ from the teacher
        student.model.layers[0].mlp.down_proj.weight.mul_(3.0)
        student.model.layers[1].self_attn.v_proj.weight.mul_(4.0)
    config = IntermediateConfig(
        hidden_weight=2.0,
        attention_weight=0.5,
        hidden_loss="cosine",
        attention_loss="value_relation",
        relation_heads=2,
    )
    distiller = IntermediateDistiller(student, teacher, config, origin=[0, 3])
    student(input_ids=ids)
    terms = distiller(ids)  # no teacher forward happened: the distiller runs it
    distiller.remove()
    out: dict = {}
    s_layers, t_layers = student.model.layers, teacher.model.layers
    handles = capture(
        {
            "s0": s_layers[0],
            "s1": s_layers[1],
            "t0": t_layers[0],
            "t3": t_layers[3],
            "sv": s_layers[1].self_attn.v_proj,
            "tv": t_layers[3].self_attn.v_proj,
        },
        out,
    )
    with torch.no_grad():
        student(input_ids=ids)
        teacher(input_ids=ids)
    for handle in handles:
        handle.remove()
    rows = ids.shape[1] - 1
    expected_hidden = (
        2.0
        * (
            ref_hidden(out["s0"][:, :rows], out["t0"][:, :rows], "cosine")
            + ref_hidden(out["s1"][:, :rows], out["t3"][:, :rows], "cosine")
        )
        / 2
    )
    relations_t = ref_relations(out["tv"], 2)[:, :, :rows]
    relations_s = ref_relations(out["sv"], 2)[:, :, :rows]
    expected_attention = 0.5 * ref_kl_rows(relations_t, relations_s) / 2
    assert expected_attention > 1e-2 and expected_hidden > 1e-2
    assert terms["hidden_loss"].item() == pytest.approx(expected_hidden, rel=1e-4)
    assert terms["attention_loss"].item() == pytest.approx(expected_attention, rel=1e-4)


def test_hooks_only_on_needed_layers(ids):
    teacher = make_llama(VOCAB, layers=4, seed=1)
    student = build_student(teacher, [0, 3])
    config = IntermediateConfig(hidden_weight=1.0, layer_map=[1, 3])
    distiller = IntermediateDistiller(student, teacher, config)
    hooked = [i for i, layer in enumerate(teacher.model.layers) if layer._forward_hooks]
    assert hooked == [1, 3]
    assert not any(layer.self_attn.v_proj._forward_hooks for layer in teacher.model.layers)
    distiller.remove()
    assert not any(layer._forward_hooks for layer in teacher.model.layers)
    assert not teacher.model._forward_pre_hooks


def test_distiller_config_errors(ids):
    teacher = make_llama(VOCAB, layers=4, seed=1)
    student = build_student(teacher, [0, 3])
    narrow = prune_width(student, measure_importance(student, ids), WidthTargets(heads=2))
    with pytest.raises(ConfigError, match="equal head counts"):
        IntermediateDistiller(
            narrow, teacher, IntermediateConfig(attention_weight=1.0, attention_loss="attention_kl")
        )
    with pytest.raises(ConfigError, match="layer_map"):
        IntermediateDistiller(
            student, teacher, IntermediateConfig(hidden_weight=1.0, layer_map=[0])
        )
    with pytest.raises(ConfigError, match="relation_heads"):
        IntermediateDistiller(
            student,
            teacher,
            IntermediateConfig(
                attention_weight=1.0, attention_loss="value_relation", relation_heads=3
            ),
        )


def test_projection_for_narrow_student_gets_gradients(ids):
    teacher = make_llama(VOCAB, layers=2, seed=1)
    student = prune_width(
        build_student(teacher, [0, 1]),
        measure_importance(teacher, ids),
        WidthTargets(hidden=24, heads=2),
    )
    config = IntermediateConfig(hidden_weight=1.0, attention_weight=1.0)
    distiller = IntermediateDistiller(student, teacher, config, origin=[0, 1])
    assert distiller.attention_kind == "value_relation"
    assert distiller.projection.weight.shape == (32, 24)
    assert [name for name, _ in distiller.named_parameters()] == ["projection.weight"]
    terms = run_pair(student, teacher, distiller, ids)
    sum(terms.values()).backward()
    assert distiller.projection.weight.grad.abs().sum() > 0
    assert student.model.layers[0].self_attn.v_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_run_logs_terms_and_saves_no_projection(tiny_run_config):
    tiny_run_config["student"] = {"layers": [0, 3], "hidden": 24}
    tiny_run_config["intermediate"] = {"hidden_weight": 1.0, "attention_weight": 0.5}
    tiny_run_config["eval"]["speed"] = False
    result = distill(tiny_run_config)
    records = [
        json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert all("hidden_loss" in r and "attention_loss" in r for r in records)
    assert all(r["loss"] > r["hidden_loss"] > 0 for r in records)
    student_dir = result.run_dir / "student"
    with safe_open(student_dir / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    assert not any("projection" in key for key in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(student_dir)
    assert set(reloaded.state_dict()) >= keys
    assert reloaded.config.hidden_size == 24
    assert not any(layer._forward_hooks for layer in result.student.model.layers)


def _narrow_pair(ids):
    """A 2-layer teacher and a 24-wide student pruned from it: the hidden term needs a projection."""
    teacher = make_llama(VOCAB, layers=2, seed=1)
    narrow = prune_width(
        build_student(teacher, [0, 1]),
        measure_importance(teacher, ids),
        WidthTargets(hidden=24, heads=2),
    )
    return teacher, narrow


def _train_with_projection(narrow, teacher, blocks, steps: int, seed: int, **train_options):
    """Train a copy of ``narrow`` with a fresh projection (initialised from ``seed``)."""
    student = copy.deepcopy(narrow)
    torch.manual_seed(seed)  # the projection's initial weights
    distiller = IntermediateDistiller(
        student, teacher, IntermediateConfig(hidden_weight=1.0), origin=[0, 1]
    )
    train(
        CausalLMTask(
            student,
            LiveTeacher(teacher),
            BlockBatches(blocks, 4, seed=0),
            LossConfig(alpha=0.5),
            vocab_rows=VOCAB,
            extra_terms=distiller,
        ),
        TrainConfig(steps=steps, batch_size=4, warmup_steps=0, lr=1e-2),
        **train_options,
    )
    distiller.remove()
    return student, distiller.projection.weight.detach().clone()


def test_resume_with_projection_is_bit_exact(tmp_path, ids):
    """The projection is checkpointed with the student: a run resumed from step 2 (with a fresh,
    differently initialised projection) ends exactly like the uninterrupted run."""
    teacher, narrow = _narrow_pair(ids)
    blocks = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(4))

    def run(directory, resume: bool, seed: int):
        plan = CheckpointPlan(directory, every=1, keep=4, resume=resume)
        return _train_with_projection(narrow, teacher, blocks, 4, seed, checkpoints=plan)

    straight, projection = run(tmp_path / "straight", False, 0)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    for late in ("step-00000003", "step-00000004"):
        shutil.rmtree(tmp_path / "resumed" / late)
    resumed, resumed_projection = run(tmp_path / "resumed", True, 1)
    assert torch.equal(resumed_projection, projection)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(straight.model.norm.weight, narrow.model.norm.weight)


def test_warmup_leaves_a_run_with_projection_unchanged(ids):
    """The plan's warm-up micro-batch discards the projection's gradients too."""
    teacher, narrow = _narrow_pair(ids)
    blocks = torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(4))
    warmups = []
    projections = [
        _train_with_projection(narrow, teacher, blocks, 3, 0, on_warmup=on_warmup)[1]
        for on_warmup in (None, warmups.append)
    ]
    assert len(warmups) == 1
    assert torch.equal(projections[0], projections[1])
