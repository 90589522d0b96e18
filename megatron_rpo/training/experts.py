"""Per-step metrics of mixture-of-experts layers: the router's load-balancing loss and how evenly
each layer's experts are loaded.

* ``aux_loss``: megatron's load-balancing loss (without its coefficient), as its routers record it
  in megatron's tracker for every microbatch that trains (gradient on, training mode: never the
  reference, evaluation or gradient caching's first pass), averaged over the step's microbatches,
  the data-parallel ranks and the MoE layers -- megatron's own reduction. Recorded only when
  ``model.moe_aux_loss_coeff`` > 0 (megatron skips the loss otherwise).
* ``load_imbalance/layer_NN``: per MoE layer, the most tokens any expert received this step over
  the mean per expert (1 is perfectly even; ``num_experts / topk`` means every token went to the
  same k experts), counted over every rank's training microbatches by a forward hook on each
  router. Padding tokens (a packed row's tail) are routed and counted like real ones; they never
  change a real token's output (routing is dropless).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter

from megatron_rpo.device import current_device

__all__ = ["ExpertMetrics"]

AUX_LOSS = "load_balancing_loss"  # megatron's tracker name


class ExpertMetrics:
    """Hooks on ``module``'s routers; :meth:`reset` before a step, :meth:`read` after it (every rank)."""

    def __init__(self, module, num_layers: int, num_experts: int, num_microbatches: int, aux_loss_coeff: float):
        self.num_microbatches = num_microbatches
        self.aux_loss = aux_loss_coeff > 0
        # megatron's tracker is global to the process: drop what an earlier model left in it
        moe_utils.get_moe_layer_wise_logging_tracker().clear()
        # on the device: the hook adds to it without a device-to-host copy per layer and microbatch
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=current_device())
        for sub in module.modules():
            if isinstance(sub, TopKRouter):
                sub.register_forward_hook(self._hook(sub.layer_number - 1))  # global, 0-based

    def _hook(self, layer: int):
        def count(router, _inputs, outputs):
            if router.training and torch.is_grad_enabled():
                _, routing_map = outputs  # [tokens, experts] bool
                self.counts[layer] += routing_map.sum(dim=0).detach().to(torch.float64)
        return count

    def reset(self) -> None:
        self.counts.zero_()
        moe_utils.clear_aux_losses_tracker()

    def read(self) -> dict[str, float]:
        """This step's metrics, reduced over every rank (each layer counted by the stage holding it)."""
        counts = self.counts.clone()
        dist.all_reduce(counts)
        counts = counts.cpu()
        out = {}
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        if self.aux_loss and AUX_LOSS in tracker:
            moe_utils.reduce_aux_losses_tracker_across_ranks([AUX_LOSS])
            values = tracker[AUX_LOSS]["values"].double().cpu()
            moe = [i for i in range(len(values)) if counts[i].sum() > 0]
            if moe:
                out["aux_loss"] = float(values[moe].sum() / len(moe) / self.num_microbatches)
        for layer in range(counts.shape[0]):
            total = counts[layer].sum()
            if total > 0:
                out[f"load_imbalance/layer_{layer:02d}"] = float(counts[layer].max() / counts[layer].mean())
        moe_utils.clear_aux_losses_tracker()
        return out
