"""Intermediate-layer distillation during training: forward hooks on the mapped layers of the
student and the teacher, and the weighted hidden-state / attention terms the loop adds.

The hooks capture only the layers a loss needs. The teacher's activations come from the same
forward that gives its logits (a live teacher, under ``no_grad``); when the loop did not run it
(labels-only steps, a cached teacher) the distiller runs the teacher itself under ``no_grad``.
A learned projection maps the student's hidden width to the teacher's when they differ; it lives
in this module, never in the student, so ``save_pretrained`` writes a plain model.
"""

from __future__ import annotations

from math import gcd

import torch
from transformers import PreTrainedModel

from distill.config import IntermediateConfig
from distill.errors import ConfigError
from distill.losses.intermediate import attention_kl, hidden_state_loss, value_relation_kl
from distill.student.depth import check_supported

__all__ = ["IntermediateDistiller", "uniform_layer_map", "is_enabled"]


def is_enabled(config: IntermediateConfig) -> bool:
    return config.hidden_weight > 0 or config.attention_weight > 0


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer for each student layer, spread evenly and ending on the last layer."""
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


def _resolve_index(index: int, n: int, key: str) -> int:
    resolved = index + n if index < 0 else index
    if not 0 <= resolved < n:
        raise ConfigError(f"{key}: index {index} is out of range for {n} layers")
    return resolved


class IntermediateDistiller(torch.nn.Module):
    """Callable the loop adds to the loss: ``distiller(input_ids) -> {name: weighted sum}``.

    ``origin``: the teacher layer each student layer was copied from (the default layer map);
    None = uniform. Call :meth:`remove` to detach the hooks.
    """

    def __init__(
        self,
        student: PreTrainedModel,
        teacher: PreTrainedModel,
        config: IntermediateConfig,
        origin: list[int] | None = None,
    ):
        super().__init__()
        check_supported(student, "intermediate-layer distillation")
        check_supported(teacher, "intermediate-layer distillation")
        self.config = config
        # Not a submodule: the teacher's weights must stay out of the optimizer and state dict.
        object.__setattr__(self, "teacher", teacher.requires_grad_(False))
        n_s, n_t = student.config.num_hidden_layers, teacher.config.num_hidden_layers
        layer_map = config.layer_map or origin or uniform_layer_map(n_s, n_t)
        if len(layer_map) != n_s:
            raise ConfigError(
                f"intermediate.layer_map has {len(layer_map)} entries for {n_s} student layers"
            )
        self.layer_map = [_resolve_index(t, n_t, "intermediate.layer_map") for t in layer_map]
        self.attention_layers = sorted(
            {
                _resolve_index(i, n_s, "intermediate.attention_layers")
                for i in config.attention_layers
            }
        )
        self.attention_kind = self._attention_kind(student, teacher)
        self.relation_heads = self._relation_heads(student, teacher)
        s_width, t_width = student.config.hidden_size, teacher.config.hidden_size
        self.projection = (
            torch.nn.Linear(s_width, t_width, bias=False).to(next(student.parameters()).dtype)
            if s_width != t_width and config.hidden_weight > 0
            else None
        )
        self._student: dict[tuple[str, int], torch.Tensor] = {}
        self._teacher: dict[tuple[str, int], torch.Tensor] = {}
        self._handles: list = [
            teacher.model.register_forward_pre_hook(self._on_teacher_input, with_kwargs=True)
        ]
        self._teacher_ids: torch.Tensor | None = None
        self._hook(
            student,
            self._student,
            range(n_s) if config.hidden_weight > 0 else [],
            self.attention_layers,
        )
        teacher_attention = [self.layer_map[i] for i in self.attention_layers]
        self._hook(
            teacher,
            self._teacher,
            self.layer_map if config.hidden_weight > 0 else [],
            teacher_attention,
        )

    def _attention_kind(self, student, teacher) -> str:
        kind = self.config.attention_loss
        same_heads = student.config.num_attention_heads == teacher.config.num_attention_heads
        if kind == "auto":
            kind = "attention_kl" if same_heads else "value_relation"
        if kind == "attention_kl" and not same_heads:
            raise ConfigError(
                f"intermediate.attention_loss=attention_kl needs equal head counts (student "
                f"{student.config.num_attention_heads}, teacher "
                f"{teacher.config.num_attention_heads}): use value_relation"
            )
        if kind == "attention_kl" and self.config.attention_weight > 0:
            for model in (student, teacher):  # attention probabilities exist only in eager
                model.set_attn_implementation("eager")
        return kind

    def _relation_heads(self, student, teacher) -> int:
        s_width = _value_width(student.config)
        t_width = _value_width(teacher.config)
        heads = self.config.relation_heads or teacher.config.num_key_value_heads
        if self.attention_kind == "value_relation" and (s_width % heads or t_width % heads):
            raise ConfigError(
                f"intermediate.relation_heads={heads} must divide the value widths of the "
                f"student ({s_width}) and teacher ({t_width}); try {gcd(s_width, t_width)}"
            )
        return heads

    def _hook(self, model, store, hidden_layers, attention_layers) -> None:
        layers = model.model.layers
        for i in sorted(set(hidden_layers)):
            self._handles.append(layers[i].register_forward_hook(_save(store, ("hidden", i))))
        if self.config.attention_weight <= 0:
            return
        for i in sorted(set(attention_layers)):
            if self.attention_kind == "attention_kl":
                hook = _save(store, ("attention", i), output_index=1)
                self._handles.append(layers[i].self_attn.register_forward_hook(hook))
            else:
                hook = _save(store, ("values", i))
                self._handles.append(layers[i].self_attn.v_proj.register_forward_hook(hook))

    def _on_teacher_input(self, module, args, kwargs) -> None:
        self._teacher_ids = kwargs.get("input_ids", args[0] if args else None)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted summed terms for the micro-batch ``input_ids`` ``[B, T]`` whose student
        forward just ran; rows are the first ``T - 1`` positions (those with a next token)."""
        ids = self._teacher_ids
        if not self._teacher or ids is None or not torch.equal(ids, input_ids):
            with torch.no_grad():  # the loop did not run the teacher on this batch
                self.teacher(input_ids=input_ids, use_cache=False)
        rows = input_ids.shape[1] - 1
        terms: dict[str, torch.Tensor] = {}
        try:
            if self.config.hidden_weight > 0:
                terms["hidden_loss"] = self.config.hidden_weight * self._hidden_sum(rows)
            if self.config.attention_weight > 0:
                terms["attention_loss"] = self.config.attention_weight * self._attention_sum(rows)
        finally:
            self._student.clear()
            self._teacher.clear()
        return terms

    def _hidden_sum(self, rows: int) -> torch.Tensor:
        """Sum over tokens, mean over mapped layers."""
        total = 0.0
        for s_index, t_index in enumerate(self.layer_map):
            student = self._student[("hidden", s_index)][:, :rows]  # (B, R, Hs)
            if self.projection is not None:
                student = self.projection(student)  # (B, R, Ht)
            teacher = self._teacher[("hidden", t_index)][:, :rows]
            total = total + hidden_state_loss(student, teacher, kind=self.config.hidden_loss)[0]
        return total / len(self.layer_map)

    def _attention_sum(self, rows: int) -> torch.Tensor:
        """Sum over query rows, mean over heads and over the distilled layers."""
        total = 0.0
        for s_index in self.attention_layers:
            t_index = self.layer_map[s_index]
            if self.attention_kind == "attention_kl":
                s, t = self._student[("attention", s_index)], self._teacher[("attention", t_index)]
                total = total + attention_kl(s, t, rows)[0]
            else:
                s, t = self._student[("values", s_index)], self._teacher[("values", t_index)]
                total = total + value_relation_kl(s, t, self.relation_heads, rows)[0]
        return total / len(self.attention_layers)


def _value_width(config) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads * head_dim


def _save(store: dict, key: tuple[str, int], output_index: int | None = None):
    def hook(module, args, output):
        value = output[output_index] if output_index is not None else output
        store[key] = value[0] if isinstance(value, tuple) else value

    return hook
