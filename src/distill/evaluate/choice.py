"""Multiple-choice accuracy scored by log-likelihood, the way lm-evaluation-harness does it.

Each question becomes the context ``"Question: {question}\\nAnswer:"`` and each choice the
continuation ``" {choice}"``; a choice's score is ``sum_t log p(continuation_t | context,
continuation_<t)``. ``mc_accuracy`` picks the highest sum (lm-eval's ``acc``); ``mc_accuracy_norm``
divides each sum by the choice's length in UTF-8 bytes first (lm-eval's ``acc_norm``), so long
answers are not penalised for having more tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.config import SHIPPED_DATA
from distill.errors import DataError

__all__ = [
    "Question",
    "default_task_path",
    "read_questions",
    "choice_logprobs",
    "multiple_choice_accuracy",
]


@dataclass(frozen=True)
class Question:
    question: str
    choices: list[str]
    answer: int  # index into choices


def default_task_path() -> Path:
    """The shipped task: multiple-choice questions about Python, written for this project."""
    return SHIPPED_DATA / "python_mc.jsonl"


def read_questions(path: str | Path) -> list[Question]:
    """Rows ``{"question": str, "choices": [str, ...], "answer": int}`` of a JSONL file."""
    task = Path(path)
    if not task.is_file():
        raise DataError(f"multiple-choice task {task} does not exist")
    questions = []
    for number, line in enumerate(task.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            question = Question(
                str(row["question"]), [str(c) for c in row["choices"]], int(row["answer"])
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise DataError(
                f"{task}:{number}: expected {{question, choices: [...], answer: index}}"
            ) from None
        if len(question.choices) < 2 or not 0 <= question.answer < len(question.choices):
            raise DataError(f"{task}:{number}: need >= 2 choices and 0 <= answer < len(choices)")
        questions.append(question)
    if not questions:
        raise DataError(f"multiple-choice task {task} holds no questions")
    return questions


@torch.no_grad()
def choice_logprobs(
    model: PreTrainedModel, context: list[int], continuations: list[list[int]], vocab_rows: int
) -> list[float]:
    """``log p(continuation | context)`` for each continuation, all in one right-padded batch."""
    if not context or any(not c for c in continuations):
        raise ValueError("context and every continuation must hold at least one token")
    sequences = [context + c for c in continuations]
    length = max(len(s) for s in sequences)
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention[row, : len(sequence)] = 1
    logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
    logprobs = F.log_softmax(logits[..., :vocab_rows].double(), dim=-1)  # (C, L, V)
    scores = []
    for row, continuation in enumerate(continuations):
        # token at position p is predicted by the logits at p - 1
        positions = torch.arange(len(context) - 1, len(context) - 1 + len(continuation))
        scores.append(float(logprobs[row, positions, torch.tensor(continuation)].sum()))
    return scores


def multiple_choice_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[Question],
    vocab_rows: int,
) -> dict[str, float]:
    """``{mc_accuracy, mc_accuracy_norm, mc_questions}`` over ``questions``."""
    model.eval()
    correct = correct_norm = 0
    for question in questions:
        context = tokenizer(f"Question: {question.question}\nAnswer:", add_special_tokens=False)
        continuations = [
            tokenizer(f" {choice}", add_special_tokens=False)["input_ids"]
            for choice in question.choices
        ]
        scores = choice_logprobs(model, context["input_ids"], continuations, vocab_rows)
        normed = [s / len(c.encode("utf-8")) for s, c in zip(scores, question.choices, strict=True)]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == question.answer)
        correct_norm += int(max(range(len(normed)), key=normed.__getitem__) == question.answer)
    return {
        "mc_accuracy": correct / len(questions),
        "mc_accuracy_norm": correct_norm / len(questions),
        "mc_questions": len(questions),
    }
