"""Model weights in and out: converted checkpoints (from Hugging Face) and training checkpoints."""

from __future__ import annotations

from megatron_rpo.config import ModelConfig
from megatron_rpo.convert.files import ConvertedCheckpoint
from megatron_rpo.convert.load import load_converted

__all__ = ["checkpoint_model_config", "load_weights"]


def checkpoint_model_config(path: str) -> ModelConfig:
    """The architecture a checkpoint was written for."""
    return ConvertedCheckpoint(path).model_config


def load_weights(model, path: str) -> None:
    """Load a checkpoint's weights into this rank's model, at the model's TP/PP split."""
    load_converted(model, path)
