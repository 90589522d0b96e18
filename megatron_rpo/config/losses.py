"""What each loss type needs from the rest of the run: one entry per loss (torch-free).

The math of each loss is :data:`megatron_rpo.loss.objective.LOSS_TYPES`; everything else that
depends on the loss type -- the config's checks, which inputs training loads, whether a
reference model runs, how the plan counts rows -- reads these facts. A new loss is one entry
here, its function there, and their tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["LossFacts", "LOSSES"]


@dataclass(frozen=True)
class LossFacts:
    """The facts of one loss type."""

    reference: bool
    """Needs reference log-probs (online or precomputed); False for reference-free losses."""
    matrix: bool
    """Contrasts every chosen with every rejected sequence (the contrast matrix, its weights and
    the ``global_batch`` scope); False for losses of each prompt's own pair or of single items."""
    data: Literal["paired", "unpaired", "either"]
    """The data it trains on: pairs only, items only, or either."""
    mismatched: bool = False
    """Also scores mismatched (prompt, completion) pairs in every microbatch (KTO's reference
    point), which only the online reference can score."""


LOSSES: dict[str, LossFacts] = {
    "rpo": LossFacts(reference=True, matrix=True, data="either"),
    "dpo": LossFacts(reference=True, matrix=False, data="paired"),
    "ipo": LossFacts(reference=True, matrix=False, data="paired"),
    "simpo": LossFacts(reference=False, matrix=False, data="paired"),
    "simpo_rpo": LossFacts(reference=False, matrix=True, data="either"),
    "kto": LossFacts(reference=True, matrix=False, data="unpaired", mismatched=True),
    "sft": LossFacts(reference=False, matrix=False, data="either"),
}
"""``loss.loss_type`` -> its facts."""
