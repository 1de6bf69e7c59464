"""A served teacher: top-k log-probabilities from an inference server over HTTP.

:class:`RemoteTeacher` sends each block's token ids (no re-tokenisation) to a server and turns
its answer into :class:`~distill.losses.sparse.SparseTargets`, so the training loop treats it like
the on-disk cache. Two request schemas:

- ``vllm``: ``POST /v1/completions`` (vLLM's OpenAI-compatible server, and ``distill
  serve-teacher``) with ``prompt`` = token ids, ``prompt_logprobs = k``, ``logprobs = k``,
  ``max_tokens = 1``, ``return_tokens_as_token_ids``. ``prompt_logprobs[t]`` (a dict ``{id:
  {logprob, rank, ...}}``) is the distribution that predicted token ``t``, i.e. logits position
  ``t - 1``; entry 0 is ``null``. The last position's distribution is the one generated token's
  ``top_logprobs``. A position's dict may hold the prompt token beside the top k (with its own,
  larger rank), so entries are sorted by ``rank`` and the first k kept; dict order means nothing.
- ``sglang``: ``POST /generate`` with ``input_ids``, ``return_logprob``, ``logprob_start_len = 0``
  and ``top_logprobs_num = k``; ``meta_info.input_top_logprobs`` holds ``[logprob, id, text]``
  lists (entry 0 ``null``), ``output_top_logprobs[0]`` the last position. Entries are ranked by
  log-probability (ties by id).

Temperature: a server returns ``log softmax(z)`` at ``T = 1`` (the request samples at
temperature 1, so servers that apply the sampling temperature to logprobs give the same). The
targets therefore carry the one log-normaliser ``c_1 = logsumexp(log softmax(z)) = 0``: the
tail-bucket loss is exact at ``T = 1`` (its tail is ``1 - sum of the kept probabilities``) and
the renormalised top-k loss at any ``T``; the schema refuses the others.

Failures (unreachable, timeout, a cut or malformed answer, another model or vocabulary, fewer
than k entries) raise :class:`RemoteTeacherError`: one line, exit 2. Timeouts, connection
errors, 5xx answers and cut bodies are retried with exponential backoff first.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch

from distill.errors import DistillError
from distill.losses.sparse import SparseTargets

__all__ = [
    "RemoteTeacher",
    "RemoteTeacherError",
    "ServerInfo",
    "vllm_request",
    "parse_vllm",
    "sglang_request",
    "parse_sglang",
]

log = logging.getLogger(__name__)

Api = Literal["vllm", "sglang"]
Row = tuple[list[int], list[float]]  # one position: k ids, their log-probabilities (descending)


class RemoteTeacherError(DistillError):
    """A served teacher is unreachable, too slow, or answers something unusable."""


@dataclass(frozen=True)
class ServerInfo:
    """What a server says it serves: model names and (if it says) the vocabulary's row count."""

    models: tuple[str, ...]
    vocab_size: int | None


# --- request and response schemas (pure) -----------------------------------------------------


def vllm_request(rows: list[list[int]], k: int, model: str | None) -> dict[str, Any]:
    """``/v1/completions`` body scoring ``rows`` (token ids) with the top ``k`` per position."""
    body: dict[str, Any] = {
        "prompt": rows,
        "max_tokens": 1,
        "temperature": 1.0,
        "prompt_logprobs": k,
        "logprobs": k,
        "return_tokens_as_token_ids": True,
    }
    if model is not None:
        body["model"] = model
    return body


def sglang_request(rows: list[list[int]], k: int) -> dict[str, Any]:
    """``/generate`` body scoring ``rows`` with the top ``k`` per position."""
    return {
        "input_ids": rows,
        "sampling_params": {"max_new_tokens": 1, "temperature": 1.0},
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": k,
        "return_text_in_logprobs": False,
    }


def _top(entries: list[tuple[int, int, float]], k: int, where: str) -> Row:
    """The ``k`` best of ``(rank, id, logprob)`` entries, by rank (ties: higher logprob, id)."""
    ranked = sorted(entries, key=lambda e: (e[0], -e[2], e[1]))[:k]
    if len(ranked) < k or ranked[-1][0] > k:
        raise RemoteTeacherError(
            f"{where}: the server returned {sum(e[0] <= k for e in entries)} top entries, "
            f"fewer than teacher.top_k={k} (vLLM: raise --max-logprobs)"
        )
    return [e[1] for e in ranked], [e[2] for e in ranked]


def _by_value(pairs: list[tuple[int, float]]) -> list[tuple[int, int, float]]:
    """``(id, logprob)`` pairs ranked by logprob (descending, ties by id): ``(rank, id, lp)``."""
    ordered = sorted(pairs, key=lambda p: (-p[1], p[0]))
    return [(rank + 1, token, value) for rank, (token, value) in enumerate(ordered)]


def _token_id(key: str) -> int:
    """A ``top_logprobs`` key rendered with ``return_tokens_as_token_ids``: ``token_id:123``."""
    if not key.startswith("token_id:"):
        raise RemoteTeacherError(
            f"the server keyed top_logprobs by text ({key!r}), not 'token_id:N': it ignores "
            "return_tokens_as_token_ids (vLLM >= 0.5.4 honours it)"
        )
    return int(key.removeprefix("token_id:"))


def _check_length(positions: list[Any], length: int, where: str) -> None:
    if not isinstance(positions, list) or len(positions) != length:
        have = len(positions) if isinstance(positions, list) else type(positions).__name__
        raise RemoteTeacherError(
            f"{where}: {have} positions of log-probabilities for a prompt of {length} tokens "
            "(a response cut short, or a server ignoring prompt logprobs)"
        )


def parse_vllm(response: dict[str, Any], lengths: list[int], k: int) -> list[list[Row]]:
    """Per prompt, per logits position ``0..T-1``, the top ``k`` of a ``/v1/completions`` answer."""
    choices = sorted(response.get("choices") or [], key=lambda c: c.get("index", 0))
    if len(choices) != len(lengths):
        raise RemoteTeacherError(
            f"the server answered {len(choices)} choices for {len(lengths)} prompts"
        )
    out = []
    for prompt, (choice, length) in enumerate(zip(choices, lengths, strict=True)):
        where = f"prompt {prompt}"
        positions = choice.get("prompt_logprobs")
        _check_length(positions, length, where)
        rows = []
        for t in range(1, length):  # entry 0 (null) predicts nothing
            entries = positions[t] or {}
            ranked = [(int(e["rank"]), int(i), float(e["logprob"])) for i, e in entries.items()]
            rows.append(_top(ranked, k, f"{where}, position {t}"))
        tops = (choice.get("logprobs") or {}).get("top_logprobs") or [None]
        last = [(_token_id(key), float(v)) for key, v in (tops[0] or {}).items()]
        rows.append(_top(_by_value(last), k, f"{where}, last position"))
        out.append(rows)
    return out


def _sglang_row(entries: list[list[Any]] | None, k: int, where: str) -> Row:
    pairs = [(int(entry[1]), float(entry[0])) for entry in entries or []]
    return _top(_by_value(pairs), k, where)


def parse_sglang(response: Any, lengths: list[int], k: int) -> list[list[Row]]:
    """Per prompt, per logits position, the top ``k`` of a ``/generate`` answer (one dict per
    prompt, or a list of them for a batch)."""
    answers = response if isinstance(response, list) else [response]
    if len(answers) != len(lengths):
        raise RemoteTeacherError(
            f"the server answered {len(answers)} results for {len(lengths)} prompts"
        )
    out = []
    for prompt, (answer, length) in enumerate(zip(answers, lengths, strict=True)):
        where = f"prompt {prompt}"
        meta = answer.get("meta_info") or {}
        positions = meta.get("input_top_logprobs")
        _check_length(positions, length, where)
        rows = [_sglang_row(positions[t], k, f"{where}, position {t}") for t in range(1, length)]
        last = (meta.get("output_top_logprobs") or [None])[0]
        rows.append(_sglang_row(last, k, f"{where}, last position"))
        out.append(rows)
    return out


# --- HTTP ---------------------------------------------------------------------------------------


def _opener(url: str) -> urllib.request.OpenerDirector:
    """No proxy for a loopback server (an environment proxy would not reach it)."""
    host = urllib.parse.urlparse(url).hostname or ""
    if host in ("localhost", "::1") or host.startswith("127."):
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


class RemoteTeacher:
    """Top-k soft targets from a served teacher at ``url`` (see the module docstring).

    ``vocab_rows``: the run's shared output rows; an id at or beyond them is refused. Each call
    of :meth:`soft_targets` splits the batch into requests of ``rows_per_request`` sequences,
    ``concurrency`` of them in flight at once.
    """

    temperatures = (1.0,)

    def __init__(
        self,
        url: str,
        *,
        vocab_rows: int,
        api: Api = "vllm",
        top_k: int = 64,
        model: str | None = None,
        rows_per_request: int = 4,
        concurrency: int = 4,
        timeout_s: float = 120.0,
        retries: int = 3,
        retry_backoff_s: float = 1.0,
    ) -> None:
        if api not in ("vllm", "sglang"):
            raise ValueError(f"api must be vllm or sglang, got {api!r}")
        self.url = url.rstrip("/")
        self.vocab_rows = vocab_rows
        self.api: Api = api
        self.top_k = top_k
        self.model = model
        self.rows_per_request = rows_per_request
        self.timeout_s = timeout_s
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.last_seconds: float | None = None  # wall time of the last soft_targets call
        self._opener = _opener(self.url)
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="remote-teacher")

    @classmethod
    def from_config(cls, teacher: Any, vocab_rows: int) -> RemoteTeacher:
        """From a ``TeacherConfig`` whose ``url`` is set."""
        return cls(
            teacher.url,
            vocab_rows=vocab_rows,
            api=teacher.api,
            top_k=teacher.top_k,
            model=teacher.served_model,
            rows_per_request=teacher.rows_per_request,
            concurrency=teacher.concurrency,
            timeout_s=teacher.timeout_s,
            retries=teacher.retries,
            retry_backoff_s=teacher.retry_backoff_s,
        )

    # --- transport ----------------------------------------------------------------------------

    def _request(self, path: str, payload: dict[str, Any] | None) -> Any:
        """One JSON request with retries; a :class:`RemoteTeacherError` after the last try."""
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url + path, data=data, headers=headers)
            try:
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                detail = err.read()[:200].decode("utf-8", "replace").replace("\n", " ")
                if err.code < 500:  # the request itself is wrong: retrying cannot help
                    raise RemoteTeacherError(
                        f"teacher server {self.url}{path} answered HTTP {err.code}: {detail}"
                    ) from None
                problem = f"answered HTTP {err.code} ({detail})"
            except TimeoutError:
                problem = f"gave no answer within teacher.timeout_s={self.timeout_s:g} s"
            except urllib.error.URLError as err:
                if isinstance(err.reason, TimeoutError):
                    problem = f"gave no answer within teacher.timeout_s={self.timeout_s:g} s"
                else:
                    problem = f"is unreachable ({err.reason})"
            except (http.client.HTTPException, ConnectionError) as err:
                problem = f"cut the response short ({type(err).__name__})"
            except json.JSONDecodeError:
                problem = "sent a response that is not whole JSON (cut short?)"
            log.warning("teacher server %s%s %s (try %d)", self.url, path, problem, attempt + 1)
        raise RemoteTeacherError(
            f"teacher server {self.url}{path} {problem}, {self.retries + 1} tries "
            "(teacher.timeout_s, teacher.retries)"
        )

    # --- identity -----------------------------------------------------------------------------

    def server_info(self) -> ServerInfo:
        """The served model names and vocabulary size (``/v1/models`` or ``/get_model_info``)."""
        if self.api == "vllm":
            listing = self._request("/v1/models", None)
            entries = listing.get("data") or [] if isinstance(listing, dict) else []
            models = tuple(str(e.get("id")) for e in entries)
            sizes = {e.get("vocab_size") for e in entries if e.get("vocab_size") is not None}
            if self.model is not None:
                sizes = {e.get("vocab_size") for e in entries if e.get("id") == self.model}
            vocab = next(iter(sizes)) if len(sizes) == 1 else None
            return ServerInfo(models, None if vocab is None else int(vocab))
        info = self._request("/get_model_info", None)
        vocab = info.get("vocab_size")
        return ServerInfo((str(info.get("model_path")),), None if vocab is None else int(vocab))

    def check_server(self, *, teacher_rows: int | None, tokens: int) -> ServerInfo:
        """Refuse a server of another model: a name other than ``served_model`` (or several
        names and none chosen), or a vocabulary other than the teacher's ``teacher_rows`` (when
        known) or smaller than the tokenizer's ``tokens``. Fixes ``model`` to the served one."""
        info = self.server_info()
        if self.model is not None and self.model not in info.models:
            raise RemoteTeacherError(
                f"teacher server {self.url} serves {list(info.models)}, not "
                f"teacher.served_model={self.model}"
            )
        if self.model is None and self.api == "vllm":
            if len(info.models) != 1:
                raise RemoteTeacherError(
                    f"teacher server {self.url} serves {list(info.models)}: set "
                    "teacher.served_model to one of them"
                )
            self.model = info.models[0]
        vocab = info.vocab_size
        if vocab is not None and (vocab < tokens or teacher_rows not in (None, vocab)):
            want = teacher_rows if teacher_rows is not None else f"at least {tokens}"
            raise RemoteTeacherError(
                f"teacher server {self.url} serves {list(info.models)} with {vocab} vocabulary "
                f"rows, this run's teacher has {want}: another model?"
            )
        return info

    # --- scoring ------------------------------------------------------------------------------

    def _score(self, rows: list[list[int]]) -> list[list[Row]]:
        lengths = [len(row) for row in rows]
        if self.api == "vllm":
            answer = self._request("/v1/completions", vllm_request(rows, self.top_k, self.model))
            return parse_vllm(answer, lengths, self.top_k)
        answer = self._request("/generate", sglang_request(rows, self.top_k))
        return parse_sglang(answer, lengths, self.top_k)

    def soft_targets(self, input_ids: torch.Tensor) -> SparseTargets:
        """The server's top-k of every position of ``input_ids`` ``[B, T]``: rows ``[B, T, k]``."""
        start = time.perf_counter()
        rows = input_ids.tolist()
        size = self.rows_per_request
        futures = [
            self._pool.submit(self._score, rows[i : i + size]) for i in range(0, len(rows), size)
        ]
        scored: list[list[Row]] = []
        try:
            for future in futures:
                scored.extend(future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        ids = torch.tensor([[p[0] for p in seq] for seq in scored], dtype=torch.int64)  # (B,T,k)
        logprobs = torch.tensor([[p[1] for p in seq] for seq in scored], dtype=torch.float32)
        if ids.numel() and int(ids.max()) >= self.vocab_rows:
            raise RemoteTeacherError(
                f"teacher server {self.url} answered token id {int(ids.max())}, beyond this run's "
                f"{self.vocab_rows} vocabulary rows: another model?"
            )
        self.last_seconds = time.perf_counter() - start
        device = input_ids.device
        return SparseTargets(
            ids=ids.to(device),
            logprobs=logprobs.to(device),
            lognorm=torch.zeros(*ids.shape[:2], 1, device=device),  # (B, T, 1): c_1 = 0
            temperatures=self.temperatures,
        )

    def close(self) -> None:
        """Stop the request threads (waits for requests in flight)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
