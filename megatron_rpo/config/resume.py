"""What may change when a run resumes: settings that decide how long it runs, how it logs,
evaluates and saves, or how it is laid out and how much memory it trades, never what a step
computes."""

from __future__ import annotations

from typing import Any

from megatron_rpo.config.loader import config_to_dict
from megatron_rpo.config.sections import MEMORY_KEYS, Config

__all__ = ["RESUMABLE_CHANGES", "config_changes"]

RESUMABLE_CHANGES = frozenset({
    "train.train_iters", "train.log_interval", "train.exit_interval", "train.eval_interval", "train.eval_iters",
    "train.save_interval", "train.keep_last", "train.export", "train.tensorboard_dir", "train.allow_config_change",
    "train.stop_signal", "train.peak_tflops", "train.wandb_project", "train.wandb_entity", "train.wandb_run_name",
    "train.wandb_mode", "data.valid_data_prefix", "parallel.distributed_timeout_minutes",
    "parallel.sequence_parallel", "parallel.expert_model_parallel_size", "parallel.expert_tensor_parallel_size",
    "parallel.virtual_pipeline_model_parallel_size", "parallel.context_parallel_size",
    *(f"model.{key}" for key in MEMORY_KEYS),
})
"""Keys a resumed run may change freely: they decide how long it runs, how it logs, evaluates and
saves, never what a training step computes."""


def config_changes(trained: dict, config: Config) -> list[tuple[str, Any, Any]]:
    """``(section.key, trained value, new value)`` for every setting that alters the run's meaning.

    Args:
        trained: the config a checkpoint was trained with (:func:`config_to_dict` form).
        config: the config of the run that resumes from it.
    """
    new = config_to_dict(config)
    changes = []
    for section, values in new.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            old = trained.get(section, {}).get(key, value)
            if name not in RESUMABLE_CHANGES and old != value:
                changes.append((name, old, value))
    return changes
