"""Encoder distillation: sequence classifiers (DistilBERT-style) and sentence embedders.

``distill.distill(config)`` dispatches here when ``task`` is ``classification`` or
``embedding``; the loop, optimizer, metrics and report are those of :mod:`distill.modules`.
"""

from distill.encoders.models import (
    Pooling,
    build_encoder_student,
    default_embedder_path,
    load_encoder,
    read_pooling,
    save_embedder,
)
from distill.encoders.pooling import encode, pool
from distill.encoders.run import EncoderRun, run_encoder

__all__ = [
    "EncoderRun",
    "Pooling",
    "build_encoder_student",
    "default_embedder_path",
    "encode",
    "load_encoder",
    "pool",
    "read_pooling",
    "run_encoder",
    "save_embedder",
]
