"""Activation-aware dynamic int8: SmoothQuant factors and the layers kept in float, chosen on
calibration blocks of the training data.

Dynamic int8 quantizes each layer's input per tensor, so one large input channel (the MLP
``down_proj`` inputs of SmolLM2 have them) sets the step for all the others. SmoothQuant
(Xiao et al. 2023) divides input channel ``j`` by ``s_j = max|x_j|^a / max|W_:,j|^(1-a)`` and
multiplies the weight's column by it: the product is unchanged, the outliers move into the
weight, which is quantized per row. What is still too wrong afterwards is measured per layer
(relative output error on the calibration inputs) and the worst layers stay float.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from distill.compress.quantize import SmoothedLinear, _dynamic_linear, quantize_rows

__all__ = ["Int8Plan", "plan_int8", "smooth_factors"]


def smooth_factors(
    act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float, eps: float = 1e-5
) -> torch.Tensor:
    """SmoothQuant's ``s`` ``[in]`` from the inputs' channel max ``[in]`` and ``weight`` ``[out, in]``."""
    w_max = weight.detach().float().abs().amax(dim=0).clamp(min=eps)  # (in,)
    a_max = act_absmax.float().clamp(min=eps)
    return (a_max.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=eps)


@dataclass
class Int8Plan:
    """Per Linear: smoothing factors, relative output error (smoothed int8 vs float), and the
    layers kept in float with the reason."""

    smooth: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    keep_float: dict[str, str] = field(default_factory=dict)

    def describe(self, top: int = 5) -> list[str]:
        """Lines for the plan: the kept layers and the largest remaining errors."""
        lines = [f"kept float: {name} ({why})" for name, why in self.keep_float.items()]
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
    max_rows: int = 1024,
) -> Int8Plan:
    """Smoothing factors (``alpha`` 0 = none) for the decoder Linears and the ``float_layers``
    Linears (head included) whose smoothed dynamic-int8 output error is largest."""
    head = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    inputs = _captured_inputs(model.eval(), blocks, names, max_rows)
    plan = Int8Plan()
    for name in names:
        linear = model.get_submodule(name)
        x = inputs[name]  # (rows, in)
        weight = linear.weight.detach().float()
        module: nn.Module
        if alpha > 0 and linear is not head:
            smooth = smooth_factors(x.abs().amax(dim=0), weight, alpha)
            plan.smooth[name] = smooth
            q, scale = quantize_rows(weight * smooth[None, :])
            module = SmoothedLinear(_dynamic_linear(linear, q, scale), smooth)
        else:
            module = _dynamic_linear(linear, *quantize_rows(weight))
        reference = linear(x)
        plan.errors[name] = float(
            (module(x) - reference).norm() / reference.norm().clamp(min=1e-12)
        )
    ranked = sorted(plan.errors.items(), key=lambda item: -item[1])[:float_layers]
    for rank, (name, error) in enumerate(ranked, start=1):
        plan.keep_float[name] = f"largest int8 output error #{rank}: {error:.3f} relative"
        plan.smooth.pop(name, None)
    return plan
