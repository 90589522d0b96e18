"""``forward_step`` and the loss functions for megatron's pipeline schedules (STYLE 5, DESIGN 5).

A microbatch is a dict of tensors (the batch contract)::

    tokens [B, S]            position_ids [B, S]      labels [B, S] (tokens shifted by one)
    loss_mask [B, S]         1 on response tokens only
    is_chosen [B] bool       prompt_embedding [B, D] float32 (embedding weighting)
    ref_logps [B] float32    (reference-based losses)   pair_id [B] (paired data)

Paired microbatches put the P chosen rows first and the P rejected rows second, in the same
pair order, so chosen row i and rejected column i share a prompt.

The policy and the reference go through this same ``forward_step``; only the loss function at
the end differs: :func:`preference_loss_func` (training), :func:`logps_loss_func` (per-sequence
log-probs: online and precomputed reference, gradient caching's first pass) and
:func:`surrogate_loss_func` (gradient caching's second pass). NeMo-Aligner issue #227 saw policy
and reference log-probs differ at step 0 under TP=4 because they took different paths.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from megatron.core import parallel_state

from megatron_rpo.config import LossConfig
from megatron_rpo.logprobs import sequence_logprobs, token_logprobs
from megatron_rpo.loss.distributed import gather_rows
from megatron_rpo.loss.objective import preference_loss, sequence_rows, sides_from_batch

__all__ = ["forward_step", "preference_loss_func", "logps_loss_func", "surrogate_loss_func"]

LossFn = Callable[[dict, torch.Tensor], tuple]


def preference_loss_func(loss_config: LossConfig, group, batch: dict, token_logps: torch.Tensor):
    """The preference loss of one microbatch (the last pipeline stage calls it).

    Args:
        loss_config: the loss.
        group: the data-parallel group to build one matrix over (``contrast_scope:
            data_parallel``), or None for this rank's microbatch alone (``local``).
        batch: the microbatch.
        token_logps: [B, S] log-probs of ``labels`` (the output of :func:`forward_step`).

    Returns:
        ``(loss, report)``; the schedule divides the loss by the number of microbatches.
    """
    policy_logps, lengths = sequence_logprobs(token_logps, batch["loss_mask"])
    rows = gather_rows(sequence_rows(batch, policy_logps, lengths), group)
    chosen, rejected = sides_from_batch(rows, rows["policy_logps"], rows["lengths"])
    loss, metrics = preference_loss(loss_config, chosen, rejected)
    # A copy: the schedule divides the returned loss by the number of microbatches in place.
    return loss, {"loss": loss.detach().clone(), **metrics}


def logps_loss_func(batch: dict, token_logps: torch.Tensor):
    """Report per-sequence log-probs and response lengths, with a zero loss (forward only)."""
    logps, lengths = sequence_logprobs(token_logps, batch["loss_mask"])
    return token_logps.sum() * 0.0, {"logps": logps.detach(), "lengths": lengths}


def surrogate_loss_func(scale: float, batch: dict, token_logps: torch.Tensor):
    """Gradient caching's second pass: ``scale * sum_k g_k * policy_logp_k`` with ``g`` in ``batch["logp_grads"]``.

    ``scale`` undoes the schedule's division by the number of microbatches.
    """
    logps, _ = sequence_logprobs(token_logps, batch["loss_mask"])
    surrogate = scale * (batch["logp_grads"].to(logps.dtype) * logps).sum()
    return surrogate, {}


def forward_step(data_iterator, model, *, vocab_size: int, loss_fn: LossFn):
    """Megatron's ``forward_step(data_iterator, model) -> (output, loss_func)``; bind the rest with partial.

    Every pipeline stage reads the same microbatch: the first uses ``tokens``, the last
    ``labels``, ``loss_mask`` and the loss inputs.

    Args:
        data_iterator: yields microbatches.
        model: this stage's model chunk.
        vocab_size: the real (unpadded) vocabulary.
        loss_fn: ``loss_fn(batch, token_logps) -> (loss, report)``, one of the functions above
            with its leading arguments bound.
    """
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None)
    if parallel_state.is_pipeline_last_stage():
        output = token_logprobs(output, batch["labels"], vocab_size)  # [B, S, V/tp] -> [B, S]
    return output, partial(loss_fn, batch)
