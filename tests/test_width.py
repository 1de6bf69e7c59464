"""Width pruning: identity when nothing is pruned, exact teacher slices, grouped-query attention
kept consistent, deterministic importance; Llama, Mistral and Qwen2."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llama
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    Qwen2Config,
)

from distill.config import StudentConfig
from distill.errors import ConfigError, ModelError
from distill.student import WidthTargets, make_student, measure_importance, prune_width
from distill.student.width import top_indices

VOCAB = 64
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def make_model(kind: str):
    torch.manual_seed(11)
    if kind == "llama":
        return make_llama(VOCAB, layers=2, seed=11)
    config = MistralConfig(**SIZES) if kind == "mistral" else Qwen2Config(**SIZES)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_nothing_pruned_equals_the_teacher(kind, ids):
    teacher = make_model(kind)
    student = prune_width(teacher, measure_importance(teacher, ids), WidthTargets())
    assert type(student) is type(teacher)
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_kept_weights_are_exact_teacher_slices(kind, ids):
    teacher = make_model(kind)
    importance = measure_importance(teacher, ids)
    student = prune_width(teacher, importance, WidthTargets(ffn=24, heads=2, kv_heads=1, hidden=20))
    assert (student.config.intermediate_size, student.config.hidden_size) == (24, 20)
    assert (student.config.num_attention_heads, student.config.num_key_value_heads) == (2, 1)
    hidden = top_indices(importance.hidden, 20)
    torch.testing.assert_close(
        student.model.embed_tokens.weight,
        teacher.model.embed_tokens.weight[:, hidden],
        rtol=0,
        atol=0,
    )
    for i, (s_layer, t_layer) in enumerate(
        zip(student.model.layers, teacher.model.layers, strict=True)
    ):
        group = int(importance.heads[i].view(2, 2).sum(1).argmax())
        queries = (group * 2 + top_indices(importance.heads[i].view(2, 2)[group], 2)).tolist()
        q_rows = [h * 8 + d for h in queries for d in range(8)]
        kv_rows = [group * 8 + d for d in range(8)]
        ffn = top_indices(importance.ffn[i], 24)
        pairs = [
            (s_layer.self_attn.q_proj.weight, t_layer.self_attn.q_proj.weight[q_rows][:, hidden]),
            (s_layer.self_attn.k_proj.weight, t_layer.self_attn.k_proj.weight[kv_rows][:, hidden]),
            (s_layer.self_attn.v_proj.weight, t_layer.self_attn.v_proj.weight[kv_rows][:, hidden]),
            (s_layer.self_attn.o_proj.weight, t_layer.self_attn.o_proj.weight[hidden][:, q_rows]),
            (s_layer.mlp.gate_proj.weight, t_layer.mlp.gate_proj.weight[ffn][:, hidden]),
            (s_layer.mlp.down_proj.weight, t_layer.mlp.down_proj.weight[hidden][:, ffn]),
            (s_layer.input_layernorm.weight, t_layer.input_layernorm.weight[hidden]),
        ]
        if kind == "qwen2":
            pairs.append((s_layer.self_attn.k_proj.bias, t_layer.self_attn.k_proj.bias[kv_rows]))
        for got, expected in pairs:
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def masked_teacher(teacher, importance, q_keep, ffn_keep):
    """The teacher with the dropped query heads' o_proj columns and MLP channels zeroed."""
    masked = make_model("llama")
    masked.load_state_dict(teacher.state_dict())
    head_dim = teacher.config.head_dim
    with torch.no_grad():
        for i, layer in enumerate(masked.model.layers):
            per_group = importance.heads[i].view(2, 2)
            group = int(per_group.sum(1).argmax())
            kept = set((group * 2 + top_indices(per_group[group], q_keep)).tolist())
            for head in set(range(4)) - kept:
                layer.self_attn.o_proj.weight[:, head * head_dim : (head + 1) * head_dim] = 0
            dropped = sorted(
                set(range(64)) - set(top_indices(importance.ffn[i], ffn_keep).tolist())
            )
            layer.mlp.down_proj.weight[:, dropped] = 0
    return masked


@pytest.mark.parametrize("q_keep", [1, 2])
def test_grouped_query_attention_stays_consistent(ids, q_keep):
    """Dropping a whole key/value group and query heads inside the kept one computes exactly
    what the teacher computes with those heads' outputs (and dropped MLP channels) zeroed."""
    teacher = make_model("llama")
    importance = measure_importance(teacher, ids)
    student = prune_width(teacher, importance, WidthTargets(ffn=40, heads=q_keep, kv_heads=1))
    masked = masked_teacher(teacher, importance, q_keep, 40)
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, masked(ids).logits, rtol=1e-5, atol=1e-5)


def test_importance_is_deterministic_and_measured(ids):
    teacher = make_model("llama")
    first, second = measure_importance(teacher, ids), measure_importance(teacher, ids)
    for a, b in zip(
        first.heads + first.ffn + [first.hidden],
        second.heads + second.ffn + [second.hidden],
        strict=True,
    ):
        assert torch.equal(a, b)
    with torch.no_grad():  # a head whose values are zero has zero importance
        teacher.model.layers[0].self_attn.v_proj.weight[:8] = 0
    assert float(measure_importance(teacher, ids).heads[0][:2].sum()) == 0.0
    assert float(first.heads[0][:2].sum()) > 0.0


def test_reference_head_importance(ids):
    """Head importance = mean over tokens of the L2 norm of the head's o_proj input (float64)."""
    teacher = make_model("llama")
    captured = []
    handle = teacher.model.layers[1].self_attn.o_proj.register_forward_pre_hook(
        lambda m, args: captured.append(args[0].double())
    )
    with torch.no_grad():
        teacher(ids)
    handle.remove()
    per_head = captured[0].view(2, 10, 4, 8)
    expected = torch.stack([per_head[..., h, :].norm(dim=-1).mean() for h in range(4)])
    torch.testing.assert_close(
        measure_importance(teacher, ids).heads[1], expected, rtol=1e-10, atol=0
    )


def test_width_errors(ids):
    teacher = make_model("llama")
    importance = measure_importance(teacher, ids)
    with pytest.raises(ValueError, match="heads=3"):
        prune_width(teacher, importance, WidthTargets(heads=3, kv_heads=2))
    with pytest.raises(ValueError, match="ffn=65"):
        prune_width(teacher, importance, WidthTargets(ffn=65))
    with pytest.raises(ConfigError, match="student width"):
        make_student(teacher, StudentConfig(layers=[0, 1], heads=6), ids)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB))
    with pytest.raises(ModelError, match="model_type 'gpt2'"):
        measure_importance(gpt2, ids)


def test_depth_then_width_from_config(ids):
    teacher = make_model("mistral")
    built = make_student(teacher, StudentConfig(layers=[1], ffn=16, hidden=24), ids)
    assert built.layers == [1]
    config = built.model.config
    assert (config.num_hidden_layers, config.intermediate_size, config.hidden_size) == (1, 16, 24)
    with torch.no_grad():
        assert torch.isfinite(built.model(ids).logits).all()
