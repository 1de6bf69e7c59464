"""Greedy generation timing of any model distill can load, in a fresh process.

Batch 1 and batch 8 tokens/s (prompts cycled, left-padded), time to first token (prefill plus
one decoding step at batch 1), one warm-up call per setting, then the median of ``runs`` timed
calls; peak resident memory (``VmHWM``) of the process, which loaded only this model. Run as
``python -m distill.evaluate.generation MODEL --settings JSON``; it prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distill.config import EvalConfig

__all__ = [
    "GenerationSettings",
    "timed_generate",
    "measure_generation",
    "measure_generation_in_subprocess",
]


@dataclass
class GenerationSettings:
    """What one timing measures; :meth:`from_config` builds it from the ``eval`` section, so
    ``distill run`` and ``distill eval`` time a model the same way."""

    prompts: list[str]
    new_tokens: int
    batch_sizes: tuple[int, ...]
    runs: int
    threads: int = 0

    @classmethod
    def from_config(cls, eval_config: EvalConfig, threads: int = 0) -> GenerationSettings:
        return cls(
            prompts=list(eval_config.gen_prompts),
            new_tokens=eval_config.gen_new_tokens,
            batch_sizes=tuple(eval_config.gen_batch_sizes),
            runs=eval_config.gen_runs,
            threads=threads,
        )


def timed_generate(model, tokenizer, prompts: list[str], new_tokens: int) -> float:
    """Seconds for one greedy ``generate`` of exactly ``new_tokens`` tokens per prompt."""
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    output = model.generate(
        encoded.input_ids,
        attention_mask=encoded.attention_mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    seconds = time.perf_counter() - start
    if output.shape[1] - encoded.input_ids.shape[1] != new_tokens:
        raise RuntimeError(f"generated {output.shape[1] - encoded.input_ids.shape[1]} tokens")
    return seconds


def measure_generation(model_path: str | Path, settings: GenerationSettings) -> dict:
    """Tokens/s per batch size, time to first token and peak RSS for the model at ``model_path``."""
    import torch

    from distill.compress.store import load_model
    from distill.models import load_tokenizer
    from distill.sysinfo import peak_rss_bytes

    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    model = load_model(model_path)
    tokenizer = load_tokenizer(model_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = settings.prompts
    result: dict = {"threads": torch.get_num_threads()}
    with torch.no_grad():
        timed_generate(model, tokenizer, prompts[:1], 1)  # warm-up
        ttft = [
            timed_generate(model, tokenizer, [prompts[i % len(prompts)]], 1)
            for i in range(settings.runs)
        ]
        result["ttft_s"] = statistics.median(ttft)
        for batch in settings.batch_sizes:
            batch_prompts = [prompts[i % len(prompts)] for i in range(batch)]
            timed_generate(model, tokenizer, batch_prompts, 4)  # warm-up
            seconds = [
                timed_generate(model, tokenizer, batch_prompts, settings.new_tokens)
                for _ in range(settings.runs)
            ]
            result[f"tokens_per_s_batch{batch}"] = (
                batch * settings.new_tokens / statistics.median(seconds)
            )
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def measure_generation_in_subprocess(model_path: str | Path, settings: GenerationSettings) -> dict:
    """Run :func:`measure_generation` in a fresh Python process and return its result."""
    command = [sys.executable, "-m", "distill.evaluate.generation", str(model_path)]
    command += ["--settings", json.dumps(asdict(settings))]
    env = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"generation timing of {model_path} failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_path")
    parser.add_argument("--settings", default="{}", help="GenerationSettings as JSON")
    args = parser.parse_args()
    raw = json.loads(args.settings)
    if "batch_sizes" in raw:
        raw["batch_sizes"] = tuple(raw["batch_sizes"])
    print(json.dumps(measure_generation(args.model_path, GenerationSettings(**raw))))


if __name__ == "__main__":
    main()
