"""Several teachers (``teachers:``): each row is distilled from its own teacher (live, cache or
served, mixed in one batch), unknown names and changed teacher sets are refused with one line, the
per-teacher metrics add up, and one teacher behaves exactly as without ``teachers:``."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_llama, save_model

from distill.cli import main as cli_main
from distill.config import LossConfig, TrainConfig, load_config
from distill.data import BlockBatches, Routing, default_documents, pack_documents
from distill.data.examples import encode_examples
from distill.data.routing import pack_routed
from distill.errors import ConfigError, DataError
from distill.losses.schedule import loss_settings
from distill.models import load_causal_lm
from distill.pipelines.run import distill
from distill.pipelines.serve_teacher import Scorer, make_server
from distill.teacher import LiveTeacher, NamedTeacher, RemoteTeacher, TeacherSet
from distill.teacher.routed import check_resume_teachers
from distill.train import CausalLMTask, train
from distill.train.causal_lm import micro_batch_terms, routed_batch_terms

# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def other_teacher_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A second tiny teacher: another depth and random init, the same vocabulary, its output
    rows scaled up so that its distributions are peaked (a random init's are near uniform,
    close to any other random model's)."""
    model = make_llama(len(tiny_tokenizer), layers=2, seed=7)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return save_model(model, tiny_tokenizer, tmp_path_factory.mktemp("other_teacher"))


@pytest.fixture(scope="module")
def pair(tiny_teacher_dir, other_teacher_dir):
    """The two teachers' models, loaded once."""
    return load_causal_lm(tiny_teacher_dir), load_causal_lm(other_teacher_dir)


class Recording:
    """A teacher that records the rows it is asked for (and answers as ``inner``)."""

    def __init__(self, inner):
        self.inner, self.vocab_rows, self.asked = inner, inner.vocab_rows, []

    def soft_targets(self, input_ids):
        self.asked.append(input_ids.clone())
        return self.inner.soft_targets(input_ids)


def _set(*teachers, default: str = "a") -> TeacherSet:
    names = "abcdefgh"
    members = [NamedTeacher(names[i], t, "live", f"t{i}", f"f{i}") for i, t in enumerate(teachers)]
    return TeacherSet(members, default)


def _blocks(vocab: int, rows: int = 6, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


SETTINGS = loss_settings(LossConfig(temperature=2.0, alpha=0.5))


# ------------------------------------------------------------------------------ routing


def test_each_row_gets_the_soft_targets_and_loss_of_its_own_teacher(pair, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    first, second = (Recording(LiveTeacher(model, vocab)) for model in pair)
    student = make_llama(vocab, layers=1, seed=3)
    blocks = _blocks(vocab)
    routes = torch.tensor([1, 0, 1, 1, 0, 1])
    per_teacher = routed_batch_terms(student, _set(first, second), blocks, routes, SETTINGS, vocab)
    # each teacher was asked for its own rows only, once
    assert [len(t.asked) for t in (first, second)] == [1, 1]
    assert torch.equal(first.asked[0], blocks[routes == 0])
    assert torch.equal(second.asked[0], blocks[routes == 1])
    for index, teacher in enumerate(pair):
        own_rows, other = blocks[routes == index], pair[1 - index]
        alone = micro_batch_terms(student, LiveTeacher(teacher, vocab), own_rows, SETTINGS, vocab)
        wrong = micro_batch_terms(student, LiveTeacher(other, vocab), own_rows, SETTINGS, vocab)
        routed = per_teacher[index]
        assert routed.n_tokens == alone.n_tokens == own_rows.shape[0] * 15
        torch.testing.assert_close(routed.loss_sum, alone.loss_sum, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(routed.divergence_sum, alone.divergence_sum, rtol=1e-5, atol=0)
        # the other teacher's targets would give another divergence (by far more than 1e-5)
        assert abs(float(wrong.divergence_sum / routed.divergence_sum) - 1) > 1e-2


def test_unrouted_rows_go_to_the_default_teacher(pair, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    first, second = (Recording(LiveTeacher(model, vocab)) for model in pair)
    student = make_llama(vocab, layers=1, seed=3)
    blocks = _blocks(vocab, rows=3)
    teachers = _set(first, second, default="b")
    terms = routed_batch_terms(student, teachers, blocks, None, SETTINGS, vocab)
    assert first.asked == [] and torch.equal(second.asked[0], blocks)
    assert terms[0].n_tokens == 0 and terms[1].n_tokens == 3 * 15


@contextlib.contextmanager
def _serving(model, tokenizer):
    server = make_server(Scorer(model, tokenizer, "other"), host="127.0.0.1", port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_one_batch_mixes_a_live_and_a_served_teacher(pair, tiny_tokenizer):
    """Full logits for one teacher's rows, a server's top-k for the other's, in one batch."""
    vocab = len(tiny_tokenizer)
    student = make_llama(vocab, layers=1, seed=3)
    blocks, routes = _blocks(vocab, rows=4), torch.tensor([0, 1, 0, 1])
    settings = loss_settings(LossConfig(temperature=1.0, alpha=0.5))
    with _serving(pair[1], tiny_tokenizer) as url:
        remote = RemoteTeacher(url, vocab_rows=vocab, top_k=8, timeout_s=30.0, retries=0)
        live = LiveTeacher(pair[0], vocab)
        routed = routed_batch_terms(student, _set(live, remote), blocks, routes, settings, vocab)
        served_alone = micro_batch_terms(student, remote, blocks[routes == 1], settings, vocab)
        remote.close()
    live_alone = micro_batch_terms(student, live, blocks[routes == 0], settings, vocab)
    torch.testing.assert_close(routed[0].loss_sum, live_alone.loss_sum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routed[1].loss_sum, served_alone.loss_sum, rtol=1e-5, atol=1e-6)


def test_teachers_must_share_one_vocabulary(pair, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    with pytest.raises(Exception, match="share the student's vocabulary"):
        _set(LiveTeacher(pair[0], vocab), LiveTeacher(pair[1], vocab - 1))


# ------------------------------------------------------------------------------ data


def test_text_is_packed_per_teacher_and_one_teacher_packs_as_before(tiny_tokenizer):
    documents = [doc[:600] for doc in default_documents()[:12]]
    routing = Routing(("a", "b"), "a")
    routes = [i % 2 for i in range(len(documents))]
    blocks, block_routes = pack_routed(documents, routes, routing, tiny_tokenizer, 32)
    for index in (0, 1):
        own = [doc for doc, route in zip(documents, routes, strict=True) if route == index]
        assert torch.equal(blocks[block_routes == index], pack_documents(own, tiny_tokenizer, 32))
    single, single_routes = pack_routed(documents, [0] * 12, routing, tiny_tokenizer, 32)
    assert torch.equal(single, pack_documents(documents, tiny_tokenizer, 32))
    assert not single_routes.any()


def test_examples_keep_their_rows_teacher(tiny_tokenizer):
    rows = [
        {"prompt": "Define x", "response": " as one.", "teacher": "b"},
        {"prompt": "Define y", "response": " as two."},
    ]
    routing = Routing(("a", "b"), "a")
    examples = encode_examples(rows, "prompt_response", tiny_tokenizer, 32, "p.jsonl", routing)
    assert examples.teachers.tolist() == [1, 0]
    with pytest.raises(DataError, match=r"p.jsonl row 1: teacher 'c' is not one of .*\(a, b\)"):
        encode_examples([{**rows[0], "teacher": "c"}], "prompt_response", tiny_tokenizer, 32, "p.jsonl", routing)  # fmt: skip
    assert encode_examples(rows, "prompt_response", tiny_tokenizer, 32, "p.jsonl").teachers is None


def _errors(capsys) -> list[str]:
    return re.findall(r"distill: error: [^\r\n]*", capsys.readouterr().err)


@pytest.mark.parametrize("kind", ["text", "prompt_response"])
def test_an_unknown_teacher_name_is_one_line_naming_file_line_value_and_names(
    tmp_path, tiny_run_config, other_teacher_dir, capsys, kind
):
    rows = [{"text": "one"}, {"text": "two", "teacher": "b"}, {"text": "three", "teacher": "c"}]
    if kind == "prompt_response":
        rows = [{"prompt": r["text"], "response": "!", **r} for r in rows]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        **tiny_run_config,
        "teachers": [
            {"name": "a", "path": tiny_run_config["teacher"]["path"]},
            {"name": "b", "path": str(other_teacher_dir)},
        ],
        "data": {"path": str(data), "block_size": 32},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["run", "--config", str(path)])
    assert exit_info.value.code == 2
    errors = _errors(capsys)
    assert len(errors) == 1, errors
    assert f"{data}:3: teacher 'c' is not one of the run's teachers (a, b)" in errors[0]


# ------------------------------------------------------------------------------ the schema


@pytest.mark.parametrize(
    ("base", "needle"),
    [
        ({"teachers": [{"name": "a"}, {"name": "a"}]}, "'a' is used twice"),
        ({"teachers": [{"name": "a"}], "default_teacher": "b"}, "not one of teachers"),
        ({"default_teacher": "a"}, "set teachers"),
        ({"teachers": [{"name": "a b"}]}, "should match pattern"),
        ({"teachers": [{"name": "a"}], "teacher": {"cache": "c"}}, "unset teacher.cache"),
        (
            {
                "teachers": [{"name": "a"}, {"name": "b", "url": "http://h:1"}],
                "loss": {"temperature": 2.0},
            },
            r"exact at loss.temperature=1 only.*\(teachers\[1\].url is served\)",
        ),
        (
            {"teachers": [{"name": "a", "cache": "c"}], "onpolicy": {"lambda": 0.5}},
            r"unset teachers\[0\].cache",
        ),
        ({"teachers": [{"name": "a"}], "parallel": {"strategy": "fsdp"}}, "use parallel.strategy"),
        ({"teachers": [{"name": "a"}], "intermediate": {"hidden_weight": 1}}, "unset teachers"),
        ({"teachers": [{"name": "a"}], "task": "embedding"}, "task causal_lm only"),
    ],
)
def test_schema_refuses_teacher_sets_that_do_not_fit(base, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(base=base)


def test_schema_accepts_a_served_teacher_at_an_exact_loss():
    config = load_config(
        base={
            "teachers": [{"name": "a"}, {"name": "b", "url": "http://h:1"}],
            "default_teacher": "b",
            "loss": {"temperature": 1.0},
        }
    )
    assert [t.name for t in config.teachers] == ["a", "b"] and config.default_teacher == "b"


# ------------------------------------------------------------------------------ metrics


def test_per_teacher_metrics_add_up_and_equal_a_separate_computation(pair, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    teachers = [LiveTeacher(model, vocab) for model in pair]
    student = make_llama(vocab, layers=1, seed=3)
    before = copy.deepcopy(student)
    blocks = _blocks(vocab, rows=8)
    routes = torch.tensor([0, 1, 1, 0, 1, 1, 0, 1])
    loss = LossConfig(temperature=2.0, alpha=0.5)
    task = CausalLMTask(student, _set(*teachers), BlockBatches(blocks, 4, 0, routes), loss, vocab_rows=vocab)  # fmt: skip
    state = train(task, TrainConfig(steps=1, batch_size=4, grad_accum=2, warmup_steps=0))
    record = state.history[0]
    per = record["teachers"]
    assert sum(own["share"] for own in per.values()) == pytest.approx(1.0, abs=1e-12)
    assert sum(own["targets"] for own in per.values()) == 8 * 15  # the window's targets
    # the same window, drawn again, each teacher's rows scored alone on the initial student
    order = BlockBatches(blocks, 4, 0, routes)
    window = [order.next_batch() for _ in range(2)]
    rows = torch.cat([drawn.blocks for drawn in window])
    row_routes = torch.cat([drawn.teachers for drawn in window])
    for index, name in enumerate("ab"):
        own = rows[row_routes == index]
        alone = micro_batch_terms(before, teachers[index], own, SETTINGS, vocab)
        assert per[name]["targets"] == alone.n_tokens
        assert per[name]["share"] == pytest.approx(alone.n_tokens / (8 * 15), rel=1e-12)
        assert per[name]["divergence"] == pytest.approx(
            float(alone.divergence_sum) / alone.n_tokens, rel=1e-5
        )
    # the window's divergence is the share-weighted mean of the teachers' (normalised as ever;
    # the two differ by the float32 rounding of adding the teachers' sums)
    mixed = sum(own["share"] * own["divergence"] for own in per.values())
    assert record["divergence"] == pytest.approx(mixed, rel=1e-6)


def test_one_teacher_in_a_set_trains_exactly_as_that_teacher_alone(pair, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    blocks = _blocks(vocab, rows=8)
    losses = {}
    for name, teacher in (("alone", LiveTeacher(pair[0], vocab)), ("set", None)):
        teacher = teacher or _set(LiveTeacher(pair[0], vocab))
        task = CausalLMTask(
            make_llama(vocab, layers=1, seed=3),
            teacher,
            BlockBatches(blocks, 4, 0),
            LossConfig(temperature=2.0, alpha=0.5),
            vocab_rows=vocab,
        )
        history = train(task, TrainConfig(steps=3, batch_size=4, warmup_steps=0, lr=1e-3)).history
        losses[name] = [(r["loss"], r["ce"], r["divergence"]) for r in history]
        assert ("teachers" in history[0]) == (name == "set")
    assert losses["set"] == losses["alone"]


# ------------------------------------------------------------------------------ a whole run


def _multi_config(tmp_path: Path, teacher_dir: Path, other_dir: Path) -> dict:
    documents = [doc[:1500] for doc in default_documents()[:24]]
    data = tmp_path / "rows.jsonl"
    rows = [{"text": doc, **({"teacher": "b"} if i % 3 == 0 else {})} for i, doc in enumerate(documents)]  # fmt: skip
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {
        "name": "multi",
        "output_dir": str(tmp_path / "runs"),
        "teacher": {"path": str(teacher_dir)},
        "teachers": [
            {"name": "a", "path": str(teacher_dir)},
            {"name": "b", "path": str(other_dir), "cache": str(tmp_path / "cache-b")},
        ],
        "student": {"keep_first": 1, "keep_last": 1},
        "data": {"path": str(data), "block_size": 32},
        "loss": {"temperature": 1.0},
        "cache": {"k": 16, "temperatures": [1.0]},
        "train": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "threads": 1, "device": "cpu"},
        "checkpoint": {"every": 1},
        "eval": {"max_blocks": 2, "batch_size": 2, "speed": False, "sample_prompts": 0},
    }


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory, tiny_teacher_dir, other_teacher_dir):
    """One run from a live teacher (the model of teacher:) and a cached one, its stdout."""
    tmp_path = tmp_path_factory.mktemp("multi")
    config = _multi_config(tmp_path, tiny_teacher_dir, other_teacher_dir)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    cli_main(["cache", "--config", str(path), "--teacher", "b"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = distill(config)
    return result.run_dir, printed.getvalue(), path


def test_a_run_routes_live_and_cached_teachers_and_reports_each(multi_run):
    run_dir, printed, _ = multi_run
    for name, kind in (("a", "live"), ("b", "cache")):
        line = next(line for line in printed.splitlines() if f"teacher {name}" in line)
        assert kind in line and re.search(r"round trip \d+\.\d\d s", line), line
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        shares = [own["share"] for own in record["teachers"].values()]
        assert sum(shares) == pytest.approx(1.0, abs=1e-12)
    report = json.loads((run_dir / "report.json").read_text())
    summary = report["training"]["teachers"]
    assert set(summary) == {"a", "b"} and summary["b"]["kind"] == "cache"
    total = sum(own["targets"] for r in records for own in r["teachers"].values())
    assert summary["b"]["share"] == pytest.approx(
        sum(r["teachers"]["b"]["targets"] for r in records) / total
    )
    assert report["plan"]["teachers"]["a"]["round_trip_seconds"] > 0
    markdown = (run_dir / "report.md").read_text()
    assert "## Teachers" in markdown and "| b | cache " in markdown
    page = (run_dir / "report.html").read_text()
    assert '<table id="teachers">' in page
    assert "<th>b</th><td>cache" in page and f"<td>{summary['b']['share']:.3f}</td>" in page
    manifest = json.loads((run_dir / "teachers.json").read_text())
    assert [t["name"] for t in manifest["teachers"]] == ["a", "b"] and manifest["default"] == "a"


def test_a_resume_with_another_teacher_set_is_refused(multi_run, capsys):
    run_dir, _, _ = multi_run
    saved = (run_dir / "config.yaml").read_text()
    teachers = yaml.safe_load(saved)["teachers"]
    more = [*teachers, {**teachers[0], "name": "c"}]  # a third teacher, no row routed to it
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["run", "--resume", str(run_dir), "--force", "--set", f"teachers={json.dumps(more)}"])  # fmt: skip
    assert exit_info.value.code == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "its teachers changed" in errors[0], errors
    assert "this run has a (live" in errors[0] and "c (live" in errors[0]
    assert (run_dir / "config.yaml").read_text() == saved  # a refused resume changes nothing


def test_a_changed_teacher_is_refused_on_resume(tmp_path):
    saved = {"default": "a", "teachers": [{"name": "a", "kind": "live", "where": "m", "fingerprint": "0" * 64}]}  # fmt: skip
    (tmp_path / "checkpoints" / "step-00000001").mkdir(parents=True)
    check_resume_teachers(tmp_path, saved, resuming=False)
    check_resume_teachers(tmp_path, saved, resuming=True)  # the same set: accepted
    changed = copy.deepcopy(saved)
    changed["teachers"][0]["fingerprint"] = "1" * 64  # same name and path, other weights
    for current in (changed, None):
        with pytest.raises(ConfigError, match="its teachers changed"):
            check_resume_teachers(tmp_path, current, resuming=True)
