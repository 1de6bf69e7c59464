"""The served teacher: RemoteTeacher against `distill serve-teacher` on loopback (ports chosen
free), schemas, failures (one line, exit 2, checkpoint kept), parity with the cache, on-policy
divergences on the (k + 1) outcomes against a float64 reference, and the schema's rules."""

from __future__ import annotations

import copy
import json
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_llama, save_model
from references import reference_divergence

from distill.cli import main as cli_main
from distill.config import LossConfig, OnPolicyConfig, TrainConfig, load_config
from distill.data import BlockBatches, default_documents
from distill.errors import ConfigError
from distill.losses.sparse import SparseTargets, sparse_divergence
from distill.models import load_causal_lm
from distill.pipelines.serve_teacher import Handler, Scorer, make_server
from distill.teacher import CachedTeacher
from distill.teacher.cache_writer import cache_identity, teacher_topk, write_cache
from distill.teacher.remote import RemoteTeacher, RemoteTeacherError, parse_sglang, parse_vllm
from distill.train import CausalLMTask, train
from distill.train.onpolicy import OnPolicy


@contextmanager
def serving(scorer: Scorer, handler: type[Handler] = Handler, **bounds) -> Iterator[str]:
    """``scorer`` behind a server on a free loopback port, shut down afterwards."""
    server = make_server(scorer, host="127.0.0.1", port=0, handler=handler, **bounds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def tiny_model(tiny_teacher_dir):
    return load_causal_lm(tiny_teacher_dir)


@pytest.fixture(scope="module")
def scorer(tiny_model, tiny_tokenizer) -> Scorer:
    return Scorer(tiny_model, tiny_tokenizer, "tiny")


def _remote(url: str, vocab: int, **options) -> RemoteTeacher:
    settings = {"top_k": 8, "rows_per_request": 2, "timeout_s": 30.0, "retries": 0, **options}
    return RemoteTeacher(url, vocab_rows=vocab, **settings)


# ------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("api", ["vllm", "sglang"])
def test_served_targets_equal_the_cache_writers_topk(scorer, tiny_model, tiny_tokenizer, api):
    vocab = len(tiny_tokenizer)
    blocks = torch.randint(0, vocab, (6, 16), generator=torch.Generator().manual_seed(2))
    with serving(scorer) as url:
        remote = _remote(url, vocab, api=api, concurrency=3)
        info = remote.check_server(teacher_rows=vocab, tokens=vocab)
        targets = remote.soft_targets(blocks)
        remote.close()
    assert info.vocab_size == vocab and info.models == ("tiny",)
    # The writer in batches of 2, as the server forwards each request of 2 rows.
    written = teacher_topk(
        tiny_model,
        blocks,
        vocab_rows=vocab,
        k=8,
        dtype="float32",
        temperatures=[1.0],
        batch_size=2,
    )
    assert torch.equal(targets.ids, written["ids"].to(torch.int64))
    assert torch.equal(targets.logprobs, written["logprobs"])
    # c_1 is 0 exactly; the writer's logsumexp of float32 log-probabilities is 0 +- a few ulp
    assert not targets.lognorm.any()
    torch.testing.assert_close(targets.lognorm, written["lognorm"], atol=2e-6, rtol=0)
    assert targets.temperatures == (1.0,)


def _vllm_position(entries: list[tuple[int, float, int]]) -> dict:
    """A prompt_logprobs dict from (id, logprob, rank), in the given (meaningless) order."""
    return {str(i): {"logprob": lp, "rank": r, "decoded_token": "x"} for i, lp, r in entries}


def test_entries_out_of_rank_order_are_sorted_and_the_prompt_token_dropped():
    # position 1: the prompt token 9 (rank 40) beside the top 3, all shuffled
    position = _vllm_position([(9, -6.0, 40), (5, -2.0, 3), (2, -0.5, 1), (7, -1.0, 2)])
    response = {
        "choices": [
            {
                "index": 0,
                "prompt_logprobs": [None, position],
                "logprobs": {
                    "top_logprobs": [{"token_id:4": -3.0, "token_id:1": -0.1, "token_id:3": -1.5}]
                },
            }
        ]
    }
    rows = parse_vllm(response, [2], 3)
    assert rows == [[([2, 7, 5], [-0.5, -1.0, -2.0]), ([1, 3, 4], [-0.1, -1.5, -3.0])]]
    sglang = {
        "meta_info": {
            "input_top_logprobs": [None, [[-2.0, 5, None], [-0.5, 2, None], [-1.0, 7, None]]],
            "output_top_logprobs": [[[-3.0, 4, None], [-0.1, 1, None], [-1.5, 3, None]]],
        }
    }
    assert parse_sglang(sglang, [2], 3) == rows


def test_fewer_than_k_entries_or_positions_are_refused():
    position = _vllm_position([(2, -0.5, 1), (9, -6.0, 40)])  # top 1 and the prompt token
    short = {"choices": [{"prompt_logprobs": [None, position], "logprobs": None}]}
    with pytest.raises(RemoteTeacherError, match="fewer than teacher.top_k=2"):
        parse_vllm(short, [2], 2)
    with pytest.raises(RemoteTeacherError, match="1 positions .* prompt of 2 tokens"):
        parse_vllm({"choices": [{"prompt_logprobs": [None]}]}, [2], 2)


def test_server_bounds_and_refusals(scorer, tiny_tokenizer):
    def post(url: str, body: bytes) -> tuple[int, str]:
        request = urllib.request.Request(url + "/v1/completions", data=body)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    with serving(scorer, max_request_bytes=2048, max_tokens_per_request=64) as url:
        assert post(url, b"x" * 4096)[0] == 413
        assert post(url, json.dumps({"prompt": list(range(100))}).encode())[0] == 413
        assert post(url, json.dumps({"prompt": "some text"}).encode())[0] == 400
        assert post(url, json.dumps({"prompt": [len(tiny_tokenizer)]}).encode())[0] == 400
        assert post(url, json.dumps({"prompt": [1, 2], "model": "other"}).encode())[0] == 404
        status, text = post(url, json.dumps({"prompt": [1, 2, 3], "prompt_logprobs": 2}).encode())
    assert status == 200 and json.loads(text)["choices"][0]["prompt_logprobs"][0] is None


# ------------------------------------------------------------------------------ failures via the CLI


class Faults:
    """Which fault the next requests get, after ``after`` good scoring requests."""

    mode: str | None = None
    after = 0
    seen = 0


def _faulty(faults: type[Faults]) -> type[Handler]:
    class Faulty(Handler):
        def do_POST(self) -> None:  # noqa: N802
            faults.seen += 1
            if faults.mode is None or faults.seen <= faults.after:
                return super().do_POST()
            self.rfile.read(int(self.headers["Content-Length"]))
            if faults.mode == "timeout":
                time.sleep(1.5)  # past teacher.timeout_s = 0.5; bounded
                self.close_connection = True
                return None
            # "cut": promise a long body, send a piece of it, close
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b'{"choices": [{"index": 0, "prompt_logpr')
            self.close_connection = True
            return None

    return Faulty


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("served_data") / "docs.txt"
    path.write_text("\n\n".join(doc[:1200] for doc in default_documents()[:24]))
    return path


def _served_config(url: str, teacher_dir: Path, data: Path, out: Path) -> dict:
    return {
        "name": "served",
        "output_dir": str(out),
        "teacher": {
            "path": str(teacher_dir),
            "url": url,
            "top_k": 8,
            "rows_per_request": 2,
            "timeout_s": 0.5,
            "retries": 1,
            "retry_backoff_s": 0.01,
        },
        "student": {"keep_first": 1, "keep_last": 1},
        "data": {"block_size": 32, "path": str(data)},
        "loss": {"temperature": 1.0},
        "train": {"steps": 4, "batch_size": 2, "warmup_steps": 1, "threads": 1},
        "checkpoint": {"every": 1},
        "eval": {"max_blocks": 2, "batch_size": 2, "speed": False},
    }


def _errors(capsys) -> list[str]:
    """The error lines on stderr (an unfinished progress bar may precede one on its line)."""
    return re.findall(r"distill: error: [^\r\n]*", capsys.readouterr().err)


@pytest.mark.parametrize(("mode", "needle"), [("timeout", "no answer within"), ("cut", "cut")])
def test_failing_server_stops_with_one_line_and_the_run_resumes(
    scorer, tiny_teacher_dir, text_file, tmp_path, capsys, mode, needle
):
    faults = type("RunFaults", (Faults,), {"mode": mode, "after": 4, "seen": 0})
    with serving(scorer, handler=_faulty(faults)) as url:
        config = _served_config(url, tiny_teacher_dir, text_file, tmp_path / "runs")
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        with pytest.raises(SystemExit) as exit_info:  # warm-up, steps, then the fault
            cli_main(["run", "--config", str(path)])
        assert exit_info.value.code == 2
        errors = _errors(capsys)
        assert len(errors) == 1 and needle in errors[0] and "2 tries" in errors[0], errors
        run_dir = tmp_path / "runs" / "served"
        saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
        assert saved and saved[-1] < "step-00000004", saved  # stopped mid-run, checkpoint kept
        faults.mode = None  # the server recovers
        cli_main(["run", "--resume", str(run_dir)])
    records = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in records] == [1, 2, 3, 4]
    assert (run_dir / "report.json").is_file()


def test_server_of_another_vocabulary_is_refused(
    tiny_tokenizer, tiny_teacher_dir, text_file, tmp_path, capsys
):
    other = Scorer(make_llama(64, layers=1), tiny_tokenizer, "other")
    with serving(other) as url:
        config = _served_config(url, tiny_teacher_dir, text_file, tmp_path / "runs")
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["run", "--config", str(path)])
    assert exit_info.value.code == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "64 vocabulary rows" in errors[0], errors
    assert not (tmp_path / "runs" / "served" / "metrics.jsonl").exists()


def test_unreachable_server_is_one_line(tiny_teacher_dir, text_file, tmp_path, capsys):
    with socket.socket() as probe:  # a free port that nobody listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    config = _served_config(url, tiny_teacher_dir, text_file, tmp_path / "runs")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["run", "--config", str(path)])
    assert exit_info.value.code == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "unreachable" in errors[0], errors


# ------------------------------------------------------------------------------ training parity


def test_a_run_from_the_server_equals_a_run_from_the_cache(scorer, tmp_path, tiny_tokenizer):
    teacher_model, vocab = scorer.model, len(tiny_tokenizer)
    student = make_llama(vocab, layers=1, seed=3)
    blocks = torch.randint(0, vocab, (8, 16), generator=torch.Generator().manual_seed(4))
    source = save_model(teacher_model, tiny_tokenizer, tmp_path / "teacher")
    identity = cache_identity(source, teacher_model, tiny_tokenizer, blocks)
    write_cache(teacher_model, blocks, tmp_path / "c", identity=identity, k=8, dtype="float32")
    losses = {}
    with serving(scorer) as url:
        remote = _remote(url, vocab, rows_per_request=4)
        for name, teacher in (("cache", CachedTeacher(tmp_path / "c")), ("served", remote)):
            state = train(
                CausalLMTask(
                    copy.deepcopy(student),
                    teacher,
                    BlockBatches(blocks, 4, seed=0),
                    LossConfig(temperature=1.0, alpha=0.5),
                    vocab_rows=vocab,
                ),
                TrainConfig(steps=3, batch_size=4, warmup_steps=0, lr=1e-3),
            )
            losses[name] = [r["loss"] for r in state.history]
        remote.close()
    assert losses["served"] == pytest.approx(losses["cache"], rel=1e-6)


# ------------------------------------------------------------------------------ on-policy, sparse


def _reference_sparse(student, teacher, ids, divergence, temperature, variant, beta):
    """Row by row in float64: both distributions coarsened to the kept ids (+ the tail)."""
    total = torch.zeros((), dtype=torch.float64)
    for row in range(student.shape[0]):
        p_full = torch.softmax(teacher[row].double(), -1)  # T = 1: what a server gives
        p_full = p_full ** (1 / temperature) / (p_full ** (1 / temperature)).sum()
        q_full = torch.softmax(student[row].double() / temperature, -1)
        kept = ids[row]
        p, q = p_full[kept], q_full[kept]
        if variant == "tail_bucket":
            p, q = torch.cat([p, (1 - p.sum())[None]]), torch.cat([q, (1 - q.sum())[None]])
        else:
            p, q = p / p.sum(), q / q.sum()
        total = total + reference_divergence(p, q, divergence, beta=beta)
    return total


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize(("variant", "temperature"), [("tail_bucket", 1.0), ("renormalized", 2.0)])
def test_sparse_divergences_match_a_float64_reference(divergence, variant, temperature):
    generator = torch.Generator().manual_seed(7)
    teacher = 3 * torch.randn(6, 40, generator=generator)
    student = 3 * torch.randn(6, 40, generator=generator)
    top = torch.topk(teacher, 5, dim=-1)
    logprobs = top.values - torch.logsumexp(teacher, -1, keepdim=True)
    targets = SparseTargets(top.indices, logprobs, torch.zeros(6, 1), (1.0,))
    exact = (
        teacher.double().gather(-1, top.indices) - torch.logsumexp(teacher.double(), -1)[:, None]
    )
    value = sparse_divergence(
        student.double(),
        SparseTargets(top.indices, exact, torch.zeros(6, 1).double(), (1.0,)),
        divergence=divergence,
        temperature=temperature,
        beta=0.3,
        variant=variant,
    )
    reference = _reference_sparse(
        student, teacher, top.indices, divergence, temperature, variant, 0.3
    )
    torch.testing.assert_close(value, reference, rtol=1e-9, atol=1e-12)
    single = sparse_divergence(
        student, targets, divergence=divergence, temperature=temperature, beta=0.3, variant=variant
    )
    torch.testing.assert_close(single.double(), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_onpolicy_from_the_server_trains(scorer, tiny_tokenizer, divergence):
    vocab = len(tiny_tokenizer)
    student = make_llama(vocab, layers=1, seed=5)
    blocks = torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(6))
    onpolicy = OnPolicy(
        OnPolicyConfig.model_validate({"lambda": 1.0, "max_new_tokens": 6, "prompt_tokens": 4}),
        eos_token_id=None,
        pad_token_id=0,
    )
    with serving(scorer) as url:
        remote = _remote(url, vocab)
        state = train(
            CausalLMTask(
                student,
                remote,
                BlockBatches(blocks, 2, seed=0),
                LossConfig(temperature=1.0, alpha=0.5, divergence=divergence),
                vocab_rows=vocab,
                onpolicy=onpolicy,
            ),
            TrainConfig(steps=2, batch_size=2, warmup_steps=0, lr=1e-3),
        )
        remote.close()
    assert [r["onpolicy_fraction"] for r in state.history] == [1.0, 1.0]
    assert all(0 < r["divergence"] < 20 and r["generated_tokens_mean"] == 6 for r in state.history)


# ------------------------------------------------------------------------------ the schema


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            ["teacher.url=http://h:1", "teacher.cache=c"],
            "only one of teacher.cache and teacher.url",
        ),
        (["teacher.url=h:1"], "must start with http"),
        (["teacher.url=http://h:1", "loss.temperature=2"], "exact at loss.temperature=1 only"),
        (["teacher.url=http://h:1", "loss.temperature=1", "loss.divergence=tv"], "supports"),
        (
            ["teacher.url=http://h:1", "loss.sparse=renormalized", "intermediate.hidden_weight=1"],
            "unset teacher.url",
        ),
    ],
)
def test_schema_refuses_what_a_server_cannot_give(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(overrides=overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        [
            "teacher.url=http://h:1",
            "loss.temperature=1",
            "onpolicy.lambda=0.5",
            "loss.divergence=jsd",
        ],
        ["teacher.url=http://h:1", "loss.sparse=renormalized", "loss.temperature=3"],
        ["teacher.url=http://h:1", "loss.alpha=1"],  # labels only: the targets are never read
    ],
)
def test_schema_accepts_exact_served_losses(overrides):
    assert load_config(overrides=overrides).teacher.url == "http://h:1"


def test_rank_sorting_survives_shuffled_server_dicts(scorer, tiny_tokenizer, monkeypatch):
    """End to end: a server whose dicts come in random order gives the same targets."""
    vocab = len(tiny_tokenizer)
    blocks = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(8))
    real = json.dumps

    def shuffled_dumps(payload, *args, **kwargs):
        for choice in payload.get("choices", []) if isinstance(payload, dict) else []:
            for t, entry in enumerate(choice.get("prompt_logprobs") or []):
                if entry:
                    items = list(entry.items())
                    random.Random(t).shuffle(items)
                    choice["prompt_logprobs"][t] = dict(items)
        return real(payload, *args, **kwargs)

    with serving(scorer) as url:
        plain = _remote(url, vocab).soft_targets(blocks)
        monkeypatch.setattr("distill.pipelines.serve_teacher.json.dumps", shuffled_dumps)
        mixed = _remote(url, vocab).soft_targets(blocks)
    assert torch.equal(plain.ids, mixed.ids) and torch.equal(plain.logprobs, mixed.logprobs)


def test_serve_teacher_command_sets_the_address():
    from distill.cli import build_parser

    args = build_parser().parse_args(["serve-teacher", "--port", "0", "--host", "::1"])
    assert (args.command, args.port, args.host) == ("serve-teacher", 0, "::1")
    assert load_config().serve.host == "127.0.0.1"  # loopback unless told otherwise
