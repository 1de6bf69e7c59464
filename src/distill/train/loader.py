"""A re-iterable data loader read as an endless stream, at a position checkpoints restore."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from distill.train.checkpoint import rng_state, set_rng_state

__all__ = ["LoaderPosition"]


class LoaderPosition:
    """Batches forever from a re-iterable loader, at a position that checkpoints can restore.

    The position is the epoch, how many batches of it were drawn, and the RNG states taken just
    before that epoch's iterator was created: the process RNGs (Python, NumPy, torch) and the
    ``generator`` of the loader and of its sampler(s), if any. :meth:`restore` sets those states,
    re-creates the epoch's iterator (so a shuffling ``DataLoader`` draws the same permutation and
    worker seeds) and skips the drawn batches: exact for any loader whose order depends only on
    these RNGs, at the cost of loading the skipped batches again. Each epoch re-iterates the
    loader (a shuffling DataLoader reshuffles).
    """

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader
        self.epoch = 0
        self.drawn = 0
        self._iterator: Iterator[Any] | None = None
        self._epoch_rng: dict[str, Any] | None = None

    def generators(self) -> list[torch.Generator]:
        """The loader's own RNGs: ``generator`` of the loader, its sampler and batch sampler."""
        owners = [self.loader, getattr(self.loader, "sampler", None)]
        batch_sampler = getattr(self.loader, "batch_sampler", None)
        owners += [batch_sampler, getattr(batch_sampler, "sampler", None)]
        found: list[torch.Generator] = []
        for owner in owners:
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
                found.append(generator)
        return found

    def rng(self) -> dict[str, Any]:
        """The process and loader RNG states now."""
        return {"process": rng_state(), "loader": [g.get_state() for g in self.generators()]}

    def set_rng(self, state: dict[str, Any]) -> None:
        generators = self.generators()
        if len(generators) != len(state["loader"]):
            raise ValueError(
                f"loader: the checkpoint holds {len(state['loader'])} loader generator state(s), "
                f"this loader has {len(generators)}; resume with the same kind of loader"
            )
        set_rng_state(state["process"])
        for generator, saved in zip(generators, state["loader"], strict=True):
            generator.set_state(saved)

    def _start_epoch(self) -> None:
        self._epoch_rng = self.rng()
        self._iterator = iter(self.loader)
        self.drawn = 0

    def next(self) -> Any:
        if self._iterator is None:
            self._start_epoch()
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self.drawn == 0:
                raise ValueError("loader: yields no batches") from None
            self.epoch += 1
            self._start_epoch()
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError("loader: yields no batches") from None
        self.drawn += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "drawn": self.drawn, "epoch_rng": self._epoch_rng}

    def restore(self, state: dict[str, Any]) -> None:
        """Back to a saved position; the RNGs are left as at the start of its epoch plus the
        skipped batches (the caller then restores the checkpoint's current RNG states)."""
        self.epoch, self._iterator, self._epoch_rng, self.drawn = state["epoch"], None, None, 0
        if state["epoch_rng"] is None:  # saved before the first batch
            return
        self.set_rng(state["epoch_rng"])
        self._epoch_rng = state["epoch_rng"]
        self._iterator = iter(self.loader)
        for _ in range(state["drawn"]):
            try:
                next(self._iterator)
            except StopIteration:
                raise ValueError(
                    f"loader: the checkpoint had drawn {state['drawn']} batches of epoch "
                    f"{state['epoch']}, this loader yields fewer; resume with the same data"
                ) from None
        self.drawn = state["drawn"]
