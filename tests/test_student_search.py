"""Depth search (shortgpt, angular, greedy_kl), make_student and the `distill student` command,
against brute-force float64 references on tiny random Llamas."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import make_llama
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from distill.cli import main
from distill.config import StudentConfig, load_config
from distill.errors import ConfigError, ModelError
from distill.student import build_student, calibration_blocks, make_student, search_layers
from distill.student.search import LayerRunner, angular_block, block_influence, greedy_kl_layers

VOCAB = 64


@pytest.fixture
def teacher():
    model = make_llama(VOCAB, layers=5, seed=3)
    with torch.no_grad():  # larger residual updates: the layers differ clearly from each other
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(8.0)
    return model


@pytest.fixture
def blocks():
    return torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))


def reference_kl(teacher, student, ids, positions) -> float:
    """Mean KL(teacher || student) per scored position, float64, from each model's forward."""
    with torch.no_grad():
        t = F.log_softmax(teacher(ids).logits[:, positions].double(), dim=-1)
        s = F.log_softmax(student(ids).logits[:, positions].double(), dim=-1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def hidden_inputs(model, ids) -> list[torch.Tensor]:
    """Input of every layer, then the last layer's output (float64), via plain forward hooks."""
    states = []
    handles = [
        layer.register_forward_hook(lambda m, a, out: states.append(out.double()))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        embeddings = model.model.embed_tokens(ids).double()
        model(ids)
    for handle in handles:
        handle.remove()
    return [embeddings, *states]


def test_calibration_blocks_depend_only_on_seed():
    blocks = torch.arange(40).view(10, 4)
    first = calibration_blocks(blocks, 3, seed=7)
    assert torch.equal(first, calibration_blocks(blocks, 3, seed=7))
    draws = {tuple(calibration_blocks(blocks, 3, seed=s)[:, 0].tolist()) for s in range(6)}
    assert len(draws) > 1
    assert first.shape == (3, 4)
    assert calibration_blocks(blocks, 99, seed=0).shape == (10, 4)
    with pytest.raises(ValueError, match="n="):
        calibration_blocks(blocks, 0, seed=0)


def test_runner_reproduces_built_students(teacher, blocks):
    runner = LayerRunner(teacher, blocks, head_stride=2)
    assert runner.kl(runner.run(range(5))) == pytest.approx(0.0, abs=1e-6)
    for layers in ([0, 2, 4], [1, 3], [4]):
        student = build_student(teacher, layers).eval()
        expected = reference_kl(teacher, student, blocks, runner.positions)
        assert runner.kl(runner.run(layers)) == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_block_influence_matches_float64_reference(teacher, blocks):
    states = hidden_inputs(teacher, blocks)
    expected = [
        1 - float(F.cosine_similarity(x.reshape(-1, 32), y.reshape(-1, 32), dim=-1).mean())
        for x, y in itertools.pairwise(states)
    ]
    got = block_influence(LayerRunner(teacher, blocks))
    assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("n_remove", [1, 2, 4])
def test_angular_block_matches_brute_force(teacher, blocks, n_remove):
    states = hidden_inputs(teacher, blocks)

    def distance(start: int) -> float:
        a, b = states[start].reshape(-1, 32), states[start + n_remove].reshape(-1, 32)
        cos = F.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
        return float(torch.arccos(cos).mean() / torch.pi)

    expected = min(range(5 - n_remove + 1), key=distance)
    assert angular_block(LayerRunner(teacher, blocks), n_remove) == expected


def test_greedy_kl_first_removal_is_the_best_single_removal(teacher, blocks):
    runner = LayerRunner(teacher, blocks)
    kls = {
        drop: reference_kl(
            teacher,
            build_student(teacher, [i for i in range(5) if i != drop]).eval(),
            blocks,
            runner.positions,
        )
        for drop in range(5)
    }
    kept, trace = greedy_kl_layers(runner, 4)
    best = min(kls, key=kls.get)
    assert kept == [i for i in range(5) if i != best]
    assert trace[0] == pytest.approx(kls[best], rel=1e-4)


def test_greedy_kl_follows_the_greedy_path(teacher, blocks):
    """Two removals: the second is the best removal from the first's survivors."""
    runner = LayerRunner(teacher, blocks)
    kept, trace = greedy_kl_layers(runner, 3)
    assert len(trace) == 2 and len(kept) == 3
    first = greedy_kl_layers(runner, 4)[0]
    candidates = [[i for i in first if i != drop] for drop in first]
    scores = [
        reference_kl(teacher, build_student(teacher, c).eval(), blocks, runner.positions)
        for c in candidates
    ]
    assert kept == candidates[min(range(len(scores)), key=scores.__getitem__)]


@pytest.mark.parametrize("method", ["shortgpt", "angular", "greedy_kl"])
def test_search_is_deterministic_and_sized(teacher, blocks, method):
    layers = search_layers(teacher, blocks, 3, method)
    assert layers == sorted(layers) and len(set(layers)) == 3
    assert search_layers(teacher, blocks, 3, method) == layers


def test_shortgpt_keeps_the_most_influential(teacher, blocks):
    influence = block_influence(LayerRunner(teacher, blocks))
    kept = search_layers(teacher, blocks, 2, "shortgpt")
    assert min(influence[i] for i in kept) >= max(influence[i] for i in range(5) if i not in kept)


def test_search_rejects_bad_arguments(teacher, blocks):
    with pytest.raises(ValueError, match="n_keep"):
        search_layers(teacher, blocks, 6, "greedy_kl")
    with pytest.raises(ValueError, match="method"):
        search_layers(teacher, blocks, 2, "magic")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB))
    with pytest.raises(ModelError, match="gpt2"):
        search_layers(gpt2, blocks, 1, "shortgpt")


def test_make_student_searches_from_config(teacher, blocks):
    config = StudentConfig(search="greedy_kl", num_layers=2, search_tokens=8)
    built = make_student(teacher, config, blocks)
    assert built.model.config.num_hidden_layers == 2
    assert built.layers == search_layers(teacher, blocks[:, :8], 2, "greedy_kl")
    default_count = make_student(
        teacher, StudentConfig(search="angular", keep_first=1, keep_last=2), blocks
    )
    assert len(default_count.layers) == 3
    fixed = make_student(teacher, StudentConfig(search="greedy_kl", every_k=2))
    assert fixed.layers == [0, 2, 4]  # an explicit recipe wins over the search
    with pytest.raises(ValueError, match="calibration"):
        make_student(teacher, config)
    with pytest.raises(ConfigError, match="num_layers"):
        make_student(teacher, StudentConfig(search="shortgpt", num_layers=9), blocks)


def test_config_accepts_search_and_width_keys():
    config = load_config(
        overrides=[
            "student.search=angular",
            "student.num_layers=15",
            "student.ffn=1024",
            "student.heads=6",
        ]
    )
    assert config.student.search == "angular" and config.student.ffn == 1024
    with pytest.raises(ConfigError, match="student.search"):
        load_config(overrides=["student.search=random"])


def test_student_command_writes_a_loadable_student(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "student"
    main(
        [
            "student",
            "--teacher",
            str(tiny_teacher_dir),
            "--layers",
            "2",
            "--ffn",
            "32",
            "--set",
            "data.block_size=32",
            "--set",
            "student.calibration_blocks=2",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "student/teacher" in printed and "FLOPs/token" in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and model.config.intermediate_size == 32
    ratio_line = next(line for line in printed.splitlines() if line.startswith("student/"))
    assert all(0 < float(x) < 1 for x in ratio_line.split()[1:])


def test_student_command_rejects_bad_width_in_one_line(tiny_teacher_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "student",
                "--teacher",
                str(tiny_teacher_dir),
                "--heads",
                "3",
                "--set",
                "student.layers=[0,1]",
                "--set",
                "data.block_size=32",
                "--out",
                str(tmp_path / "s"),
            ]
        )
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err.splitlines()
    error = [line for line in stderr if line.startswith("distill: error")]
    assert len(error) == 1 and "heads=3" in error[0] and "grouped-query" in error[0]
    assert not (tmp_path / "s").exists()
