"""Sampling with the KV cache, and ``distill generate`` (sequence-level KD data): records,
settings sidecar, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_llama
from transformers import LlamaForCausalLM

from distill.config import load_config
from distill.data import read_documents, split_documents
from distill.data.examples import detect_format, encode_examples, read_rows
from distill.data.prompts import default_prompts_path, read_prompts
from distill.errors import ConfigError, DataError
from distill.pipelines.generate import _batches, generate_responses
from distill.sampling import Sampling, sample_continuations


@pytest.fixture
def one_thread():
    """Generation in this process on one thread, as the CLI runs with train.threads=1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(teacher: Path, prompts: Path, output: Path, *extra: str):
    return load_config(
        None,
        [
            f"teacher.path={teacher}",
            f"generate.prompts={prompts}",
            f"generate.output={output}",
            "train.threads=1",
            "train.device=cpu",
            *extra,
        ],
    )


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _write_txt_prompts(path: Path, n: int) -> Path:
    topics = ["lists", "loops", "classes", "files", "tests", "strings", "numbers", "errors"]
    lines = [f"Explain {topics[i % len(topics)]} in Python{'!' * (i % 5)}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- sample_continuations -------------------------------------------------------------------


def test_sampling_respects_max_new_tokens_and_stops_after_eos(tiny_tokenizer):
    model = make_llama(len(tiny_tokenizer), layers=2)
    prompt = tiny_tokenizer("def add(a, b):", add_special_tokens=False)["input_ids"]
    greedy = Sampling(max_new_tokens=7, temperature=0.0)
    [free] = sample_continuations(model, [prompt], greedy, eos_token_id=None, pad_token_id=0)
    assert len(free) == 7
    eos = free[2]  # pretend the third generated token ends the sequence
    cut = free.index(eos) + 1
    assert cut < 7
    [stopped] = sample_continuations(model, [prompt], greedy, eos_token_id=eos, pad_token_id=0)
    assert stopped == free[:cut]  # the same greedy path, cut right after the EOS (included)
    assert stopped[-1] == eos


def test_left_padded_batch_matches_each_prompt_alone(tiny_tokenizer):
    model = make_llama(len(tiny_tokenizer), layers=2).double()  # float64: no rounding ties
    texts = ["x", "for item in items:", "The quick brown fox jumps over the lazy dog and"]
    prompts = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(p) for p in prompts}) == 3
    greedy = Sampling(max_new_tokens=6, temperature=0.0)
    batched = sample_continuations(model, prompts, greedy, eos_token_id=None, pad_token_id=0)
    alone = [
        sample_continuations(model, [p], greedy, eos_token_id=None, pad_token_id=0)[0]
        for p in prompts
    ]
    assert batched == alone


def test_sampling_with_a_seed_repeats_and_temperature_matters(tiny_tokenizer):
    model = make_llama(len(tiny_tokenizer), layers=2)
    prompts = [tiny_tokenizer("import os", add_special_tokens=False)["input_ids"]] * 4
    hot = Sampling(max_new_tokens=12, temperature=1.5)
    torch.manual_seed(3)
    first = sample_continuations(model, prompts, hot, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(3)
    again = sample_continuations(model, prompts, hot, eos_token_id=None, pad_token_id=0)
    assert first == again
    assert len({tuple(c) for c in first}) > 1  # sampled, not greedy: rows differ
    cold = Sampling(max_new_tokens=12, temperature=1e-4)  # ~greedy: every row the same
    torch.manual_seed(3)
    frozen = sample_continuations(model, prompts, cold, eos_token_id=None, pad_token_id=0)
    assert len({tuple(c) for c in frozen}) == 1 and frozen != first


# --- prompts files ----------------------------------------------------------------------------


def test_shipped_prompts_are_many_short_user_turns():
    prompts = read_prompts(default_prompts_path())
    assert len(prompts) >= 220
    assert all(p.messages and p.messages[-1]["role"] == "user" for p in prompts)
    assert sum(p.messages[0]["role"] == "system" for p in prompts) >= 5
    assert all(sum(len(m["content"].split()) for m in p.messages) < 40 for p in prompts)
    assert len({p.messages[-1]["content"] for p in prompts}) == len(prompts)


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ('{"prompt": "a"}\nnot json\n', [":2:", "not valid JSON"]),
        ('{"prompt": "a"}\n\n{"text": "b"}\n', [":3:", "`messages` or `prompt`"]),
        ('{"messages": [{"role": "user"}]}\n', [":1:", "messages[0]"]),
        ('{"messages": [{"role": "assistant", "content": "hi"}]}\n', [":1:", "last message"]),
        ('{"prompt": "  "}\n', [":1:", "non-empty"]),
        ("\n\n", ["no prompts"]),
    ],
)
def test_bad_prompt_rows_name_file_and_line(tmp_path, content, needles):
    path = tmp_path / "p.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_prompts(path)
    for needle in needles:
        assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_prompt_file_kinds(tmp_path):
    (tmp_path / "p.csv").write_text("a\n")
    with pytest.raises(DataError, match="txt or .jsonl"):
        read_prompts(tmp_path / "p.csv")
    with pytest.raises(DataError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "p.txt").write_text("first\n\n second \n")
    assert [p.text for p in read_prompts(tmp_path / "p.txt")] == ["first", " second "]


# --- generate ---------------------------------------------------------------------------------


def test_generate_chat_records_meta_and_trainable(
    tmp_path,
    tiny_chat_teacher_dir,
    tiny_chat_tokenizer,
    one_thread,
):
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "Name three colours."}]},
        {"prompt": "What is a list?"},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Why is the sky blue? Explain it to a child please."},
            ]
        },
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"prompt": "Write a function that adds two numbers in Python, with a docstring."},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "out" / "gen.jsonl"
    extra = ["generate.batch_size=2", "generate.max_new_tokens=9", "seed=5"]
    config = _config(tiny_chat_teacher_dir, prompts, output, *extra)
    assert generate_responses(config) == output

    records = [json.loads(line) for line in _lines(output)]
    assert [r["id"] for r in records] == list(range(len(rows)))  # prompt order, not batch order
    for row, record in zip(rows, records, strict=True):
        asked = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        assert record["messages"][:-1] == asked
        assert record["messages"][-1]["role"] == "assistant"
        assert 1 <= record["response_tokens"] <= 9
        assert record["finished"] or record["response_tokens"] == 9
        assert set(record) == {"id", "messages", "response_tokens", "finished"}
    meta = json.loads(output.with_name("gen.jsonl.meta.json").read_text())
    assert meta["format"] == "chat"
    assert meta["teacher"] == str(tiny_chat_teacher_dir)
    assert meta["prompts"] == str(prompts.resolve())
    assert (meta["max_new_tokens"], meta["temperature"], meta["top_p"]) == (9, 0.7, 0.9)
    assert (meta["seed"], meta["batch_size"], meta["n_prompts"]) == (5, 2, 5)

    # the records are training data: chat rows whose assistant turns are the targets
    assert detect_format(output, "auto") == "chat"
    examples = encode_examples(read_rows(output), "chat", tiny_chat_tokenizer, 128, str(output))
    assert examples.input_ids.shape[0] == len(rows)

    before = output.read_bytes()  # a finished output: a rerun samples nothing, changes nothing
    assert generate_responses(config) == output
    assert output.read_bytes() == before


def test_generate_plain_tokenizer_writes_prompt_response(tmp_path, tiny_teacher_dir, one_thread):
    prompts = _write_txt_prompts(tmp_path / "p.txt", 3)
    output = tmp_path / "gen.jsonl"
    generate_responses(_config(tiny_teacher_dir, prompts, output, "generate.max_new_tokens=5"))
    records = [json.loads(line) for line in _lines(output)]
    assert [set(r) for r in records] == [
        {"id", "prompt", "response", "response_tokens", "finished"}
    ] * 3
    assert [r["prompt"] for r in records] == _lines(prompts)
    assert detect_format(output, "auto") == "prompt_response"


def test_resume_refuses_changed_settings(tmp_path, tiny_chat_teacher_dir, one_thread):
    prompts = _write_txt_prompts(tmp_path / "p.txt", 2)
    output = tmp_path / "gen.jsonl"
    generate_responses(_config(tiny_chat_teacher_dir, prompts, output, "generate.max_new_tokens=4"))
    changed = _config(
        tiny_chat_teacher_dir,
        prompts,
        output,
        "generate.max_new_tokens=4",
        "generate.temperature=1.0",
    )
    with pytest.raises(ConfigError) as err:
        generate_responses(changed)
    message = str(err.value)
    assert "temperature=0.7 (now 1.0)" in message and str(output) in message
    assert "\n" not in message
    # the same prompts moved elsewhere (another checkout): their content decides, it resumes
    moved = tmp_path / "moved" / "p.txt"
    moved.parent.mkdir()
    moved.write_bytes(prompts.read_bytes())
    before = output.read_bytes()
    generate_responses(_config(tiny_chat_teacher_dir, moved, output, "generate.max_new_tokens=4"))
    assert output.read_bytes() == before
    prompts.write_text("another prompt set\n")
    with pytest.raises(ConfigError, match="prompts_sha256"):
        generate_responses(
            _config(tiny_chat_teacher_dir, prompts, output, "generate.max_new_tokens=4")
        )


def test_resume_drops_a_truncated_last_line(tmp_path, tiny_chat_teacher_dir, one_thread):
    prompts = _write_txt_prompts(tmp_path / "p.txt", 7)
    extra = ["generate.batch_size=2", "generate.max_new_tokens=6", "generate.temperature=1.0"]
    reference = tmp_path / "reference.jsonl"
    generate_responses(_config(tiny_chat_teacher_dir, prompts, reference, *extra))
    output = tmp_path / "gen.jsonl"
    generate_responses(_config(tiny_chat_teacher_dir, prompts, output, *extra))
    lines = _lines(output)
    # as if killed mid-write: three whole records (one of a batch whose partner is missing)
    # and half of the next
    output.write_text("\n".join([lines[4], lines[0], lines[2]]) + "\n" + lines[5][:20])
    generate_responses(_config(tiny_chat_teacher_dir, prompts, output, *extra))
    assert output.read_bytes() == reference.read_bytes()

    output.write_text(lines[0] + "\n" + lines[1][:-3] + "\n")  # a cut line, newline after
    generate_responses(_config(tiny_chat_teacher_dir, prompts, output, *extra))
    assert output.read_bytes() == reference.read_bytes()

    output.write_text(lines[0] + "\n" + lines[1][:-3] + "\n" + lines[2] + "\n")
    with pytest.raises(DataError, match=":2: not valid JSON"):
        generate_responses(_config(tiny_chat_teacher_dir, prompts, output, *extra))


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, TQDM_DISABLE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "distill", "generate", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def _kill_then_resume(args: list[str], output: Path, n: int) -> list[dict]:
    """Start ``distill generate ARGS``, SIGKILL it once 3 records are on disk, rerun it to the
    end; the records, checked to hold each id exactly once, in order."""
    process = _cli(*args)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if output.is_file() and output.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    interrupted = output.read_bytes().count(b"\n")
    assert 3 <= interrupted < n

    finish = _cli(*args)
    stdout, stderr = finish.communicate(timeout=300)
    assert finish.returncode == 0, stderr
    assert stdout.strip().splitlines()[-1] == str(output)
    records = [json.loads(line) for line in _lines(output)]
    assert [r["id"] for r in records] == list(range(n))  # each exactly once, in prompt order
    return records


def _set_args(*settings: str) -> list[str]:
    return [arg for setting in settings for arg in ("--set", setting)]


def test_cli_resumes_after_sigkill_without_duplicates_or_losses(
    tmp_path,
    tiny_chat_teacher_dir,
    one_thread,
):
    n = 60
    prompts = _write_txt_prompts(tmp_path / "p.txt", n)
    output = tmp_path / "gen.jsonl"
    settings = ["generate.batch_size=1", "generate.max_new_tokens=12", "generate.temperature=1.0"]
    args = ["--prompts", str(prompts), "--out", str(output)] + _set_args(
        f"teacher.path={tiny_chat_teacher_dir}", *settings, "train.threads=1", "train.device=cpu"
    )
    _kill_then_resume(args, output, n)

    reference = tmp_path / "reference.jsonl"
    generate_responses(_config(tiny_chat_teacher_dir, prompts, reference, *settings))
    assert _lines(output) == _lines(reference)  # same seed: the same responses, kill or not


def test_cli_refuses_messages_for_a_tokenizer_without_chat_template(tmp_path, tiny_teacher_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "hello"}]}\n')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill",
            "generate",
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "o.jsonl"),
            "--set",
            f"teacher.path={tiny_teacher_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("distill: error")]
    assert len(errors) == 1, result.stderr
    assert f"{prompts}:1" in errors[0] and "no chat template" in errors[0]
    assert not (tmp_path / "o.jsonl").exists()


# --- generate.mode=continue ---------------------------------------------------------------


def _tagged_corpus(path: Path, n: int) -> list[str]:
    """``n`` paragraphs, each made of words tagged with its own index (``d7w0 d7w1 ...``), so a
    piece of text shows which document it came from."""
    documents = [" ".join(f"d{i}w{j}" for j in range(12 + i % 5)) for i in range(n)]
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return documents


def _continue_config(teacher: Path, corpus: Path, output: Path, *extra: str):
    return load_config(
        None,
        [
            "generate.mode=continue",
            f"teacher.path={teacher}",
            f"data.path={corpus}",
            f"generate.output={output}",
            "data.heldout_fraction=0.25",
            "train.threads=1",
            "train.device=cpu",
            *extra,
        ],
    )


def test_continuations_are_the_teachers_own_from_training_prefixes(
    tmp_path, tiny_teacher_dir, tiny_tokenizer, one_thread
):
    corpus = tmp_path / "corpus.txt"
    documents = _tagged_corpus(corpus, 30)
    train, heldout = split_documents(documents, 0.25)  # the split a run makes
    assert heldout
    prompts = _write_txt_prompts(tmp_path / "p.txt", 2)
    output = tmp_path / "cont.jsonl"
    extra = ["generate.continuations=40", "generate.prefix_tokens=6", "generate.max_new_tokens=5"]
    config = _continue_config(
        tiny_teacher_dir,
        corpus,
        output,
        *extra,
        f"generate.prompts={prompts}",
        "generate.temperature=0",
        "generate.batch_size=1",
    )
    generate_responses(config)
    records = [json.loads(line) for line in _lines(output)]
    assert [r["id"] for r in records] == list(range(42))
    assert [r["source"] for r in records] == ["corpus"] * 40 + ["prompts"] * 2
    assert [r["prompt"] for r in records[40:]] == _lines(prompts)
    teacher = LlamaForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    greedy = Sampling(max_new_tokens=5, temperature=0.0)
    eos = tiny_tokenizer.eos_token_id
    for record in records:
        prefix = tiny_tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        [own] = sample_continuations(teacher, [prefix], greedy, eos_token_id=eos, pad_token_id=0)
        assert record["response"] == tiny_tokenizer.decode(own, skip_special_tokens=True)
        assert record["text"] == record["prompt"] + record["response"]
    drawn_from = set()
    for record in records[:40]:
        assert 1 <= len(tiny_tokenizer(record["prompt"])["input_ids"]) <= 6
        sources = [i for i, doc in enumerate(train) if record["prompt"].strip() in doc]
        assert sources, record["prompt"]  # a piece of a training document...
        assert not any(record["prompt"].strip() in doc for doc in heldout)  # ...never held out
        drawn_from.update(sources)
    assert len(drawn_from) >= 10  # spread over the corpus
    held_tags = [doc.split()[0].split("w")[0] + "w" for doc in heldout]  # "d7w"
    assert not any(tag in record["prompt"] for tag in held_tags for record in records)

    # trainable as prompt/response rows (targets: the continuation), or as text
    assert detect_format(output, "auto") == "prompt_response"
    examples = encode_examples(read_rows(output), "prompt_response", tiny_tokenizer, 64, "c")
    assert examples.input_ids.shape[0] == 42
    assert read_documents(output) == [r["text"] for r in records]


def test_sampled_continuations_repeat_the_teachers_seeded_batches(
    tmp_path, tiny_teacher_dir, tiny_tokenizer, one_thread
):
    corpus = tmp_path / "corpus.txt"
    _tagged_corpus(corpus, 20)
    output = tmp_path / "cont.jsonl"
    extra = ["generate.continuations=7", "generate.prefix_tokens=5", "generate.max_new_tokens=6"]
    config = _continue_config(
        tiny_teacher_dir,
        corpus,
        output,
        *extra,
        "generate.batch_size=3",
        "seed=4",
        "generate.temperature=1.0",
        "generate.top_p=1.0",
    )
    generate_responses(config)
    records = [json.loads(line) for line in _lines(output)]
    inputs = [tiny_tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in records]
    teacher = LlamaForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    hot = Sampling(max_new_tokens=6, temperature=1.0, top_p=1.0)
    for batch_index, batch in enumerate(_batches([len(ids) for ids in inputs], 3)):
        torch.manual_seed(4 + batch_index)  # the seed of each batch: seed + batch index
        own = sample_continuations(
            teacher, [inputs[i] for i in batch], hot, eos_token_id=0, pad_token_id=0
        )
        for index, ids in zip(batch, own, strict=True):
            assert records[index]["response"] == tiny_tokenizer.decode(
                ids, skip_special_tokens=True
            )
    assert len({r["response"] for r in records}) > 1


def test_continue_resume_refuses_other_prefixes_and_bad_sources(
    tmp_path, tiny_teacher_dir, tiny_chat_teacher_dir, one_thread
):
    corpus = tmp_path / "corpus.txt"
    _tagged_corpus(corpus, 12)
    output = tmp_path / "cont.jsonl"
    extra = ["generate.continuations=3", "generate.max_new_tokens=2"]
    generate_responses(_continue_config(tiny_teacher_dir, corpus, output, *extra))
    with pytest.raises(ConfigError, match=r"prefix_tokens=32 \(now 5\)"):
        generate_responses(
            _continue_config(tiny_teacher_dir, corpus, output, *extra, "generate.prefix_tokens=5")
        )
    _tagged_corpus(corpus, 13)  # another corpus: its fingerprint (and prefixes) differ
    with pytest.raises(ConfigError, match="corpus_fingerprint"):
        generate_responses(_continue_config(tiny_teacher_dir, corpus, output, *extra))
    chat_prompts = tmp_path / "chat.jsonl"
    chat_prompts.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match="chat.jsonl:1: generate.mode=continue continues plain"):
        generate_responses(
            _continue_config(
                tiny_chat_teacher_dir,
                corpus,
                tmp_path / "o.jsonl",
                *extra,
                f"generate.prompts={chat_prompts}",
            )
        )
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(ConfigError, match="prompt/response rows"):
        generate_responses(_continue_config(tiny_teacher_dir, rows, tmp_path / "o.jsonl"))
    assert not (tmp_path / "o.jsonl").exists()


def test_continue_cli_resumes_after_sigkill_without_duplicates_or_losses(
    tmp_path, tiny_teacher_dir, one_thread
):
    n = 50
    corpus = tmp_path / "corpus.txt"
    _tagged_corpus(corpus, 25)
    output = tmp_path / "cont.jsonl"
    settings = [
        "generate.mode=continue",
        f"data.path={corpus}",
        f"generate.continuations={n}",
        "generate.prefix_tokens=6",
        "generate.batch_size=1",
        "generate.max_new_tokens=12",
        "generate.temperature=1.0",
    ]
    args = ["--out", str(output)] + _set_args(
        f"teacher.path={tiny_teacher_dir}", *settings, "train.threads=1", "train.device=cpu"
    )
    _kill_then_resume(args, output, n)
    reference = tmp_path / "reference.jsonl"
    generate_responses(
        load_config(
            None,
            [
                f"teacher.path={tiny_teacher_dir}",
                f"generate.output={reference}",
                *settings,
                "train.threads=1",
                "train.device=cpu",
            ],
        )
    )
    assert _lines(output) == _lines(reference)  # same seed: the same continuations, kill or not
