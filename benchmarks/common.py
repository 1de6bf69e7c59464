"""Helpers shared by the benchmark scripts: matmul roofline, timing, results JSON."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for the GPU's queued work (timings of CUDA code are meaningless without it)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_s(
    size: int = 2048,
    repeats: int = 5,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> float:
    """Best-of-``repeats`` square matmul rate on this machine (FLOP/s), float32 on the CPU by
    default; on a GPU pass its device and the compute dtype (bf16 under autocast)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def timed(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[Any, float]:
    """``fn()`` and its wall time; with a CUDA ``device``, the GPU work is waited for."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


PEERS = (
    "transformers",
    "tokenizers",
    "safetensors",
    "torchao",
    "liger-kernel",
    "trl",
    "accelerate",
)


def _git_describe() -> str:
    try:
        return (
            subprocess.run(
                ["git", "describe", "--always", "--dirty"],
                cwd=Path(__file__).resolve().parent,
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        return "unknown"


def versions() -> dict[str, str | None]:
    """Python, torch and the installed version of each peer library (None: not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in PEERS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


# Taken when a script imports this module, i.e. as it starts: the code it runs and the load.
_COMMIT_AT_START = _git_describe()
_LOAD_AT_START = list(os.getloadavg())


def provenance() -> dict[str, Any]:
    """What a result was measured with: the commit (``git describe --dirty`` as the script
    started), the exact command line, the load average as it started and as it ends, versions."""
    return {
        "commit": _COMMIT_AT_START,
        "argv": list(sys.argv),
        "load_average_before": _LOAD_AT_START,
        "load_average_after": list(os.getloadavg()),
        "versions": versions(),
    }


def target(name: str, value: float, goal: float, better: str) -> dict[str, Any]:
    met = value <= goal if better == "lower" else value >= goal
    return {"name": name, "value": value, "target": goal, "better": better, "met": met}


def paired_ratio(numerators: list[float], denominators: list[float]) -> dict[str, Any]:
    """The median of per-round ratios of two things measured side by side in each round, with
    every ratio and their spread: a machine whose speed drifts between rounds moves both sides
    of a round alike, which a ratio of the two medians does not see."""
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True)]
    return {
        "median": statistics.median(ratios),
        "per_round": ratios,
        "spread": [min(ratios), max(ratios)],
    }


def write_results(name: str, payload: dict[str, Any]) -> Path:
    machine = {
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(0)
    payload = {"machine": machine, **provenance(), **payload}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path


def merge_results(
    name: str, section: str, payload: dict[str, Any], targets: list[dict[str, Any]]
) -> Path:
    """Write one arm of a script into ``results/NAME.json`` as ``section`` (with this run's
    provenance inside it) and its ``targets`` (each replacing the target of its name; new ones
    appended), keeping the other sections: an arm rerun alone keeps the others' numbers."""
    path = RESULTS / f"{name}.json"
    existing = json.loads(path.read_text()) if path.is_file() else {}
    kept = {key: value for key, value in existing.items() if isinstance(value, dict)}
    kept.pop("machine", None)  # write_results records this machine again
    fresh = {entry["name"]: entry for entry in targets}
    merged = [fresh.pop(entry["name"], entry) for entry in existing.get("targets", [])]
    kept[section] = {**provenance(), **payload}
    return write_results(name, {**kept, "targets": merged + list(fresh.values())})


def print_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))


def step_timing(
    student: torch.nn.Module,
    teachers: dict,
    blocks: torch.Tensor,
    reps: int,
    vocab: int,
    loss: Any = None,
) -> dict[str, list[float]]:
    """Seconds per KD step (forward, backward, AdamW) of a copy of ``student`` for each teacher,
    alternating teachers on every repetition; the first repetition warms up and is not timed.
    ``loss`` is a ``LossConfig`` (default: the schema's)."""
    import copy

    from distill.config import LossConfig, TrainConfig
    from distill.losses.schedule import loss_settings
    from distill.train import build_optimizer
    from distill.train.causal_lm import micro_batch_terms

    settings = loss_settings(loss if loss is not None else LossConfig())
    models = {name: copy.deepcopy(student).train() for name in teachers}
    optimizers = {name: build_optimizer(models[name], TrainConfig())[0] for name in teachers}
    seconds: dict[str, list[float]] = {name: [] for name in teachers}
    for rep in range(reps + 1):  # the first repetition warms up (allocations, optimizer state)
        for name, teacher in teachers.items():
            start = time.perf_counter()
            terms = micro_batch_terms(models[name], teacher, blocks, settings, vocab)
            (terms.loss_sum / terms.n_tokens).backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if rep:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def tiny_teacher(directory: Path) -> Path:
    """``--tiny``: a 4-layer random Llama with a byte-level BPE tokenizer trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    from distill.data.corpus import default_documents

    bpe.train_from_iterator(default_documents()[:20], trainer)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=4, num_key_value_heads=2,
                    max_position_embeddings=512, tie_word_embeddings=True, **shape)
    )  # fmt: skip
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
