"""Width pruning (Minitron-style): rank heads, MLP channels and hidden channels by activation
magnitude on calibration blocks, then slice the weights into a smaller model of the same family.

Importance, per decoder layer (heads, MLP channels) or for the whole model (hidden channels):

- attention head h: mean over tokens of the L2 norm of its slice of the ``o_proj`` input;
  a key/value group's importance is the sum over its query heads;
- MLP channel j: mean over tokens of |act(gate) * up|_j (the ``down_proj`` input);
- hidden channel c: sum over every RMSNorm output of the mean |x_c| over tokens.

Grouped-query attention stays consistent: whole key/value groups are kept or dropped, and every
kept group keeps the same number of query heads (its most important ones), so query head ``i``
of the student still attends with key/value head ``i // (heads / kv_heads)``. Kept channels keep
the teacher's order, so nothing pruned gives back the teacher exactly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from distill.student.depth import check_supported

__all__ = ["WidthTargets", "Importance", "measure_importance", "prune_width", "top_indices"]


@dataclass(frozen=True)
class WidthTargets:
    """Target sizes; None keeps the model's own."""

    ffn: int | None = None  # MLP intermediate channels per layer
    heads: int | None = None  # query heads per layer
    kv_heads: int | None = None  # key/value heads (groups) per layer
    hidden: int | None = None  # hidden (embedding) channels


@dataclass
class Importance:
    heads: list[torch.Tensor]  # per layer [num_heads]
    ffn: list[torch.Tensor]  # per layer [intermediate_size]
    hidden: torch.Tensor  # [hidden_size]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@torch.no_grad()
def measure_importance(model: PreTrainedModel, input_ids: torch.Tensor) -> Importance:
    """Activation-magnitude importance of heads, MLP channels and hidden channels on
    ``input_ids`` ``[B, T]`` (float64 accumulators; the model is not changed)."""
    check_supported(model, "width pruning")
    config, layers = model.config, list(model.model.layers)
    head_dim = _head_dim(config)
    n_tokens = input_ids.numel()
    heads = [torch.zeros(config.num_attention_heads, dtype=torch.float64) for _ in layers]
    ffn = [torch.zeros(config.intermediate_size, dtype=torch.float64) for _ in layers]
    hidden = torch.zeros(config.hidden_size, dtype=torch.float64)

    def on_o_proj(i):
        def hook(module, args):
            per_head = args[0].double().unflatten(-1, (-1, head_dim))  # (B, T, heads, head_dim)
            heads[i].add_(per_head.norm(dim=-1).sum(dim=(0, 1)) / n_tokens)

        return hook

    def on_down_proj(i):
        def hook(module, args):
            ffn[i].add_(args[0].double().abs().sum(dim=(0, 1)) / n_tokens)

        return hook

    def on_norm(module, args, output):
        hidden.add_(output.double().abs().sum(dim=(0, 1)) / n_tokens)

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down_proj(i)))
        handles.append(layer.input_layernorm.register_forward_hook(on_norm))
        handles.append(layer.post_attention_layernorm.register_forward_hook(on_norm))
    handles.append(model.model.norm.register_forward_hook(on_norm))
    try:
        model.eval().model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return Importance(heads, ffn, hidden)


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, ties to the lower index, returned in ascending order."""
    order = torch.argsort(-scores, stable=True)[:k]
    return order.sort().values


def _kept_heads(
    scores: torch.Tensor, n_kv: int, kv_keep: int, q_keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept query heads, kept kv heads) of one layer: the best ``kv_keep`` groups, and the best
    ``q_keep`` query heads inside each kept group, in the teacher's order."""
    per_group = scores.numel() // n_kv
    groups = scores.view(n_kv, per_group)  # (kv, heads per group)
    kv = top_indices(groups.sum(dim=1), kv_keep)
    queries = [g * per_group + top_indices(groups[g], q_keep) for g in kv.tolist()]
    return torch.cat(queries), kv


def _rows(head_index: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Weight rows of the given heads: ``[len * head_dim]``."""
    return (head_index[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _resolve(targets: WidthTargets, config) -> tuple[int, int, int, int]:
    """(ffn, heads, kv_heads, hidden) with defaults filled and checked."""
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    ffn = targets.ffn or config.intermediate_size
    kv = targets.kv_heads or min(n_kv, targets.heads or n_kv)
    heads = targets.heads or kv * (n_heads // n_kv)
    hidden = targets.hidden or config.hidden_size
    checks = [
        ("ffn", ffn, config.intermediate_size),
        ("kv_heads", kv, n_kv),
        ("heads", heads, n_heads),
        ("hidden", hidden, config.hidden_size),
    ]
    for name, value, limit in checks:
        if not 1 <= value <= limit:
            raise ValueError(f"{name}={value}: must be between 1 and the model's {limit}")
    if heads % kv or heads // kv > n_heads // n_kv:
        raise ValueError(
            f"heads={heads}: must be a multiple of kv_heads={kv} with at most "
            f"{n_heads // n_kv} query heads per key/value group (grouped-query attention)"
        )
    return ffn, heads, kv, hidden


def _slice(tensor: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None):
    if rows is not None:
        tensor = tensor.index_select(0, rows)
    if cols is not None and tensor.ndim > 1:
        tensor = tensor.index_select(1, cols)
    return tensor.clone()


def prune_width(
    model: PreTrainedModel, importance: Importance, targets: WidthTargets
) -> PreTrainedModel:
    """A new, smaller model of ``model``'s family holding the most important slices of its
    weights (exact copies); ``model`` is not modified."""
    check_supported(model, "width pruning")
    config = model.config
    ffn, heads, kv, hidden = _resolve(targets, config)
    head_dim = _head_dim(config)
    keep_hidden = top_indices(importance.hidden, hidden)
    new_config = copy.deepcopy(config)
    new_config.update(
        {
            "intermediate_size": ffn,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "hidden_size": hidden,
            "head_dim": head_dim,
        }
    )
    state: dict[str, torch.Tensor] = {}
    plan = {"model.norm.weight": (keep_hidden, None)}
    plan["model.embed_tokens.weight"] = (None, keep_hidden)
    plan["lm_head.weight"] = (None, keep_hidden)
    for i, layer_scores in enumerate(importance.heads):
        q, k = _kept_heads(layer_scores, config.num_key_value_heads, kv, heads // kv)
        q_rows, kv_rows = _rows(q, head_dim), _rows(k, head_dim)
        keep_ffn = top_indices(importance.ffn[i], ffn)
        prefix = f"model.layers.{i}."
        for name, rows, cols in [
            ("self_attn.q_proj", q_rows, keep_hidden),
            ("self_attn.k_proj", kv_rows, keep_hidden),
            ("self_attn.v_proj", kv_rows, keep_hidden),
            ("self_attn.o_proj", keep_hidden, q_rows),
            ("mlp.gate_proj", keep_ffn, keep_hidden),
            ("mlp.up_proj", keep_ffn, keep_hidden),
            ("mlp.down_proj", keep_hidden, keep_ffn),
        ]:
            plan[f"{prefix}{name}.weight"] = (rows, cols)
            plan[f"{prefix}{name}.bias"] = (rows, None)
        plan[f"{prefix}input_layernorm.weight"] = (keep_hidden, None)
        plan[f"{prefix}post_attention_layernorm.weight"] = (keep_hidden, None)
    for key, tensor in model.state_dict().items():
        if key not in plan and "rotary_emb" in key:  # position tables do not depend on width
            state[key] = tensor.clone()
            continue
        if key not in plan:
            raise ValueError(f"width pruning does not know how to slice weight {key!r}")
        state[key] = _slice(tensor, *plan[key])
    dtype = next(model.parameters()).dtype
    student = AutoModelForCausalLM.from_config(new_config, dtype=dtype)
    student.load_state_dict(state, strict=True)
    return student.eval()
