"""Activation-aware dynamic int8: the outlier channels, SmoothQuant factors and the layers kept
in float, chosen on calibration blocks of the training data.

The int8 layer (:class:`~distill.compress.quantize.DynamicInt8Linear`) quantizes each token's
input row with its own step, so a token with massive activations no longer hurts the others;
within a row, a few input channels (the MLP ``down_proj`` inputs of SmolLM2 have some 1000x
the median) would still set the step for all the rest. The channels whose calibration max
exceeds ``outlier_threshold`` times the median channel's (at most ``outlier_channels``, the
largest first) are taken out of the int8 product and multiplied in float; each costs a float
weight column read at every token, so only the channels that would coarsen the others' step
get one.
SmoothQuant (Xiao et al. 2023) is the other remedy, off by default: it divides input channel
``j`` by ``s_j = max|x_j|^a / max|W_:,j|^(1-a)`` and multiplies the weight's column by it, so
the outliers move into the weight, which is quantized per row. What is still too wrong
afterwards is measured per layer (relative output error on the calibration inputs) and the
``float_layers`` worst layers can stay float.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from distill.compress.quantize import DynamicInt8Linear, SmoothedLinear, split_outliers
from distill.compress.store import QuantizeSpec
from distill.config import CompressConfig
from distill.student.search import calibration_blocks

__all__ = ["Int8Plan", "plan_int8", "quantize_spec", "smooth_factors"]


def smooth_factors(
    act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float, eps: float = 1e-5
) -> torch.Tensor:
    """SmoothQuant's ``s`` ``[in]`` from the inputs' channel max ``[in]`` and ``weight`` ``[out, in]``."""
    w_max = weight.detach().float().abs().amax(dim=0).clamp(min=eps)  # (in,)
    a_max = act_absmax.float().clamp(min=eps)
    return (a_max.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=eps)


def _int8_layer(
    weight: torch.Tensor, outlier_index: torch.Tensor, smooth: torch.Tensor | None
) -> nn.Module:
    """The runtime int8 layer a saved plan gives, for measuring its error."""
    smoothed = weight if smooth is None else weight * smooth[None, :]
    q, scale, columns = split_outliers(smoothed, outlier_index)
    layer = DynamicInt8Linear(q, scale, outlier_index=outlier_index, outlier_weight=columns.float())
    return layer if smooth is None else SmoothedLinear(layer, smooth)


@dataclass
class Int8Plan:
    """Per Linear: float outlier input channels, smoothing factors, relative output error (the
    int8 layer vs float), and the layers kept in float with the reason."""

    outliers: dict[str, torch.Tensor] = field(default_factory=dict)
    smooth: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    keep_float: dict[str, str] = field(default_factory=dict)

    def describe(self, top: int = 5) -> list[str]:
        """Lines for the plan: the kept layers and the largest remaining errors."""
        lines = [f"kept float: {name} ({why})" for name, why in self.keep_float.items()]
        if self.outliers:
            widths = [len(index) for index in self.outliers.values()]
            lines.insert(
                0,
                f"float outlier input channels (largest calibration max): {sum(widths)} in "
                f"{len(widths)} layers, at most {max(widths)} per layer",
            )
        ranked = sorted(self.errors.items(), key=lambda item: -item[1])
        rest = [(n, e) for n, e in ranked if n not in self.keep_float][:top]
        lines += [f"int8: {name} relative output error {error:.3f}" for name, error in rest]
        return lines


def _captured_inputs(
    model: PreTrainedModel, blocks: torch.Tensor, names: list[str], max_rows: int
) -> dict[str, torch.Tensor]:
    """The inputs ``[rows, in]`` of each named Linear over ``blocks`` (at most ``max_rows``)."""
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def hook(name):
        def capture(module, args):
            inputs[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())

        return capture

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for row in blocks:
                model(input_ids=row[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, parts in inputs.items():
        rows = torch.cat(parts)  # (tokens, in)
        step = max(1, rows.shape[0] // max_rows)
        out[name] = rows[::step][:max_rows]
    return out


@torch.no_grad()
def plan_int8(
    model: PreTrainedModel,
    blocks: torch.Tensor,
    *,
    alpha: float,
    float_layers: int,
    outlier_channels: int = 0,
    outlier_threshold: float = 0.0,
    max_rows: int = 1024,
) -> Int8Plan:
    """For every Linear (head included): the input channels kept float (the largest calibration
    maxima, at most ``outlier_channels``, only those above ``outlier_threshold`` x the median
    channel's when that is set), smoothing factors (``alpha`` 0 = none; never the head, whose
    weight is the embedding's), and the ``float_layers`` Linears whose int8 output error is
    largest."""
    head = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    inputs = _captured_inputs(model.eval(), blocks, names, max_rows)
    plan = Int8Plan()
    for name in names:
        linear = model.get_submodule(name)
        x = inputs[name]  # (rows, in)
        weight = linear.weight.detach().float()
        smooth = None
        if alpha > 0 and linear is not head:
            smooth = plan.smooth[name] = smooth_factors(x.abs().amax(dim=0), weight, alpha)
        channel_max = (x if smooth is None else x / smooth).abs().amax(dim=0)  # (in,)
        k = min(outlier_channels, channel_max.numel())
        if outlier_threshold > 0:  # only the channels that would coarsen the others' step
            k = min(k, int((channel_max > outlier_threshold * channel_max.median()).sum()))
        index = torch.topk(channel_max, k).indices.sort().values
        if k:
            plan.outliers[name] = index
        reference = linear(x)
        error = _int8_layer(weight, index, smooth)(x) - reference
        plan.errors[name] = float(error.norm() / reference.norm().clamp(min=1e-12))
    ranked = sorted(plan.errors.items(), key=lambda item: -item[1])[:float_layers]
    for rank, (name, error) in enumerate(ranked, start=1):
        plan.keep_float[name] = f"largest int8 output error #{rank}: {error:.3f} relative"
        plan.smooth.pop(name, None)
        plan.outliers.pop(name, None)
    return plan


def quantize_spec(
    model: PreTrainedModel, train_blocks: torch.Tensor, recipe: CompressConfig, seed: int
) -> tuple[QuantizeSpec, Int8Plan | None]:
    """What ``distill compress`` stores for ``recipe.quantize`` (not ``none``): for int8, the
    plan of outlier channels, smoothing and float layers on ``recipe.calibration_blocks``
    training blocks drawn by ``seed``."""
    spec = QuantizeSpec(recipe.quantize, recipe.group_size, recipe.quantize_head)
    if recipe.quantize != "int8":
        return spec, None
    blocks = calibration_blocks(train_blocks, recipe.calibration_blocks, seed)
    plan = plan_int8(
        model,
        blocks,
        alpha=recipe.smooth_alpha,
        float_layers=recipe.float_layers,
        outlier_channels=recipe.outlier_channels,
        outlier_threshold=recipe.outlier_threshold,
    )
    spec.smooth, spec.outliers, spec.keep_float = plan.smooth, plan.outliers, plan.keep_float
    return spec, plan
