"""The training loop and its optimizer/schedule."""

from distill.train.loop import TrainState, student_logits, train
from distill.train.optim import build_optimizer, lr_lambda

__all__ = ["TrainState", "student_logits", "train", "build_optimizer", "lr_lambda"]
