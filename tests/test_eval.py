"""distill eval: held-out quality vs float64 references, the multiple-choice scorer by hand,
the shipped task, the end-to-end suite on tiny models, and its one-line errors."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import make_llama, make_tokenizer, make_wordpiece_tokenizer, save_model

import distill.pipelines.eval as eval_pipeline
from distill import distill
from distill.cli import main
from distill.compress.store import model_bytes
from distill.compress.store import save_model as save_compressed
from distill.config import load_config
from distill.errors import DataError
from distill.evaluate.bits_per_byte import bits_per_byte, text_pieces
from distill.evaluate.choice import (
    Question,
    choice_logprobs,
    default_task_path,
    multiple_choice_accuracy,
    read_questions,
)
from distill.evaluate.heldout import heldout_quality
from distill.models import load_causal_lm
from distill.pipelines.eval import evaluate_models, format_tables, retention
from distill.pipelines.training_data import split_texts
from distill.teacher import LiveTeacher


def reference_quality(teacher_logits, logits, input_ids):
    """Token by token in Python floats (float64): ppl, KL(teacher||model), top-1/top-5 agreement."""
    nll = kl = agree = agree5 = 0.0
    count = 0
    for b in range(input_ids.shape[0]):
        for t in range(input_ids.shape[1] - 1):
            target = int(input_ids[b, t + 1])
            p_row = [float(x) for x in teacher_logits[b, t]]
            q_row = [float(x) for x in logits[b, t]]
            p_log_z = math.log(sum(math.exp(x - max(p_row)) for x in p_row)) + max(p_row)
            q_log_z = math.log(sum(math.exp(x - max(q_row)) for x in q_row)) + max(q_row)
            log_p = [x - p_log_z for x in p_row]
            log_q = [x - q_log_z for x in q_row]
            nll -= log_q[target]
            kl += sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q, strict=True))
            teacher_top = max(range(len(p_row)), key=p_row.__getitem__)
            ranked = sorted(range(len(q_row)), key=q_row.__getitem__, reverse=True)
            agree += ranked[0] == teacher_top
            agree5 += teacher_top in ranked[:5]
            count += 1
    return {
        "perplexity": math.exp(nll / count),
        "kl_to_teacher": kl / count,
        "top1_agreement": agree / count,
        "top5_agreement": agree5 / count,
    }


def test_heldout_quality_matches_float64_reference():
    vocab = 40
    teacher = make_llama(vocab, layers=2, hidden=16, seed=1)
    student = make_llama(vocab, layers=1, hidden=16, seed=2)
    blocks = torch.randint(0, vocab, (3, 12), generator=torch.Generator().manual_seed(0))
    got = heldout_quality(
        {"student": student}, LiveTeacher(teacher, vocab), blocks, vocab_rows=vocab, batch_size=2
    )
    with torch.no_grad():
        teacher_logits = teacher(blocks).logits
        student_logits = student(blocks).logits
    expected = reference_quality(teacher_logits, student_logits, blocks)
    for key, value in expected.items():  # float32 logits, float64 sums: 1e-6 relative
        assert got["student"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert got["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-12)
    assert got["teacher"]["top5_agreement"] == 1.0
    assert got["student"]["top1_agreement"] < 1.0  # a different random model disagrees somewhere


class BigramModel(torch.nn.Module):
    """Next-token probabilities depend on the previous token only (hand-checkable)."""

    PROBS = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.PROBS.log()[input_ids].float())


class CharTokenizer:
    """'y' -> 1, 'z' -> 2, every other character -> 0."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [{"y": 1, "z": 2}.get(ch, 0) for ch in text]}


def test_choice_logprobs_hand_checked():
    scores = choice_logprobs(BigramModel(), [0], [[1], [2, 2], [1, 1]], vocab_rows=3)
    # p(1|0) = .25; p(2|0) p(2|2) = .25 * .6; p(1|0) p(1|1) = .25 * .8
    assert scores == pytest.approx([math.log(0.25), math.log(0.15), math.log(0.2)], abs=1e-6)


def test_accuracy_and_length_normalised_accuracy_hand_checked():
    # context ends in ':' (token 0). " y" = [0, 1]: log(.5 * .25) = -2.079, per byte (2) -1.040.
    # " zz" = [0, 2, 2]: log(.5 * .25 * .6) = -2.590, per byte (3) -0.863.
    # acc picks " y" (the answer), acc_norm picks " zz".
    question = Question("q", ["y", "zz"], answer=0)
    result = multiple_choice_accuracy(BigramModel(), CharTokenizer(), [question], vocab_rows=3)
    assert result == {"mc_accuracy": 1.0, "mc_accuracy_norm": 0.0, "mc_questions": 1}


def test_shipped_task_has_200_valid_questions():
    questions = read_questions(default_task_path())
    assert len(questions) >= 200
    assert len({q.question for q in questions}) == len(questions)
    positions = {q.answer for q in questions}
    assert positions == {0, 1, 2, 3}  # the right answer is not always in the same place


def test_bad_task_rows_are_named(tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text('{"question": "q", "choices": ["a", "b"], "answer": 5}\n')
    with pytest.raises(DataError, match="task.jsonl:1"):
        read_questions(task)


def test_retention_orientation():
    metrics = {
        "teacher": {"perplexity": 10.0, "mc_accuracy": 0.5, "ttft_s": 0.2},
        "s": {"perplexity": 20.0, "mc_accuracy": 0.4, "ttft_s": 0.1},
    }
    assert retention(metrics)["s"] == pytest.approx(
        {"perplexity": 50.0, "mc_accuracy": 80.0, "ttft_s": 200.0}
    )


@pytest.fixture
def eval_data(tmp_path):
    from distill.data import default_documents

    path = tmp_path / "data.txt"
    path.write_text("\n\n".join(default_documents()[:30]))
    task = tmp_path / "task.jsonl"
    task.write_text(
        "".join(line + "\n" for line in default_task_path().read_text().splitlines()[:4])
    )
    return path, task


def test_evaluate_models_end_to_end(tmp_path, tiny_teacher_dir, tiny_tokenizer, eval_data):
    data, task = eval_data
    student = make_llama(len(tiny_tokenizer), layers=2, seed=3)
    int8_dir = save_compressed(student, tiny_tokenizer, tmp_path / "student_int8", quantize="int8")
    config = load_config(
        overrides=[
            f"teacher.path={tiny_teacher_dir}",
            f"data.path={data}",
            "data.block_size=32",
            "eval.max_blocks=4",
            f"eval.mc_task={task}",
            "eval.gen_prompts=['def f']",
            "eval.gen_new_tokens=3",
            "eval.gen_batch_sizes=[1, 8]",
            "eval.gen_runs=1",
        ]
    )
    result = evaluate_models([str(int8_dir)], config)
    rows = result["models"]
    assert set(rows) == {"teacher", "student_int8"}
    teacher, int8 = rows["teacher"], rows["student_int8"]
    # The teacher against itself, the (other, random) student against the teacher.
    assert teacher["kl_to_teacher"] == pytest.approx(0.0, abs=1e-9)
    assert teacher["top5_agreement"] == 1.0 and int8["top5_agreement"] < 1.0
    assert int8["kl_to_teacher"] > 1e-3
    assert int8["perplexity"] != pytest.approx(teacher["perplexity"], rel=1e-3)
    assert teacher["params"] == sum(
        p.numel() for p in load_causal_lm(tiny_teacher_dir).parameters()
    )
    for row in rows.values():
        # a share of the 4 questions; measurements taken (a skipped one is None or 0)
        assert row["mc_accuracy"] * 4 == pytest.approx(round(row["mc_accuracy"] * 4))
        for key in ("tokens_per_s_batch1", "tokens_per_s_batch8", "ttft_s", "peak_rss_bytes"):
            assert row[key] > 0, key
    assert rows["student_int8"]["bytes"] == (int8_dir / "model.safetensors").stat().st_size
    assert rows["student_int8"]["params"] == sum(p.numel() for p in student.parameters())
    assert rows["teacher"]["bytes"] == model_bytes(tiny_teacher_dir)
    assert rows["student_int8"]["mc_questions"] == 4
    assert set(result["retention"]) == {"student_int8"}
    assert "retention" in format_tables(result)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("distill: error")]
    assert len(lines) == 1, err
    return lines[0]


def test_eval_cli_missing_model_exits_2(tmp_path, tiny_teacher_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path / "nope"), "--teacher", str(tiny_teacher_dir), "--no-speed"])
    assert exit_info.value.code == 2
    assert "nope" in _one_error_line(capsys)


def test_eval_scores_another_vocabulary_per_byte(tmp_path, tiny_teacher_dir, eval_data):
    """A byte-level model of another vocabulary: bits per byte and multiple choice with its own
    tokenizer; KL and agreement absent, saying why."""
    data, task = eval_data
    other_tokenizer = make_tokenizer(vocab_size=300)
    other = save_model(make_llama(len(other_tokenizer)), other_tokenizer, tmp_path / "other")
    config = load_config(
        overrides=[
            f"teacher.path={tiny_teacher_dir}",
            f"data.path={data}",
            "data.block_size=32",
            "eval.max_blocks=2",
            f"eval.mc_task={task}",
            "eval.speed=false",
            "eval.bpb_bytes=1500",
        ]
    )
    result = evaluate_models([str(other)], config)
    teacher, row = result["models"]["teacher"], result["models"]["other"]
    assert "kl_to_teacher" not in row and "perplexity" not in row
    assert "another vocabulary" in row["token_metrics_absent"]
    assert row["mc_questions"] == 4 and 0 <= row["mc_accuracy"] <= 1
    texts = text_pieces(split_texts(config)[1], 1500, 4 * 32)
    assert result["settings"]["bits_per_byte_bytes"] == sum(len(t.encode()) for t in texts)
    expected = bits_per_byte(load_causal_lm(other), other_tokenizer, texts)["bits_per_byte"]
    assert row["bits_per_byte"] == pytest.approx(expected, rel=1e-6)
    assert teacher["bits_per_byte"] > 0 and teacher["kl_to_teacher"] == pytest.approx(0, abs=1e-9)
    assert result["retention"]["other"]["bits_per_byte"] == pytest.approx(
        100 * teacher["bits_per_byte"] / row["bits_per_byte"]
    )
    table = format_tables(result)
    assert "| other | " in table and "n/a" in table and "another vocabulary" in table


def test_eval_cli_unsupported_tokenizer_pair_exits_2_before_loading(
    tmp_path, tiny_teacher_dir, capsys, monkeypatch
):
    wordpiece = make_wordpiece_tokenizer()
    other = save_model(make_llama(len(wordpiece)), wordpiece, tmp_path / "bert")

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the tokenizers were refused")

    monkeypatch.setattr(eval_pipeline, "load_teacher", refuse)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(other), "--teacher", str(tiny_teacher_dir), "--no-speed"])
    assert exit_info.value.code == 2
    line = _one_error_line(capsys)
    assert "unsupported tokenizer pair" in line and "WordPiece" in line
    assert str(tiny_teacher_dir) in line and str(other) in line


def test_eval_cli_writes_json(tmp_path, tiny_teacher_dir, tiny_tokenizer, eval_data, capsys):
    data, task = eval_data
    student = save_model(make_llama(len(tiny_tokenizer), layers=1), tiny_tokenizer, tmp_path / "s")
    out = tmp_path / "eval.json"
    main(
        [
            "eval",
            str(student),
            "--teacher",
            str(tiny_teacher_dir),
            "--data",
            str(data),
            "--block-size",
            "32",
            "--max-blocks",
            "2",
            "--task",
            str(task),
            "--no-speed",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    models = result["models"]
    assert models["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-9)
    assert models["s"]["kl_to_teacher"] > 1e-3  # another (1-layer, random) model
    assert models["s"]["perplexity"] != pytest.approx(models["teacher"]["perplexity"], rel=1e-3)
    assert "| s |" in capsys.readouterr().out


def test_eval_takes_config_and_set_and_scores_a_run_student_as_the_run_did(
    tmp_path, tiny_run_config, capsys
):
    """``distill eval --config/--set``: the schema's settings, the same held-out split and the
    same numbers as the run's own report for its student and teacher (float32, same blocks)."""
    config = {**tiny_run_config, "eval": {**tiny_run_config["eval"], "speed": False}}
    run = distill(config)
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "eval.json"
    main(["eval", str(run.run_dir / "student"), "--config", str(path), "--set", "eval.speed=false"])
    main(
        [
            "eval",
            str(run.run_dir / "student"),
            "--config",
            str(path),
            "--no-speed",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert result["settings"]["eval"]["max_blocks"] == config["eval"]["max_blocks"]
    reported = run.report["models"]
    for name, row in (("teacher", "teacher"), ("student", "student_after")):
        for key in ("perplexity", "kl_to_teacher", "top1_agreement", "bits_per_byte"):
            assert result["models"][name][key] == pytest.approx(
                reported[row][key], rel=1e-4, abs=1e-6
            ), (
                name,
                key,
            )
