"""``distill serve-teacher``: a local teacher behind vLLM's (and SGLang's) scoring schema.

For CPU users, tests and a second machine without vLLM: ``teacher.url`` pointed at it trains
exactly as from vLLM. Standard library only (``http.server``), one model forward at a time.

Endpoints:
  GET  /v1/models         vLLM's model list (plus ``vocab_size``: the teacher's output rows)
  POST /v1/completions    token-id prompts (one or a list), ``prompt_logprobs``, ``logprobs``,
                          ``max_tokens`` 0 or 1 (greedy), ``return_tokens_as_token_ids``
  GET  /get_model_info    SGLang's model info (plus ``vocab_size``)
  POST /generate          SGLang: ``input_ids``, ``return_logprob``, ``top_logprobs_num``
  GET  /health            200

Bounds: a body over ``serve.max_request_bytes`` or more than ``serve.max_tokens_per_request``
prompt tokens gets 413; no Content-Length 411; malformed JSON, text prompts or ids outside the
vocabulary 400. It listens on loopback unless ``serve.host`` says otherwise: there is no
authentication.

The numbers are the cache writer's (``teacher_topk``): float32 logits of the teacher's rows,
``torch.topk``, ``logprob = logit - logsumexp``; rows of equal length in one request share one
forward, so a request of the cache's ``batch_size`` rows gives the cache's exact floats.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from transformers import PreTrainedModel

from distill.config import RunConfig
from distill.models import load_teacher, load_teacher_tokenizer, teacher_source

__all__ = [
    "Handler",
    "RequestError",
    "Scorer",
    "completions",
    "generate",
    "make_server",
    "serve_teacher",
]

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request the server refuses: its HTTP status and one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Scorer:
    """The teacher's top-k per position of token-id prompts (one forward at a time)."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any, name: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.vocab_rows = int(model.get_output_embeddings().weight.shape[0])
        self.max_len = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.texts = [tokenizer.decode([i]) for i in range(min(len(tokenizer), self.vocab_rows))]
        self.lock = threading.Lock()

    def text(self, token: int) -> str:
        return self.texts[token] if token < len(self.texts) else ""

    @torch.no_grad()
    def score(self, rows: list[list[int]], k: int) -> list[dict[str, torch.Tensor]]:
        """Per row of ``T`` ids: top-``k`` ``ids``/``logprobs`` ``[T, k]`` of every logits
        position, and the log-probability and rank of each next prompt token, ``[T - 1]``."""
        out: list[dict[str, torch.Tensor] | None] = [None] * len(rows)
        by_length: dict[int, list[int]] = {}
        for index, row in enumerate(rows):
            by_length.setdefault(len(row), []).append(index)
        for indices in by_length.values():
            batch = torch.tensor([rows[i] for i in indices], dtype=torch.long)  # (n, T)
            with self.lock:
                logits = self.model(input_ids=batch, use_cache=False).logits
            logits = logits[..., : self.vocab_rows].float()  # (n, T, V)
            values, ids = torch.topk(logits, k, dim=-1)  # (n, T, k), descending
            lse = torch.logsumexp(logits, dim=-1)  # (n, T)
            nxt = batch[:, 1:, None]  # (n, T-1, 1): the token each position predicted
            chosen = logits[:, :-1].gather(-1, nxt)  # (n, T-1, 1)
            ranks = (logits[:, :-1] > chosen).sum(-1) + 1  # (n, T-1)
            token_lp = chosen.squeeze(-1) - lse[:, :-1]  # (n, T-1)
            for j, i in enumerate(indices):
                out[i] = {
                    "ids": ids[j],
                    "logprobs": values[j] - lse[j][:, None],
                    "token_logprobs": token_lp[j],
                    "token_ranks": ranks[j],
                }
        return out  # type: ignore[return-value]


# --- request parsing -----------------------------------------------------------------------------


def _int_or_none(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None or value is False:
        return None
    if value is True:
        return 1
    if not isinstance(value, int) or value < 0:
        raise RequestError(400, f"{key} must be a non-negative integer, got {value!r}")
    return value


def _prompts(value: Any, scorer: Scorer, max_tokens: int) -> list[list[int]]:
    """Token-id prompts (one list of ints, or a list of them), checked and bounded."""
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RequestError(400, "the prompt must be token ids (a list of ints, or a list of them)")
    for row in value:
        if not isinstance(row, list) or not row or not all(isinstance(v, int) for v in row):
            raise RequestError(400, "this server scores token ids only, not text prompts")
        if min(row) < 0 or max(row) >= scorer.vocab_rows:
            raise RequestError(400, f"token ids must lie in [0, {scorer.vocab_rows})")
        if scorer.max_len and len(row) > scorer.max_len:
            raise RequestError(400, f"a prompt of {len(row)} tokens exceeds {scorer.max_len}")
    total = sum(len(row) for row in value)
    if total > max_tokens:
        raise RequestError(413, f"{total} prompt tokens exceed serve.max_tokens_per_request")
    return value


def _top_k(scorer: Scorer, k: int) -> int:
    if k > scorer.vocab_rows:
        raise RequestError(
            400, f"{k} log-probabilities asked, the vocabulary has {scorer.vocab_rows}"
        )
    return k


def _generate_count(value: Any) -> int:
    if value is None:
        return 1
    if not isinstance(value, int) or value not in (0, 1):
        raise RequestError(400, "this server scores prompts: max_tokens must be 0 or 1")
    return value


# --- vLLM: /v1/completions -------------------------------------------------------------------------


def _key(scorer: Scorer, token: int, as_ids: bool) -> str:
    return f"token_id:{token}" if as_ids else scorer.text(token)


def _vllm_choice(
    scorer: Scorer, index: int, row: list[int], scored: dict, prompt_k: int | None, k: int | None
) -> dict[str, Any]:
    new_tokens, as_ids = scored["new"], scored["as_ids"]
    choice: dict[str, Any] = {"index": index, "text": "", "logprobs": None}
    choice["finish_reason"] = "length"
    if new_tokens:
        token = int(scored["ids"][-1, 0])
        choice["text"] = scorer.text(token)
        if k is not None:
            ids, lps = scored["ids"][-1, :k].tolist(), scored["logprobs"][-1, :k].tolist()
            choice["logprobs"] = {
                "tokens": [_key(scorer, token, as_ids)],
                "token_logprobs": [lps[0]],
                "top_logprobs": [
                    {_key(scorer, i, as_ids): lp for i, lp in zip(ids, lps, strict=True)}
                ],
                "text_offset": [0],
            }
    if prompt_k is None:
        choice["prompt_logprobs"] = None
        return choice
    positions: list[dict[str, Any] | None] = [None]
    top_ids = scored["ids"][:, :prompt_k].tolist()  # (T, k)
    top_lps = scored["logprobs"][:, :prompt_k].tolist()
    token_lps, token_ranks = scored["token_logprobs"].tolist(), scored["token_ranks"].tolist()
    for t in range(1, len(row)):
        entry = {
            str(i): {"logprob": lp, "rank": rank + 1, "decoded_token": scorer.text(i)}
            for rank, (i, lp) in enumerate(zip(top_ids[t - 1], top_lps[t - 1], strict=True))
        }
        if str(row[t]) not in entry:  # vLLM adds the prompt token with its own rank
            entry[str(row[t])] = {
                "logprob": token_lps[t - 1],
                "rank": token_ranks[t - 1],
                "decoded_token": scorer.text(row[t]),
            }
        positions.append(entry)
    choice["prompt_logprobs"] = positions
    return choice


def completions(scorer: Scorer, body: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """vLLM's ``/v1/completions`` answer for token-id prompts."""
    model = body.get("model")
    if model is not None and model != scorer.name:
        raise RequestError(404, f"The model `{model}` does not exist.")
    rows = _prompts(body.get("prompt"), scorer, max_tokens)
    prompt_k, k = _int_or_none(body, "prompt_logprobs"), _int_or_none(body, "logprobs")
    new_tokens = _generate_count(body.get("max_tokens"))
    as_ids = bool(body.get("return_tokens_as_token_ids"))
    scored = scorer.score(rows, _top_k(scorer, max(prompt_k or 0, k or 0, 1)))
    choices = []
    for index, (row, result) in enumerate(zip(rows, scored, strict=True)):
        result = {**result, "new": new_tokens, "as_ids": as_ids}
        choices.append(_vllm_choice(scorer, index, row, result, prompt_k, k))
    prompt_tokens = sum(len(row) for row in rows)
    return {
        "id": f"cmpl-{time.time_ns():x}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": scorer.name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": new_tokens * len(rows),
            "total_tokens": prompt_tokens + new_tokens * len(rows),
        },
    }


# --- SGLang: /generate ----------------------------------------------------------------------------


def generate(scorer: Scorer, body: dict[str, Any], max_tokens: int) -> Any:
    """SGLang's ``/generate`` answer (a dict, or a list for a batch of prompts)."""
    single = isinstance(body.get("input_ids"), list) and all(
        isinstance(v, int) for v in body["input_ids"]
    )
    rows = _prompts(body.get("input_ids"), scorer, max_tokens)
    params = body.get("sampling_params") or {}
    new_tokens = _generate_count(params.get("max_new_tokens"))
    if int(body.get("logprob_start_len", 0) or 0) not in (0, -1):
        raise RequestError(400, "this server supports logprob_start_len 0 only")
    want = bool(body.get("return_logprob"))
    k = _int_or_none(body, "top_logprobs_num") or 0
    scored = scorer.score(rows, _top_k(scorer, max(k, 1)))
    answers = []
    for row, result in zip(rows, scored, strict=True):
        ids, lps = result["ids"].tolist(), result["logprobs"].tolist()
        token_lps = result["token_logprobs"].tolist()
        meta: dict[str, Any] = {
            "id": f"{time.time_ns():x}",
            "prompt_tokens": len(row),
            "completion_tokens": new_tokens,
            "finish_reason": {"type": "length", "length": new_tokens},
        }
        if want:
            meta["input_token_logprobs"] = [[None, row[0], None]] + [
                [token_lps[t - 1], row[t], None] for t in range(1, len(row))
            ]
            meta["input_top_logprobs"] = [None] + [
                [[lp, i, None] for i, lp in zip(ids[t - 1][:k], lps[t - 1][:k], strict=True)]
                for t in range(1, len(row))
            ]
            last = [[lp, i, None] for i, lp in zip(ids[-1][:k], lps[-1][:k], strict=True)]
            meta["output_token_logprobs"] = [[lps[-1][0], ids[-1][0], None]][:new_tokens]
            meta["output_top_logprobs"] = [last][:new_tokens]
        output = [ids[-1][0]][:new_tokens]
        text = scorer.text(output[0]) if output else ""
        answers.append({"text": text, "output_ids": output, "meta_info": meta})
    return answers[0] if single else answers


# --- HTTP -------------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    """The routes above; ``make_server`` binds a scorer and the bounds onto a subclass."""

    server_version = "distill-serve-teacher/1"
    protocol_version = "HTTP/1.1"
    scorer: Scorer
    max_bytes: int
    max_tokens: int

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"object": "error", "message": message, "code": status})

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        scorer = self.scorer
        if self.path == "/v1/models":
            model = {
                "id": scorer.name,
                "object": "model",
                "created": 0,
                "owned_by": "distill",
                "root": scorer.name,
                "max_model_len": scorer.max_len or None,
                "vocab_size": scorer.vocab_rows,
            }
            self._send(200, {"object": "list", "data": [model]})
        elif self.path == "/get_model_info":
            info = {"model_path": scorer.name, "is_generation": True}
            self._send(200, {**info, "vocab_size": scorer.vocab_rows})
        elif self.path == "/health":
            self._send(200, {})
        else:
            self._error(404, f"no route GET {self.path}")

    def _body(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "a Content-Length header is required")
        if not length.isdigit() or int(length) > self.max_bytes:
            raise RequestError(413, f"request body over serve.max_request_bytes={self.max_bytes}")
        try:
            body = json.loads(self.rfile.read(int(length)))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        routes = {"/v1/completions": completions, "/generate": generate}
        try:
            if self.path not in routes:
                raise RequestError(404, f"no route POST {self.path}")
            body = self._body()
            self._send(200, routes[self.path](self.scorer, body, self.max_tokens))
        except RequestError as err:
            self._error(err.status, str(err))


def make_server(
    scorer: Scorer,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_request_bytes: int = 4 << 20,
    max_tokens_per_request: int = 65536,
    handler: type[Handler] = Handler,
) -> ThreadingHTTPServer:
    """An HTTP server for ``scorer`` (port 0: any free port; read ``server.server_port``).
    ``handler`` may subclass the default one (tests inject faults)."""
    bound = type(
        "Handler",
        (handler,),
        {"scorer": scorer, "max_bytes": max_request_bytes, "max_tokens": max_tokens_per_request},
    )
    server = ThreadingHTTPServer((host, port), bound)
    server.daemon_threads = True
    return server


def serve_teacher(config: RunConfig, *, ready: Any = print) -> None:
    """Load ``teacher.*`` and serve it until interrupted (``serve.*``: address and bounds)."""
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    source = teacher_source(config.teacher)
    name = config.serve.model_name or str(config.teacher.path or source)
    scorer = Scorer(load_teacher(config.teacher), load_teacher_tokenizer(config.teacher), name)
    serve = config.serve
    server = make_server(
        scorer,
        host=serve.host,
        port=serve.port,
        max_request_bytes=serve.max_request_bytes,
        max_tokens_per_request=serve.max_tokens_per_request,
    )
    host, port = server.server_address[:2]
    ready(
        f"serving {name} ({scorer.vocab_rows} vocabulary rows) on http://{host}:{port}: "
        "POST /v1/completions (vLLM), POST /generate (SGLang); Ctrl-C stops",
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
