"""Choosing which teacher layers a depth-pruned student keeps, measured on calibration blocks.

Three searches, all deterministic for given calibration blocks:

- ``shortgpt``: Block Influence of each layer, 1 - mean cosine(input, output) of its hidden
  states (Men et al. 2024, ShortGPT); keep the ``n`` most influential layers.
- ``angular``: drop the contiguous block of ``L - n`` layers whose two ends' hidden states are
  closest in angular distance arccos(cos)/pi (Gromov et al. 2024).
- ``greedy_kl``: remove one layer at a time, each time the one whose removal gives the smallest
  KL(teacher || student) on the calibration tokens, until ``n`` remain.

The searches run the teacher's own decoder layers on captured inputs (:class:`LayerRunner`), so
no model is rebuilt per candidate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from distill.student.depth import check_supported

__all__ = [
    "SearchMethod",
    "LayerRunner",
    "calibration_blocks",
    "block_influence",
    "angular_block",
    "greedy_kl_layers",
    "greedy_removal",
    "search_layers",
]

SearchMethod = Literal["shortgpt", "angular", "greedy_kl"]


def calibration_blocks(blocks: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` blocks ``[n, T]`` drawn without replacement from ``blocks`` by ``seed``."""
    if n < 1:
        raise ValueError(f"n={n}: need at least one calibration block")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(blocks.shape[0], generator=generator)[: min(n, blocks.shape[0])]
    return blocks[order.sort().values]


class LayerRunner:
    """Runs any sequence of a model's decoder layers on fixed calibration blocks.

    One full forward captures the embeddings and each layer's keyword arguments (masks, rotary
    embeddings), so a layer keeps its own mask type wherever it moves. ``head_positions`` picks
    the token positions whose logits are scored (the head is the costliest part per token).
    """

    @torch.no_grad()
    def __init__(self, model: PreTrainedModel, input_ids: torch.Tensor, head_stride: int = 1):
        check_supported(model, "layer search")
        self.model = model.eval()
        self.layers = list(model.model.layers)
        self.kwargs: list[dict] = [{} for _ in self.layers]
        self.inputs: list[torch.Tensor] = [torch.empty(0)] * len(self.layers)
        handles = [
            layer.register_forward_pre_hook(self._capture(i), with_kwargs=True)
            for i, layer in enumerate(self.layers)
        ]
        try:
            model.model(input_ids=input_ids, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        self.embeddings = self.inputs[0]  # (B, T, H)
        self.last_output = self.run([len(self.layers) - 1], self.inputs[-1])  # (B, T, H)
        self.positions = torch.arange(0, input_ids.shape[1] - 1, head_stride)
        self.teacher_logprobs = self.logprobs(self._final(self.last_output))

    def _capture(self, index: int):
        def hook(module, args, kwargs):
            self.inputs[index] = args[0] if args else kwargs["hidden_states"]
            self.kwargs[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

        return hook

    @torch.no_grad()
    def run(self, layers: Sequence[int], hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``[B, T, H]`` after teacher layers ``layers`` in order, from ``hidden``
        (default: the embeddings)."""
        hidden = self.embeddings if hidden is None else hidden
        for index in layers:
            out = self.layers[index](hidden, **self.kwargs[index])
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _final(self, hidden: torch.Tensor) -> torch.Tensor:
        selected = self.model.model.norm(hidden[:, self.positions])  # (B, P, H)
        return self.model.get_output_embeddings()(selected)  # (B, P, V)

    def logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)  # (B*P, V)

    @torch.no_grad()
    def kl(self, hidden: torch.Tensor) -> float:
        """Mean KL(teacher || model) per scored token, for last-layer ``hidden`` ``[B, T, H]``."""
        student = self.logprobs(self._final(hidden))
        teacher = self.teacher_logprobs
        return float((teacher.exp() * (teacher - student)).sum(dim=-1).mean())


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token cosine similarity of ``[B, T, H]`` tensors, in float64, ``[B*T]``."""
    a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    return F.cosine_similarity(a, b, dim=-1)


def block_influence(runner: LayerRunner) -> list[float]:
    """ShortGPT's Block Influence per layer: 1 - mean cosine(layer input, layer output)."""
    outputs = runner.inputs[1:] + [runner.last_output]
    return [float(1.0 - _cosine(x, y).mean()) for x, y in zip(runner.inputs, outputs, strict=True)]


def angular_block(runner: LayerRunner, n_remove: int) -> int:
    """First layer of the contiguous block of ``n_remove`` layers to drop (Gromov et al.).

    Minimises the mean angular distance arccos(cos(h_l, h_{l+n}))/pi between the input of layer
    ``l`` and the input of layer ``l + n`` (the last layer's output for the final block).
    """
    states = runner.inputs + [runner.last_output]
    distances = []
    for start in range(len(runner.layers) - n_remove + 1):
        cos = _cosine(states[start], states[start + n_remove]).clamp(-1.0, 1.0)
        distances.append(float(torch.arccos(cos).mean() / math.pi))
    return min(range(len(distances)), key=lambda i: (distances[i], i))


def greedy_removal(
    n_layers: int,
    n_keep: int,
    removal_losses: Callable[[list[int]], list[float]],
    description: str = "greedy layer search",
) -> tuple[list[int], list[float]]:
    """Remove layers one at a time until ``n_keep`` remain, each time the one whose removal
    gives the smallest loss; return the kept layers and the loss after each removal.

    ``removal_losses(current)`` gives, for each position ``k`` of ``current``, the loss of the
    student without ``current[k]`` (lower is better), so a caller can share work across the
    candidates of one round. Ties go to the earlier layer.
    """
    current = list(range(n_layers))
    trace = []
    bar = tqdm(total=n_layers - n_keep, desc=description, unit="layer")
    while len(current) > n_keep:
        losses = removal_losses(current)
        best = min(range(len(losses)), key=lambda k: (losses[k], k))
        trace.append(losses[best])
        del current[best]
        bar.set_postfix(loss=f"{losses[best]:.4f}")
        bar.update(1)
    bar.close()
    return current, trace


def greedy_kl_layers(runner: LayerRunner, n_keep: int) -> tuple[list[int], list[float]]:
    """Layers kept after greedy removal by measured KL, and the KL after each removal.

    Each round caches the inputs of the current layers, so removing layer ``k`` reruns only the
    layers after it.
    """

    def removal_kls(current: list[int]) -> list[float]:
        inputs, hidden = [], runner.embeddings
        for index in current:
            inputs.append(hidden)
            hidden = runner.run([index], hidden)
        return [runner.kl(runner.run(current[k + 1 :], inputs[k])) for k in range(len(current))]

    return greedy_removal(len(runner.layers), n_keep, removal_kls)


def search_layers(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    n_keep: int,
    method: SearchMethod,
    head_stride: int = 2,
) -> list[int]:
    """Sorted teacher layers a ``n_keep``-layer student keeps, chosen by ``method`` on the
    calibration blocks ``input_ids`` ``[B, T]``."""
    num_layers = model.config.num_hidden_layers
    if not 1 <= n_keep <= num_layers:
        raise ValueError(f"n_keep={n_keep}: must be between 1 and the model's {num_layers} layers")
    if method not in ("shortgpt", "angular", "greedy_kl"):
        raise ValueError(f"method={method!r}: expected shortgpt, angular or greedy_kl")
    runner = LayerRunner(model, input_ids, head_stride)
    if method == "shortgpt":
        influence = block_influence(runner)
        ranked = sorted(range(num_layers), key=lambda i: (-influence[i], i))
        return sorted(ranked[:n_keep])
    if method == "angular":
        start = angular_block(runner, num_layers - n_keep)
        return [i for i in range(num_layers) if not start <= i < start + num_layers - n_keep]
    return greedy_kl_layers(runner, n_keep)[0]
