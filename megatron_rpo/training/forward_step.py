"""``forward_step`` and ``loss_func`` for megatron's pipeline schedules (STYLE 5, DESIGN 5).

A microbatch is a dict of tensors (the batch contract)::

    tokens [B, S]            position_ids [B, S]      labels [B, S] (tokens shifted by one)
    loss_mask [B, S]         1 on response tokens only
    is_chosen [B] bool       prompt_embedding [B, D] float32 (embedding weighting)
    ref_logps [B] float32    (reference-based losses)   pair_id [B] (paired data)

Paired microbatches put the P chosen rows first and the P rejected rows second, in the same
pair order, so chosen row i and rejected column i share a prompt.

The policy and the reference go through this same function: ``loss_config=None`` turns the
loss into a report of per-sequence log-probs (:func:`sequence_logps`), which is how online
reference log-probs, precomputed ones and gradient caching are computed. NeMo-Aligner issue
#227 saw policy and reference differ at step 0 under TP=4 because they took different paths.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rpo.config import LossConfig
from megatron_rpo.logprobs import sequence_logprobs, token_logprobs
from megatron_rpo.loss.objective import Sequences, preference_loss

__all__ = ["forward_step", "loss_func", "split_sides", "sequence_logps"]


def split_sides(batch: dict, policy_logps: torch.Tensor, lengths: torch.Tensor) -> tuple[Sequences, Sequences]:
    """Chosen rows and rejected columns of a microbatch, in batch order."""
    is_chosen = batch["is_chosen"].bool()

    def side(mask):
        ref = batch.get("ref_logps")
        emb = batch.get("prompt_embedding")
        return Sequences(
            policy_logps=policy_logps[mask],
            lengths=lengths[mask],
            ref_logps=None if ref is None else ref[mask],
            prompt_emb=None if emb is None else emb[mask],
        )

    return side(is_chosen), side(~is_chosen)


def loss_func(batch: dict, loss_config: LossConfig | None, token_logps: torch.Tensor):
    """The last pipeline stage's loss for one microbatch.

    Args:
        batch: the microbatch (batch contract).
        loss_config: the loss; None reports per-sequence log-probs with a zero loss instead.
        token_logps: [B, S] log-probs of ``labels`` (the output of :func:`forward_step`).

    Returns:
        ``(loss, report)``; the schedule divides the loss by the number of microbatches.
    """
    policy_logps, lengths = sequence_logprobs(token_logps, batch["loss_mask"])
    if loss_config is None:
        return token_logps.sum() * 0.0, {"logps": policy_logps.detach(), "lengths": lengths}
    chosen, rejected = split_sides(batch, policy_logps, lengths)
    loss, metrics = preference_loss(loss_config, chosen, rejected)
    # A copy: the schedule divides the returned loss by the number of microbatches in place.
    return loss, {"loss": loss.detach().clone(), **metrics}


def forward_step(data_iterator, model, *, vocab_size: int, loss_config: LossConfig | None = None):
    """Megatron's ``forward_step(data_iterator, model) -> (output, loss_func)``; bind the rest with partial.

    Every pipeline stage reads the same microbatch: the first needs ``tokens``, the last
    ``labels``, ``loss_mask`` and the loss inputs.
    """
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None)
    if parallel_state.is_pipeline_last_stage():
        output = token_logprobs(output, batch["labels"], vocab_size)  # [B, S, V/tp] -> [B, S]
    return output, partial(loss_func, batch, loss_config)


@torch.no_grad()
def sequence_logps(model, microbatches: list[dict], *, vocab_size: int) -> list[torch.Tensor] | None:
    """Per-sequence response log-probs of ``model`` for each microbatch, forward only.

    Runs megatron's pipeline schedule with :func:`forward_step`, so TP/PP layouts give the same
    numbers as training. Every microbatch must have the same [B, S] shape.

    Returns:
        On the last pipeline stage, one [B] float32 tensor per microbatch; None elsewhere.
    """
    rows, seq = microbatches[0]["tokens"].shape
    reports = get_forward_backward_func()(
        forward_step_func=partial(forward_step, vocab_size=vocab_size, loss_config=None),
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=seq,
        micro_batch_size=rows,
        forward_only=True,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return [r["logps"] for r in reports]
