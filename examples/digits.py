"""Distil any nn.Module: scikit-learn's bundled handwritten digits (8x8 images, 10 classes).

    python examples/digits.py            # under a minute on 2 CPU cores

1. train a teacher MLP (64 -> 256 -> 256 -> 10) on all training labels;
2. distil a much smaller student (64 -> 32 -> 10, 35x fewer parameters) from it with
   ``distill.distill_module`` on only ``labelled`` (100) training examples: the
   teacher's soft targets at T = 4 (alpha 0.5, chosen on validation parts by
   benchmarks/encoders.py) tell the student how alike the digits look;
3. train the same student (same init, same 100 examples, same data order, same steps) on the
   labels alone.
Prints held-out accuracy of all three: does distillation beat plain training at equal steps?
(With all 1,347 labels, or a tiny 12-unit student, it does not: see docs/log.md.)
Needs scikit-learn (``pip install 'distill[examples]'``) for the data only.
"""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from distill import distill_module
from distill.config import LossConfig, TrainConfig
from distill.evaluate.classifier import evaluate_classifier


def digits_data(seed: int = 0, validation: bool = False) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) datasets of pixel vectors in [0, 1] and labels; 25% held out, stratified.
    ``validation``: (train, validation) instead, a quarter of the training part held out and
    the test part untouched, to choose settings on data they are not scored on."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise SystemExit(
            "the digits example needs scikit-learn: pip install 'distill[examples]'"
        ) from None
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x / 16.0, y, test_size=0.25, random_state=seed, stratify=y
    )
    if validation:
        x_train, x_test, y_train, y_test = train_test_split(
            x_train, y_train, test_size=0.25, random_state=seed, stratify=y_train
        )

    def as_dataset(features, labels) -> TensorDataset:
        return TensorDataset(torch.tensor(features, dtype=torch.float32), torch.tensor(labels))

    return as_dataset(x_train, y_train), as_dataset(x_test, y_test)


def mlp(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def logits_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return model(batch[0])  # (B, 10)


def main(
    teacher_steps: int = 600,
    student_steps: int = 600,
    student_hidden: int = 32,
    batch_size: int = 64,
    seed: int = 0,
    run_dir: str | None = None,
    labelled: int | None = 100,
    temperature: float = 4.0,
    alpha: float = 0.5,
    validation: bool = False,
) -> dict[str, Any]:
    """Train teacher, distilled student and labels-only student; return their test metrics.

    ``labelled``: training examples both students see (the same random subset; None = all).
    ``validation``: scored on a validation part of the training split instead of the test
    part (see :func:`digits_data`)."""
    torch.manual_seed(seed)
    train_set, test_set = digits_data(seed, validation)
    student_set: Dataset = train_set
    if labelled is not None:
        chosen = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
        student_set = Subset(train_set, chosen[:labelled].tolist())

    def loader(dataset: Dataset) -> DataLoader:  # the same shuffled order for every model
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)

    test_loader = DataLoader(test_set, batch_size=512)
    labels_only = LossConfig(alpha=1.0)
    schedule = {"lr": 3e-3, "warmup_steps": 10, "weight_decay": 0.0, "log_every": 50}

    teacher = mlp([64, 256, 256, 10])
    distill_module(
        None,
        teacher,
        loader(train_set),
        logits_fn,
        loss=labels_only,
        train=TrainConfig(steps=teacher_steps, **schedule),
    )
    student = mlp([64, student_hidden, 10])
    twin = copy.deepcopy(student)  # same initialisation for the labels-only student
    result = distill_module(
        teacher,
        student,
        loader(student_set),
        logits_fn,
        loss=LossConfig(alpha=alpha, temperature=temperature),
        train=TrainConfig(steps=student_steps, **schedule),
        eval_loader=test_loader,
        run_dir=run_dir,
    )
    distill_module(
        None,
        twin,
        loader(student_set),
        logits_fn,
        loss=labels_only,
        train=TrainConfig(steps=student_steps, **schedule),
    )
    return {
        "teacher_accuracy": evaluate_classifier(teacher, test_loader, logits_fn)["accuracy"],
        "student_kd_accuracy": result.evaluation["student_after"]["accuracy"],
        "student_labels_only_accuracy": evaluate_classifier(twin, test_loader, logits_fn)[
            "accuracy"
        ],
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "steps": student_steps,
        "labelled": len(student_set),
        "temperature": temperature,
        "alpha": alpha,
        "scored_on": "validation" if validation else "test",
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--labelled", type=int, default=100, help="training examples the students see (0 = all)"
    )
    parser.add_argument("--run-dir", default=None, help="write metrics.jsonl and a report here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = main(
        args.steps,
        args.steps,
        seed=args.seed,
        run_dir=args.run_dir,
        labelled=args.labelled or None,
    )
    print(json.dumps(results, indent=1))
