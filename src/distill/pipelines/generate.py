"""``distill generate``: the teacher writes training data (sequence-level KD).

``generate.mode=answers``: each prompt gets one sampled teacher response, written as one JSONL
record: a chat ``messages`` row (prompt turns + the assistant's answer) when the tokenizer has a
chat template, else a ``prompt``/``response`` row. ``generate.mode=continue``: the teacher
continues prefixes drawn from the training split of the corpus (never its held-out documents;
see :mod:`distill.data.continuations`) and the plain-text prompts of ``generate.prompts``, as
``prompt``/``response`` rows that also carry ``text`` (their concatenation), so the file trains
as prompt/response data (the loss skips the prefix) or, with ``data.format=text`` or as a
``data.sources`` entry, as packed text. ``distill run --set data.path=<output>`` trains a
student on either.

The run is resumable: a record is appended (flushed and fsynced) as soon as its batch is sampled,
a restart skips the ids already written, and every batch is sampled from its own seed
(``seed + batch index``, batches fixed by the whole prompt set), so an interrupted and resumed run
writes the same records as an uninterrupted one. The settings a file was written with are kept
beside it in ``<output>.meta.json``; a resume with other settings is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from distill.config import RunConfig
from distill.data.chat import render_prompt, require_chat_template
from distill.data.continuations import draw_prefixes
from distill.data.corpus import corpus_split, iter_documents
from distill.data.examples import detect_format
from distill.data.generations import check_meta, read_existing, sort_by_id
from distill.data.prompts import Prompt, default_prompts_path, read_prompts
from distill.errors import ConfigError, DataError
from distill.io import append_jsonl
from distill.models import load_teacher, load_teacher_tokenizer, teacher_source
from distill.sampling import Sampling, sample_continuations
from distill.train.distributed import resolve_device

__all__ = ["generate_responses"]

log = logging.getLogger(__name__)


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, chat: bool) -> list[int]:
    """Chat: the prompt turns + the assistant generation prompt; else the plain text's tokens."""
    if chat:
        messages = prompt.messages or [{"role": "user", "content": prompt.text or ""}]
        return render_prompt(tokenizer, messages)
    if prompt.messages is not None:
        require_chat_template(tokenizer, prompt.where)
    ids = tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"{prompt.where}: the prompt has no tokens")
    return ids


def _record(
    prompt: Prompt, chat: bool, response: str, n_tokens: int, finished: bool
) -> dict[str, Any]:
    head: dict[str, Any] = {"id": prompt.index}
    if chat:
        messages = prompt.messages or [{"role": "user", "content": prompt.text or ""}]
        head["messages"] = [*messages, {"role": "assistant", "content": response}]
    else:
        head |= {"prompt": prompt.text, "response": response}
    return head | {"response_tokens": n_tokens, "finished": finished}


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Prompt indices in batches of similar length (longest first, ties by index)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@dataclass
class _Job:
    """What to sample: each record's input ids, how its record is written (index, response
    text, response tokens, finished), the settings kept beside the output."""

    inputs: list[list[int]]
    record: Callable[[int, str, int, bool], dict[str, Any]]
    meta: dict[str, Any]
    unit: str


def _answers_job(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> _Job:
    """One answer per prompt of ``generate.prompts`` (chat rows with a chat template)."""
    prompts_file = Path(config.generate.prompts or default_prompts_path())
    prompts = read_prompts(prompts_file)
    chat = bool(getattr(tokenizer, "chat_template", None))
    meta = {
        "teacher": teacher_source(config.teacher),
        "teacher_dtype": config.teacher.dtype,
        "prompts": str(prompts_file.resolve()),
        "prompts_sha256": hashlib.sha256(prompts_file.read_bytes()).hexdigest(),
        "n_prompts": len(prompts),
        "format": "chat" if chat else "prompt_response",
    }
    return _Job(
        [_prompt_ids(tokenizer, prompt, chat) for prompt in prompts],
        lambda index, text, n, finished: _record(prompts[index], chat, text, n, finished),
        meta,
        "prompt",
    )


def _continue_job(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> _Job:
    """``generate.continuations`` prefixes of the training split of ``data.path`` (never its
    held-out documents), then the plain-text prompts of ``generate.prompts`` if set; each
    record is a prompt/response row plus their concatenation as ``text``."""
    settings, data = config.generate, config.data
    if data.sources:
        raise ConfigError(
            "generate.mode=continue draws prefixes from data.path; with data.sources, run it "
            "once per source (--set data.sources=null --set data.path=FILE)"
        )
    if data.path is not None and detect_format(data.path, data.format) != "text":
        raise ConfigError(
            f"generate.mode=continue: data.path {data.path} holds chat or prompt/response rows; "
            "prefixes are drawn from text (set data.format=text to read its text_field)"
        )

    def documents() -> Iterator[str]:
        return iter_documents(data.path, data.text_field)

    split = corpus_split(documents(), data.heldout_fraction, str(data.path))
    prefixes = draw_prefixes(
        documents, split, tokenizer, settings.continuations, settings.prefix_tokens, config.seed
    )
    sources = ["corpus"] * len(prefixes)
    prompts_file = Path(settings.prompts) if settings.prompts else None
    if prompts_file is not None:
        for prompt in read_prompts(prompts_file):
            if prompt.text is None:
                raise DataError(
                    f"{prompt.where}: generate.mode=continue continues plain text; chat "
                    "`messages` prompts need generate.mode=answers"
                )
            prefixes.append(prompt.text)
            sources.append("prompts")
    if not prefixes:
        raise ConfigError("generate.mode=continue: nothing to continue (generate.continuations=0)")
    inputs = []
    for index, prefix in enumerate(prefixes):
        ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]  # as training reads it
        if not ids:
            raise DataError(f"continuation {index}: its prefix {prefix!r} has no tokens")
        inputs.append(ids)

    def record(index: int, text: str, n_tokens: int, finished: bool) -> dict[str, Any]:
        prefix = prefixes[index]
        return {
            "id": index,
            "prompt": prefix,
            "response": text,
            "text": prefix + text,
            "source": sources[index],
            "response_tokens": n_tokens,
            "finished": finished,
        }

    meta = {
        "mode": "continue",
        "teacher": teacher_source(config.teacher),
        "teacher_dtype": config.teacher.dtype,
        "corpus": None if data.path is None else str(Path(data.path).resolve()),
        "text_field": data.text_field,
        "heldout_fraction": data.heldout_fraction,
        "corpus_fingerprint": split.fingerprint,
        "continuations": settings.continuations,
        "prefix_tokens": settings.prefix_tokens,
        "prompts": None if prompts_file is None else str(prompts_file.resolve()),
        "prompts_sha256": None
        if prompts_file is None
        else hashlib.sha256(prompts_file.read_bytes()).hexdigest(),
        "n_prompts": len(prefixes),
        "prefixes_sha256": hashlib.sha256(json.dumps(prefixes).encode()).hexdigest(),
        "format": "prompt_response",
    }
    return _Job(inputs, record, meta, "continuation")


def generate_responses(config: RunConfig) -> Path:
    """Sample one teacher response per prompt of ``generate.prompts`` (``generate.mode=answers``)
    or one continuation per drawn corpus prefix and prompt (``continue``) into
    ``generate.output``, resuming a partial file; returns the output path."""
    settings = config.generate
    device = resolve_device(config.train)  # a missing GPU: one line, before anything loads
    output = Path(settings.output) if settings.output else config.run_dir / "generations.jsonl"
    tokenizer = load_teacher_tokenizer(config.teacher)
    job = (_continue_job if settings.mode == "continue" else _answers_job)(config, tokenizer)
    sampling = Sampling(settings.max_new_tokens, settings.temperature, settings.top_p)
    meta = job.meta | {
        "seed": config.seed,
        "batch_size": settings.batch_size,
        "max_new_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    check_meta(output, meta, has_records=output.is_file() and output.stat().st_size > 0)
    done = set(read_existing(output, len(job.inputs)))
    batches = _batches([len(ids) for ids in job.inputs], settings.batch_size)
    todo = [(b, batch) for b, batch in enumerate(batches) if not done.issuperset(batch)]
    if todo:
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        model = load_teacher(config.teacher).to(device)
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        pad = pad if pad is not None else 0
        bar = tqdm(total=len(job.inputs), initial=len(done), desc="generate", unit=job.unit)
        tokens, seconds = 0, 0.0
        for batch_index, batch in todo:
            torch.manual_seed(config.seed + batch_index)  # a resumed batch samples the same
            start = time.perf_counter()
            continuations = sample_continuations(
                model, [job.inputs[i] for i in batch], sampling, eos_token_id=eos, pad_token_id=pad
            )
            seconds += time.perf_counter() - start
            tokens += sum(len(ids) for ids in continuations)
            for index, ids in zip(batch, continuations, strict=True):
                if index in done:  # written before an interruption
                    continue
                text = tokenizer.decode(ids, skip_special_tokens=True)
                finished = eos is not None and bool(ids) and ids[-1] == eos
                append_jsonl(output, job.record(index, text, len(ids), finished))
                done.add(index)
                bar.update(1)
            bar.set_postfix_str(f"{tokens / max(seconds, 1e-9):.1f} tok/s")
        bar.close()
        log.info(
            "generated %d tokens in %.1f s (%.1f tokens/s)",
            tokens,
            seconds,
            tokens / max(seconds, 1e-9),
        )
    sort_by_id(output)
    return output
