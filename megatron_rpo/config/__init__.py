"""The run configuration, in one place: the schema (:mod:`.sections`, dataclasses with a docstring
under each field, the only defaults), the checks across sections (:mod:`.checks`), what each loss
type needs (:mod:`.losses`), the YAML loader with ``defaults:`` and dotted overrides
(:mod:`.loader`) and what may change on resume (:mod:`.resume`). Torch-free."""

from megatron_rpo.config.loader import (
    complete_model,
    config_from_dict,
    config_to_dict,
    dump_config,
    explicit_keys,
    load_config,
    model_conflicts,
)
from megatron_rpo.config.losses import LOSSES, LossFacts
from megatron_rpo.config.resume import RESUMABLE_CHANGES, config_changes
from megatron_rpo.config.sections import (
    MEMORY_KEYS,
    MODEL_TRAINING_CHOICES,
    RECOMPUTE_KEYS,
    RECOMPUTE_MODULES,
    Config,
    LORA_TARGETS,
    DataConfig,
    LoRAConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainConfig,
)

__all__ = [
    "ModelConfig",
    "ParallelConfig",
    "LossConfig",
    "DataConfig",
    "OptimizerConfig",
    "TrainConfig",
    "LoRAConfig",
    "LORA_TARGETS",
    "Config",
    "LOSSES",
    "LossFacts",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "config_changes",
    "explicit_keys",
    "RESUMABLE_CHANGES",
    "MODEL_TRAINING_CHOICES",
    "MEMORY_KEYS",
    "RECOMPUTE_KEYS",
    "RECOMPUTE_MODULES",
    "model_conflicts",
    "complete_model",
    "dump_config",
]
