"""Megatron's optimizer (DDP-aware, optionally distributed) and learning-rate schedule from our config.

``optimizer: rmsprop`` (the paper) is megatron's Adam with ``beta1 = 0`` and ``beta2 = adam_beta2``
(0.999 by default; torch's RMSprop uses alpha 0.99): the same update as RMSprop except that the
squared-gradient average is bias-corrected, so the first steps are not inflated. Megatron's
optimizers (mixed precision, distributed, checkpointing) support Adam and SGD only; this keeps
all of that machinery, at the cost of an unused first-moment buffer.

Without transformer-engine or apex megatron falls back to ``torch.optim.AdamW`` with torch's
default multi-tensor (``foreach``) update, which on an H100 took 59 ms a step for a 1.1B model
(a profile of its training step). :func:`build_optimizer` switches it to torch's fused kernel,
one pass over each parameter's fp32 master weight, gradient and moments.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_rpo.config import OptimizerConfig

__all__ = ["build_optimizer", "build_scheduler", "optimizer_parts"]


def optimizer_parts(optimizer) -> list:
    """The optimizers a MegatronOptimizer is made of: a ChainedOptimizer's parts, else itself."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _use_fused_torch_adam(optimizer) -> None:
    """Fused AdamW for megatron's torch fallback (a no-op under transformer-engine's or apex's Adam)."""
    for chained in optimizer_parts(optimizer):
        inner = getattr(chained, "optimizer", None)
        if isinstance(inner, torch.optim.AdamW) and not inner.state:
            for group in inner.param_groups:
                group.update(fused=True, foreach=False)
            inner.defaults.update(fused=True, foreach=False)


def _empty_shards_report_a_step(optimizer) -> None:
    """Let a distributed optimizer part that holds no parameter on this rank report a step count.

    Over torch's Adam (no apex or transformer-engine) megatron-core reads the step count out of the
    per-parameter states whenever it builds a state dict (to save or to load) and asserts there is
    exactly one; a part with no parameter here has none. That happens wherever a rank holds no
    expert (a pipeline stage of dense layers only) or no shard of any parameter. Such a part
    reports the step of its sibling parts, which is what its parameters elsewhere have.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = optimizer_parts(optimizer)
    for part in parts:
        inner = getattr(part, "optimizer", None)
        if (not isinstance(part, DistributedOptimizer) or not isinstance(inner, torch.optim.Adam | torch.optim.AdamW)
                or any(group["params"] for group in inner.param_groups)):
            continue
        siblings = [other.optimizer for other in parts if other is not part]

        def state_dict(original=inner.state_dict, siblings=siblings):
            out = original()
            if not out["state"]:
                steps = [float(s["step"]) for o in siblings for s in o.state.values() if "step" in s]
                out["state"] = {0: {"step": torch.tensor(max(steps, default=0.0))}}
            return out

        inner.state_dict = state_dict


def build_optimizer(config: OptimizerConfig, model_chunks: list, *, bf16: bool):
    """A MegatronOptimizer over DDP-wrapped ``model_chunks``."""
    beta1 = 0.0 if config.optimizer == "rmsprop" else config.adam_beta1
    optimizer = get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer="adam",
            lr=config.lr,
            min_lr=config.min_lr,
            weight_decay=config.weight_decay,
            adam_beta1=beta1,
            adam_beta2=config.adam_beta2,
            adam_eps=config.adam_eps,
            clip_grad=config.clip_grad,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=config.use_distributed_optimizer,
        ),
        model_chunks,
    )
    _use_fused_torch_adam(optimizer)
    _empty_shards_report_a_step(optimizer)
    return optimizer


def build_scheduler(optimizer, config: OptimizerConfig, total_steps: int) -> OptimizerParamScheduler:
    """Linear warmup to ``lr``, then ``lr_decay_style`` to ``min_lr`` at ``total_steps`` (counted in steps).

    Step k (1-based) uses the schedule at k: the first warm-up step already takes ``lr / warmup``
    (megatron's scheduler, counting from 0, would spend it at learning rate 0) and the last step
    of a decaying schedule takes ``min_lr``.
    """
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if config.lr_warmup_iters else config.lr,
        max_lr=config.lr,
        min_lr=config.min_lr,
        lr_warmup_steps=config.lr_warmup_iters,
        lr_decay_steps=max(total_steps, config.lr_warmup_iters + 1),
        lr_decay_style=config.lr_decay_style,
        start_wd=config.weight_decay,
        end_wd=config.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    scheduler.step(increment=1)
    return scheduler
