"""The training loop, its tasks and its optimizer/schedule."""

from distill.train.causal_lm import CausalLMTask, student_logits
from distill.train.loop import CheckpointPlan, TrainState, train
from distill.train.optim import build_optimizer, lr_lambda
from distill.train.task import ModuleTask, TrainTask

__all__ = [
    "CausalLMTask",
    "CheckpointPlan",
    "ModuleTask",
    "TrainState",
    "TrainTask",
    "build_optimizer",
    "lr_lambda",
    "student_logits",
    "train",
]
