"""Students with a vocabulary of their own: the trained tokenizer, rows initialised from the
teacher's (against a hand-computed float64 reference), the saved student reloading with plain
transformers, and the one-line refusals (unsupported tokenizers, a run without a
cross-tokenizer loss)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    CHATML_TEMPLATE,
    make_chat_tokenizer,
    make_llama,
    make_wordpiece_tokenizer,
    save_model,
)
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import distill.pipelines.run_models as run_models
from distill import distill
from distill.cli import main
from distill.config import load_config
from distill.data import default_documents
from distill.data.alignment import check_byte_level, check_tokenizer_pair
from distill.errors import ConfigError, ModelError
from distill.pipelines.training_data import corpus_training_texts, split_texts
from distill.student.vocab import build_vocabulary, initial_rows, resize_vocabulary, row_sources

ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte characters


def byte_level_tokenizer(specials: list[str], merges: list[tuple[str, str]]):
    """A hand-made byte-level BPE: the specials, the 256 byte characters, then one token per
    merge, in that id order."""
    vocab = {token: i for i, token in enumerate(specials)}
    for char in ALPHABET:
        vocab[char] = len(vocab)
    for left, right in merges:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=specials[-1])


TEACHER = byte_level_tokenizer(["<|endoftext|>"], [("Ġ", "t"), ("h", "e")])
# Other specials, in another order; two merges the teacher lacks (" the" and "é").
STUDENT = byte_level_tokenizer(
    ["<|im_end|>", "<|endoftext|>"], [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ã", "©")]
)


def hand_sources() -> dict[str, list[str]]:
    """Teacher tokens each student token's row comes from, worked out by hand."""
    sources = {char: [char] for char in ALPHABET}  # every byte: copied
    sources |= {"<|endoftext|>": ["<|endoftext|>"], "Ġt": ["Ġt"], "he": ["he"]}  # copied
    sources["Ġthe"] = ["Ġt", "he"]  # the teacher has no " the": its two tokens, averaged
    sources["Ã©"] = ["Ã", "©"]  # "é" is two bytes for the teacher
    sources["<|im_end|>"] = list("<|im_end|>")  # a special the teacher lacks: its characters
    return sources


def reference_rows(teacher_rows: torch.Tensor) -> list[list[float]]:
    """Student rows in Python floats: the plain mean of each hand source's teacher rows."""
    teacher_vocab, student_vocab = TEACHER.get_vocab(), STUDENT.get_vocab()
    table = teacher_rows.double().tolist()
    rows: list[list[float]] = [[] for _ in student_vocab]
    for token, teacher_tokens in hand_sources().items():
        picked = [table[teacher_vocab[t]] for t in teacher_tokens]
        rows[student_vocab[token]] = [sum(col) / len(picked) for col in zip(*picked, strict=True)]
    return rows


def test_row_sources_match_the_hand_worked_tokenisations():
    teacher_vocab, student_vocab = TEACHER.get_vocab(), STUDENT.get_vocab()
    sources = row_sources(TEACHER, STUDENT)
    assert len(sources) == len(student_vocab) == 2 + 256 + 4
    for token, teacher_tokens in hand_sources().items():
        assert sources[student_vocab[token]] == [teacher_vocab[t] for t in teacher_tokens], token


def untied_llama(vocab: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_resized_rows_match_float64_reference(tied):
    teacher_vocab = len(TEACHER)
    model = make_llama(teacher_vocab, layers=1, hidden=16) if tied else untied_llama(teacher_vocab)
    embedding = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings().weight.detach().clone()
    stats = resize_vocabulary(model, TEACHER, STUDENT)
    assert stats == {"copied": 256 + 3, "averaged": 3, "fallback": 0}
    new_embedding = model.get_input_embeddings().weight.detach()
    new_head = model.get_output_embeddings().weight.detach()
    assert new_embedding.shape == (len(STUDENT), 16) and model.config.vocab_size == len(STUDENT)
    # float32 storage of float64 means: 1e-6 relative to the rows' scale
    expected = torch.tensor(reference_rows(embedding), dtype=torch.float64)
    torch.testing.assert_close(new_embedding.double(), expected, rtol=1e-6, atol=1e-7)
    if tied:
        assert new_head.data_ptr() == new_embedding.data_ptr()
    else:
        expected_head = torch.tensor(reference_rows(head), dtype=torch.float64)
        torch.testing.assert_close(new_head.double(), expected_head, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(new_head, new_embedding)
    assert model.config.eos_token_id == STUDENT.eos_token_id == 1
    ids = torch.tensor([STUDENT(" the é")["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], len(STUDENT))


def test_initial_rows_without_a_source_take_the_mean_of_all_teacher_rows():
    teacher_rows = torch.randn(5, 3)
    rows = initial_rows(teacher_rows, [[4], [], [0, 2]])
    torch.testing.assert_close(rows[0], teacher_rows[4].double())
    torch.testing.assert_close(rows[1], teacher_rows.double().mean(dim=0))
    torch.testing.assert_close(rows[2], (teacher_rows[0].double() + teacher_rows[2]) / 2)


def test_trained_vocabulary_is_deterministic_and_keeps_the_teachers_specials():
    teacher = make_chat_tokenizer()
    texts = default_documents()[20:40]
    first = build_vocabulary(texts, 320, teacher)
    second = build_vocabulary(texts, 320, teacher)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert len(first) == 320 and first.get_vocab() != teacher.get_vocab()
    for role in ("eos_token", "pad_token", "bos_token"):
        assert getattr(first, role) == getattr(teacher, role)
    assert first.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert first.chat_template == CHATML_TEMPLATE
    messages = [{"role": "user", "content": "Define a class"}]
    rendered = first.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == teacher.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    ids = first(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 1  # the chat markers are single special tokens
    text = "Exceptions are raised: naïve café ünïcode \U0001f600"
    assert first.decode(first(text)["input_ids"]) == text  # every byte is a token


def test_too_small_a_vocabulary_is_named():
    with pytest.raises(ConfigError, match=r"train_vocab=258.*3 special tokens"):
        build_vocabulary(["abc"], 258, make_chat_tokenizer())


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE: spaces become '▁', unknown bytes fall back to <0x..> tokens."""
    vocab = {"<unk>": 0, "<0x41>": 1, "▁": 2, "a": 3}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_check_byte_level_names_the_tokenizer_and_why():
    check_byte_level(TEACHER, "teacher")  # byte-level BPE: accepted
    with pytest.raises(ModelError) as err:
        check_byte_level(make_wordpiece_tokenizer(), "students/bert")
    message = str(err.value)
    assert "\n" not in message and "students/bert" in message and "WordPiece" in message
    with pytest.raises(ModelError, match="byte fallback"):
        check_byte_level(metaspace_tokenizer(), "llama2")


def test_check_tokenizer_pair_names_both():
    check_tokenizer_pair(TEACHER, STUDENT)
    with pytest.raises(ModelError) as err:
        check_tokenizer_pair(TEACHER, make_wordpiece_tokenizer(), "models/t", "tok/bert")
    message = str(err.value)
    assert "\n" not in message and "models/t" in message and "tok/bert" in message
    assert "unsupported tokenizer pair" in message


def test_student_command_trains_a_vocabulary_and_the_student_reloads_with_transformers(
    tiny_chat_teacher_dir, tiny_chat_tokenizer, tmp_path, capsys
):
    out = tmp_path / "student"
    overrides = ["student.layers=[0]", "student.tokenizer.train_vocab=320", "data.block_size=32"]
    main(
        ["student", "--teacher", str(tiny_chat_teacher_dir), "--out", str(out)]
        + [arg for item in overrides for arg in ("--set", item)]
    )
    assert "student vocabulary: 320 tokens of its own (teacher 384)" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 320 and tokenizer.get_vocab() != tiny_chat_tokenizer.get_vocab()
    assert model.get_input_embeddings().weight.shape[0] == 320
    assert model.config.eos_token_id == tokenizer.eos_token_id
    text = "A class definition"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() != tiny_chat_tokenizer(text, return_tensors="pt").input_ids.tolist()
    assert tokenizer.decode(ids[0]) == text
    output = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert output.shape == (1, ids.shape[1] + 3) and int(output.max()) < 320
    assert tokenizer.chat_template == tiny_chat_tokenizer.chat_template


def test_student_command_takes_a_given_tokenizer(tiny_teacher_dir, tmp_path):
    given = make_chat_tokenizer(vocab_size=300)
    given.save_pretrained(tmp_path / "tok")
    out = tmp_path / "student"
    main(
        [
            "student",
            "--teacher",
            str(tiny_teacher_dir),
            "--out",
            str(out),
            "--set",
            "student.layers=[0]",
            "--set",
            f"student.tokenizer.path={tmp_path / 'tok'}",
            "--set",
            "data.block_size=32",
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == given.get_vocab()
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 300


def test_unsupported_given_tokenizer_fails_before_any_model_loads(
    tiny_teacher_dir, tmp_path, capsys, monkeypatch
):
    make_wordpiece_tokenizer().save_pretrained(tmp_path / "bert")

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher's weights were loaded before the tokenizer was refused")

    monkeypatch.setattr(run_models, "load_teacher", refuse)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "student",
                "--teacher",
                str(tiny_teacher_dir),
                "--out",
                str(tmp_path / "s"),
                "--set",
                f"student.tokenizer.path={tmp_path / 'bert'}",
            ]
        )
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1, errors
    assert str(tiny_teacher_dir) in errors[0] and str(tmp_path / "bert") in errors[0]
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["student.tokenizer.path=t", "student.tokenizer.train_vocab=512"], "only one of"),
        (["student.path=s", "student.tokenizer.train_vocab=512"], "unset one of them"),
        (["task=embedding", "student.tokenizer.train_vocab=512"], "task embedding"),
        (["student.tokenizer.train_vocab=100"], "greater than or equal to 256"),
    ],
)
def test_tokenizer_keys_are_checked_when_the_config_loads(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(overrides=overrides)


def test_run_with_a_new_vocabulary_needs_a_cross_tokenizer_loss(tmp_path, monkeypatch):
    """Refused with one line before any model loads (the cross-tokenizer loss is
    loss.cross_tokenizer); building such a student (distill student) is allowed."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the run was refused")

    monkeypatch.setattr(run_models, "load_teacher", refuse)
    monkeypatch.setattr(run_models, "load_teacher_tokenizer", refuse)
    config = {"output_dir": str(tmp_path), "student": {"tokenizer": {"train_vocab": 8192}}}
    load_config(base=config)  # the config itself is valid
    with pytest.raises(ConfigError) as err:
        distill(config)
    message = str(err.value)
    assert "\n" not in message
    assert "student.tokenizer.train_vocab=8192" in message and "loss.cross_tokenizer" in message
    assert not (tmp_path / "default").exists()


def test_a_saved_student_with_its_own_tokenizer_round_trips(tmp_path):
    """save_model from conftest + plain transformers: the resized tiny student reloads with the
    same logits."""
    model = make_llama(len(TEACHER), layers=1, hidden=16)
    resize_vocabulary(model, TEACHER, STUDENT)
    save_model(model, STUDENT, tmp_path / "s")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "s")
    ids = torch.tensor([tokenizer(" the é")["input_ids"]])
    assert ids.tolist() == [STUDENT(" the é")["input_ids"]]
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_run_with_a_new_vocabulary_trains_across_tokenizers_and_compares_per_byte(
    tiny_run_config, tiny_tokenizer
):
    """distill run with a trained vocabulary and the hybrid loss: the student is built from the
    teacher's layers, trained on byte-aligned groups for 3 steps, saved with its own tokenizer
    (plain transformers reload it), and the report compares every model per byte (token-level
    metrics n/a, with the reason)."""
    config = {
        **tiny_run_config,
        "student": {**tiny_run_config["student"], "tokenizer": {"train_vocab": 300}},
        "loss": {"cross_tokenizer": "hybrid"},
        "eval": {**tiny_run_config["eval"], "speed": False, "sample_prompts": 2},
        "baseline": True,
    }
    result = distill(config)
    run_dir = result.run_dir
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["divergence"] > 0 for r in records)
    student_dir = run_dir / "student"
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    assert len(tokenizer) == 300 and tokenizer.get_vocab() != tiny_tokenizer.get_vocab()
    assert model.get_input_embeddings().weight.shape[0] == 300
    text = "A class definition"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() != tiny_tokenizer(text, return_tensors="pt").input_ids.tolist()
    assert tokenizer.decode(ids[0]) == text
    torch.testing.assert_close(model(ids).logits, result.student.cpu()(ids).logits)
    models = result.report["models"]
    for name in ("teacher", "student_before", "student_after", "student_labels_only"):
        assert models[name]["bits_per_byte"] > 0, name
        assert models[name]["teacher_sample_bpb"] > 0, name
    for name in ("student_before", "student_after", "student_labels_only"):
        assert "kl_to_teacher" not in models[name] and "perplexity" not in models[name]
        assert "another vocabulary" in models[name]["token_metrics_absent"]
    assert models["student_after"]["bits_per_byte"] != models["student_before"]["bits_per_byte"]
    markdown = (run_dir / "report.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| model |"))
    assert "bits/byte (held-out text)" in header and "KL(" not in header  # no token columns
    assert "n/a for student_before, student_after, student_labels_only: another vocabulary" in (
        markdown
    )
    verdict = result.report["verdict"]
    assert "its own vocabulary" in verdict and "held-out bits per byte" in verdict
    assert f"teacher {models['teacher']['bits_per_byte']:.3f}" in verdict
    page = (run_dir / "report.html").read_text()
    assert 'data-key="bits_per_byte"' in page and "<p>n/a: another vocabulary" in page
    extra = result.report["extra_sets"]["other_domain"]["models"]
    assert extra["student_after"]["bits_per_byte"] > 0 and extra["teacher"]["bits_per_byte"] > 0


def test_vocabulary_is_trained_on_the_training_split_only(tmp_path):
    train, held = split_texts(load_config())
    assert corpus_training_texts(load_config()) == train
    assert sorted(train + held) == sorted(default_documents()) and not set(train) & set(held)
    rows = tmp_path / "chat.jsonl"
    chats = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(20)
    ]
    rows.write_text("".join(json.dumps(row) + "\n" for row in chats))
    train, held = split_texts(load_config(overrides=[f"data.path={rows}"]))
    assert len(train) + len(held) == 20 and held
    assert sorted(train + held) == sorted(f"q{i}\na" for i in range(20))


def test_trained_vocabulary_adds_the_special_tokens_the_teacher_adds():
    """A teacher that starts every text with a BOS (Llama 3 style): so does the new tokenizer."""
    teacher = byte_level_tokenizer(["<|begin|>", "<|end|>"], [("Ġ", "t")])
    teacher.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin|> $A", pair="<|begin|> $A <|begin|> $B:1", special_tokens=[("<|begin|>", 0)]
    )
    teacher.bos_token = "<|begin|>"
    assert teacher("the")["input_ids"][0] == 0
    trained = build_vocabulary(default_documents()[:10], 300, teacher)
    ids = trained("the cat")["input_ids"]
    assert ids[0] == trained.convert_tokens_to_ids("<|begin|>") == 0
    assert trained("the cat", add_special_tokens=False)["input_ids"] == ids[1:]
