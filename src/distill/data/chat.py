"""Chat ``messages`` rendered with the tokenizer's chat template, and which tokens the assistant
wrote (the only ones that are training targets).

An assistant turn's span starts where the template's generation prompt ends (``<|im_start|>
assistant\\n`` for ChatML) and runs to the end of the turn as rendered, end-of-turn marker
included, so the student learns to stop. Tokens are assigned to spans by their character offsets in
the full rendering, so the mask matches the tokenisation that training sees.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from distill.errors import DataError

__all__ = ["ROLES", "check_messages", "render_chat", "render_prompt", "require_chat_template"]

ROLES = ("system", "user", "assistant")


def require_chat_template(tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """Refuse chat data for a tokenizer without a chat template (one line naming both)."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"{source}: holds chat `messages`, but the tokenizer of {name} has no chat template; "
            "use a chat/instruct model, or give plain text (data.format=text) or "
            "prompt/response rows (data.format=prompt_response)"
        )


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """``messages`` as a list of ``{"role", "content"}`` dicts, or a DataError naming ``where``."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}}")
    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise DataError(
                f"{where}: messages[{index}] = {message!r}: expected {{'role': one of "
                f"{', '.join(ROLES)}, 'content': text}}"
            )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` followed by the template's assistant generation prompt."""
    text = _render(tokenizer, messages, generation=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    where: str = "chat",
    finished: bool = True,
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether an assistant wrote it.

    ``finished=False`` (a last answer cut at a length limit, as ``distill generate`` marks it)
    leaves the end-of-turn marker after the last assistant turn out of the targets: the
    student should not learn to stop where the teacher was interrupted.
    """
    full = _render(tokenizer, messages, generation=False)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:index], generation=True)) if index else 0
        end_text = _render(tokenizer, messages[: index + 1], generation=False)
        if not full.startswith(end_text):
            raise DataError(
                f"{where}: the chat template renders turn {index} differently once later turns "
                "follow, so assistant tokens cannot be located"
            )
        end = len(end_text)
        content_at = end_text.find(message["content"], start)
        if not finished and index == len(messages) - 1 and content_at >= 0:
            end = content_at + len(message["content"])
        spans.append((start, end))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    assistant = [
        any(start <= char_start < end for start, end in spans)
        for char_start, _ in encoded["offset_mapping"]
    ]
    return encoded["input_ids"], assistant
