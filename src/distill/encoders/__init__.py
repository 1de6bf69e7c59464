"""Encoder distillation: sequence classifiers (DistilBERT-style) and sentence embedders.

The models, pooling, losses, data and metrics of the encoder tasks; ``distill.distill(config)``
runs them (``task: classification | embedding``) through :mod:`distill.pipelines.encoder_run`.
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

__all__ = [
    "Pooling",
    "build_encoder_student",
    "default_embedder_path",
    "encode",
    "load_encoder",
    "pool",
    "read_pooling",
    "save_embedder",
]
