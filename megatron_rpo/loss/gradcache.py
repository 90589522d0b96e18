"""A contrast matrix over the whole global batch, whatever fits in memory (gradient caching).

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup":

1. every microbatch runs forward only; only the per-sequence policy log-probs are kept;
2. the loss over the whole global batch (all microbatches of all data-parallel ranks) and its
   gradient ``g_k = dL/dlogp_k`` for every sequence this rank owns are computed here;
3. every microbatch runs forward-backward with the surrogate ``sum_k g_k * policy_logp_k``, whose
   parameter gradient is this rank's share of ``dL/dtheta``.

Cost: one extra forward pass. Exact when the forward is deterministic (no dropout; our
fine-tuning configs have none).
"""

from __future__ import annotations

import torch

from megatron_rpo.config import LossConfig
from megatron_rpo.loss.distributed import gather_rows
from megatron_rpo.loss.objective import preference_loss, sequence_rows, sides_from_batch

__all__ = ["cached_logp_gradients"]


def cached_logp_gradients(
    config: LossConfig,
    microbatches: list[dict],
    policy_logps: list[torch.Tensor],
    lengths: list[torch.Tensor],
    group=None,
    *,
    paired: bool,
) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """Step 2: the global-batch loss and its gradient with respect to this rank's log-probs.

    Args:
        config: the loss.
        microbatches: this rank's microbatches (batch contract).
        policy_logps: [B] per-sequence policy log-probs of each microbatch, from the forward-only pass.
        lengths: [B] response token counts of each microbatch.
        group: the data-parallel group (None: this rank alone).
        paired: the microbatches hold pairs (for the metrics).

    Returns:
        (per-microbatch [B] gradients, the loss, its metrics). The gradients are those of the
        loss that every rank computes, summed over ranks (see :mod:`.distributed`), so Megatron
        DDP's average over ranks gives ``dL/dtheta``.
    """
    leaves = [lp.detach().float().requires_grad_() for lp in policy_logps]
    with torch.enable_grad():
        # This rank's rows of every microbatch, in order, then every rank's in rank order.
        parts = [sequence_rows(mb, leaf, n) for mb, leaf, n in zip(microbatches, leaves, lengths)]
        local = {k: None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in parts[0]}
        rows = gather_rows(local, group)
        chosen, rejected = sides_from_batch(rows, rows["policy_logps"], rows["lengths"])
        loss, metrics = preference_loss(config, chosen, rejected, paired=paired)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
    return grads, loss.detach(), metrics
