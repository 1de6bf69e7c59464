"""Exact checkpoints: student, optimizer, schedule, data position, RNG states, metrics so far.

A checkpoint is a directory ``step-NNNNNNNN/`` written whole or not at all (temp dir + rename):

    model.safetensors   student weights (shared/tied tensors handled by safetensors)
    optimizer.pt        optimizer state dict (tensors and numbers only: loads with weights_only)
    trainer.pt          step, scheduler, data position, per-rank RNG states, metric history,
                        the intermediate-layer projection (when there is one)
    checksums.json      sha256 of each file above, written last

Under FSDP the student and optimizer are gathered on rank 0 into these same files (the optimizer
state keyed by parameter index, as an unsharded optimizer's). Loading verifies every checksum;
a corrupt or truncated checkpoint is skipped with a warning and the previous one is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from distill.io import atomic_directory

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]

log = logging.getLogger(__name__)

_FILES = ("model.safetensors", "optimizer.pt", "trainer.pt")


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states of this process as plain lists and numbers.

    Plain types load with ``weights_only=True`` and travel through ``all_gather_object``.
    """
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():  # this process's device (GPU sampling draws from it)
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(
    directory: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``directory/step-NNNNNNNN`` atomically, then prune to the newest ``keep``.

    ``optimizer``: the optimizer, or its state dict (gathered from FSDP shards, same format)."""
    target = directory / f"step-{step:08d}"
    optimizer_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    with atomic_directory(target) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save({"step": step, **trainer_state}, tmp / "trainer.pt")
        checksums = {name: _sha256(tmp / name) for name in _FILES}
        (tmp / "checksums.json").write_text(json.dumps(checksums, indent=1))
    for old in _checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("step-*") if p.is_dir() and not p.name.startswith("."))


def _verified(checkpoint: Path) -> bool:
    try:
        checksums = json.loads((checkpoint / "checksums.json").read_text())
        return all(_sha256(checkpoint / name) == checksums[name] for name in _FILES)
    except (OSError, ValueError, KeyError):
        return False


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint whose checksums verify; corrupt ones are skipped with a warning."""
    for checkpoint in reversed(_checkpoints(directory)):
        if _verified(checkpoint):
            return checkpoint
        log.warning(
            "checkpoint %s is corrupt or incomplete (checksum): using the previous one", checkpoint
        )
    return None


def load_checkpoint(
    checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """Restore model and optimizer in place; return the trainer state (step, schedule, ...).

    With ``optimizer`` None its state dict is returned under ``"optimizer"`` instead (FSDP
    scatters it to the shards)."""
    missing, unexpected = load_model(model, str(checkpoint / "model.safetensors"), strict=True)
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {checkpoint} does not match the model: {missing or unexpected}"
        )
    # Read onto the CPU: a GPU run's checkpoint resumes on a CPU-only machine too
    # (``optimizer.load_state_dict`` moves the state to each parameter's device).
    optimizer_state = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
    trainer_state = torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=True)
    if optimizer is None:
        return {**trainer_state, "optimizer": optimizer_state}
    optimizer.load_state_dict(optimizer_state)
    return trainer_state
