"""Shared fixtures: tiny random Llama teachers with a tokenizer trained here (no downloads)."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from distill.data import default_documents  # noqa: E402


def free_port() -> int:
    """A TCP port no process listens on now: the OS picks it, so parallel test workers
    (``pytest -n``) and other users of the machine never get the same fixed port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(autouse=True)
def seed() -> int:
    """Every test starts from the same RNG state."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return 0


def make_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the first default documents."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(default_documents()[:20], trainer)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def make_wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """A WordPiece (BERT-style) tokenizer: not byte-level BPE, refused across vocabularies."""
    tokenizer = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_chat_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ``<|im_start|>``/``<|im_end|>`` specials and a ChatML template; EOS =
    ``<|im_end|>`` (the end of an assistant turn, as in SmolLM2-Instruct), pad = ``<|endoftext|>``."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(default_documents()[:20], trainer)
    tokenizer.decoder = decoders.ByteLevel()
    chat = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
    )
    chat.chat_template = CHATML_TEMPLATE
    return chat


def make_llama(
    vocab_rows: int, layers: int = 4, hidden: int = 32, seed: int = 0
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_rows,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 4-layer, 32-wide random Llama saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("teacher")
    return save_model(make_llama(len(tiny_tokenizer)), tiny_tokenizer, path)


@pytest.fixture
def tiny_run_config(tmp_path, tiny_teacher_dir) -> dict:
    """A config dict for a fast end-to-end run on the tiny teacher."""
    return {
        "name": "tiny",
        "output_dir": str(tmp_path / "runs"),
        "teacher": {"path": str(tiny_teacher_dir)},
        "student": {"keep_first": 1, "keep_last": 1},
        "data": {"block_size": 32},
        "train": {"steps": 3, "batch_size": 2, "warmup_steps": 1, "threads": 1, "device": "cpu"},
        "eval": {
            "max_blocks": 4,
            "batch_size": 2,
            "gen_new_tokens": 4,
            "gen_prompts": ["def f"],
            "bpb_bytes": 1024,
        },
    }


@pytest.fixture(scope="session")
def tiny_chat_tokenizer() -> PreTrainedTokenizerFast:
    return make_chat_tokenizer()


@pytest.fixture(scope="session")
def tiny_chat_teacher_dir(tmp_path_factory, tiny_chat_tokenizer) -> Path:
    """A 2-layer, 32-wide random Llama saved with the chat tokenizer."""
    path = tmp_path_factory.mktemp("chat_teacher")
    return save_model(make_llama(len(tiny_chat_tokenizer), layers=2), tiny_chat_tokenizer, path)
