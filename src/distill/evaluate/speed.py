"""Greedy generation speed and peak memory, each model measured in a fresh process.

A fresh process per model makes the peak resident memory (``VmHWM`` of /proc/self/status; not
``ru_maxrss``, which a child inherits from its parent across fork + exec) belong to that model
alone (plus the interpreter, torch and transformers, the same for every model), and keeps one
model's allocations from warming or fragmenting another's. Run as
``python -m distill.evaluate.speed MODEL_DIR --threads N --new-tokens K --prompt P ...``;
it prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from distill.sysinfo import peak_rss_bytes

__all__ = ["measure_generation", "measure_in_subprocess", "weights_bytes"]


def weights_bytes(model_dir: str | Path) -> int:
    """Bytes of the model's safetensors files on disk."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def measure_generation(model_dir: str, prompts: list[str], new_tokens: int, threads: int) -> dict:
    """Greedy decoding with the KV cache at batch 1: generated tokens / wall seconds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads > 0:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def generate(prompt: str, max_new: int) -> int:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
        return output.shape[1] - input_ids.shape[1]

    with torch.no_grad():
        generate(prompts[0], 4)  # warm-up: first-call allocations and kernel selection
        generated = 0
        start = time.perf_counter()
        for prompt in prompts:
            generated += generate(prompt, new_tokens)
        seconds = time.perf_counter() - start
    return {
        "tokens_per_s": generated / seconds,
        "generated_tokens": generated,
        "threads": torch.get_num_threads(),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def measure_in_subprocess(
    model_dir: str | Path, prompts: list[str], new_tokens: int, threads: int
) -> dict:
    """Run :func:`measure_generation` in a fresh Python process and return its JSON result."""
    command = [sys.executable, "-m", "distill.evaluate.speed", str(model_dir)]
    command += ["--threads", str(threads), "--new-tokens", str(new_tokens)]
    for prompt in prompts:
        command += ["--prompt", prompt]
    env = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"speed measurement of {model_dir} failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", action="append", required=True)
    args = parser.parse_args()
    result = measure_generation(args.model_dir, args.prompt, args.new_tokens, args.threads)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
