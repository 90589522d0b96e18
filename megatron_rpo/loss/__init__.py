"""Preference losses: pure math on per-sequence log-probs, no torch.distributed.

The formulas are in docs/loss.md; :mod:`.contrast` builds the RPO contrast weights,
:mod:`.losses` the losses, :mod:`.metrics` what training reports.
"""

from megatron_rpo.loss.contrast import ROW_NORMALIZATIONS, WEIGHTINGS, contrast_weights, row_entropy
from megatron_rpo.loss.losses import (
    dpo_loss,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    rpo_loss,
    simpo_loss,
    simpo_rewards,
    simpo_rpo_loss,
)
from megatron_rpo.loss.metrics import preference_metrics

__all__ = [
    "WEIGHTINGS",
    "ROW_NORMALIZATIONS",
    "contrast_weights",
    "row_entropy",
    "rpo_loss",
    "dpo_loss",
    "ipo_loss",
    "simpo_rewards",
    "simpo_loss",
    "simpo_rpo_loss",
    "kto_reference_point",
    "kto_loss",
    "preference_metrics",
]
