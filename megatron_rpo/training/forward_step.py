"""``forward_step`` and the loss functions for megatron's pipeline schedules.

A microbatch is a dict of tensors (the batch contract)::

    tokens [B, S]            position_ids [B, S]      labels [B, S] (tokens shifted by one)
    loss_mask [B, S]         1 on response tokens only
    is_chosen [B] bool       prompt_embedding [B, D] float32 (embedding weighting)
    ref_logps [B] float32    (reference-based losses)   pair_id [B] (paired data)
    is_mismatched [B] bool   (loss_type kto: the last half of the rows, each an item's prompt with
                             another item's completion, scored for the reference point only)

Paired microbatches put the P chosen rows first and the P rejected rows second, in the same
pair order, so chosen row i and rejected column i share a prompt. A packed microbatch
(:mod:`megatron_rpo.data.packing`) holds its B sequences in one [1, T] row, with
``sequence_index [1, T]``, ``cu_seqlens`` and ``max_seqlen``; the per-sequence keys are the same.

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
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.utils import get_attr_wrapped_model

from megatron_rpo.config import LossConfig
from megatron_rpo.data.packing import context_parallel_indices
from megatron_rpo.logprobs import sequence_logprobs
from megatron_rpo.loss.distributed import gather_rows
from megatron_rpo.loss.objective import mismatched_from_batch, preference_loss, sequence_rows, sides_from_batch
from megatron_rpo.models import use_transformer_engine

__all__ = ["forward_step", "packed_seq_params", "preference_loss_func", "logps_loss_func", "surrogate_loss_func"]

LossFn = Callable[[dict, torch.Tensor], tuple]


def _context_parallel() -> tuple[int, object]:
    size = parallel_state.get_context_parallel_world_size()
    return size, (parallel_state.get_context_parallel_group() if size > 1 else None)


def _sequence_logps(batch: dict, token_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] response log-probs and lengths, for padded ([B, S]) and packed ([1, T]) microbatches alike;
    under context parallelism summed over the CP group (each rank holds a part of every sequence)."""
    logps, lengths = sequence_logprobs(token_logps, batch["loss_mask"], batch.get("sequence_index"),
                                       len(batch["is_chosen"]))
    size, group = _context_parallel()
    if size > 1:
        # megatron's all-reduce with an identity backward: every rank then computes the same loss,
        # and each rank's part of a sequence gets that loss's gradient as it is
        logps = tensor_parallel.reduce_from_tensor_model_parallel_region(logps.contiguous(), group=group)
        lengths = lengths.clone()
        torch.distributed.all_reduce(lengths, group=group)
    return logps, lengths


def context_parallel_batch(batch: dict) -> dict:
    """This CP rank's part of a packed microbatch (a new dict; the schedule's is shared by every
    stage and chunk): the token fields cut as :func:`~megatron_rpo.data.packing.context_parallel_indices`
    says, after ``labels`` were shifted; the boundaries (``cu_seqlens``) stay the whole row's."""
    size, group = _context_parallel()
    if size == 1:
        return batch
    if "cu_seqlens" not in batch:
        raise ValueError("context parallelism cuts packed microbatches only (data.packing=true)")
    index = context_parallel_indices(batch["cu_seqlens"], size, torch.distributed.get_rank(group))
    index = index.to(batch["tokens"].device)
    out = dict(batch)
    for key in ("tokens", "position_ids", "labels", "loss_mask", "sequence_index"):
        out[key] = batch[key].index_select(1, index)
    return out


def packed_seq_params(batch: dict, device: torch.device, transformer_engine: bool | None = None
                      ) -> PackedSeqParams | None:
    """megatron's description of a packed microbatch (``thd``), made once and passed to every layer.

    transformer-engine's attention reads the boundaries on the GPU; our local attention and
    megatron's unfused RoPE split the row with them on the host, so there they stay on the CPU
    (no device-to-host copy, and no synchronisation, in every layer). ``transformer_engine``: the
    model's layers are transformer-engine's (default: where available).
    """
    if "cu_seqlens" not in batch:
        return None
    te = use_transformer_engine() if transformer_engine is None else transformer_engine
    where = device if te else torch.device("cpu")
    cu = torch.tensor(batch["cu_seqlens"], dtype=torch.int32, device=where)
    # The whole row's boundaries, under CP too (megatron's RoPE and transformer-engine divide them
    # by CP); there every segment is padded to 2 x CP chunks, and the padded boundaries are these.
    padded = cu if _context_parallel()[0] > 1 else None
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=padded,
                           cu_seqlens_kv_padded=padded, max_seqlen_q=batch["max_seqlen"],
                           max_seqlen_kv=batch["max_seqlen"])


def preference_loss_func(loss_config: LossConfig, group, paired: bool, batch: dict, token_logps: torch.Tensor):
    """The preference loss of one microbatch (the last pipeline stage calls it).

    Args:
        loss_config: the loss.
        group: the data-parallel group to build one matrix over (``contrast_scope:
            data_parallel``), or None for this rank's microbatch alone (``local``).
        paired: the microbatch holds pairs (for the metrics).
        batch: the microbatch.
        token_logps: [B, S] log-probs of ``labels`` (the output of :func:`forward_step`).

    Returns:
        ``(loss, report)``; the schedule divides the loss by the number of microbatches.
    """
    policy_logps, lengths = _sequence_logps(batch, token_logps)
    rows = gather_rows(sequence_rows(batch, policy_logps, lengths), group)
    chosen, rejected = sides_from_batch(rows, rows["policy_logps"], rows["lengths"])
    mismatched = mismatched_from_batch(rows, rows["policy_logps"], rows["lengths"])
    loss, metrics = preference_loss(loss_config, chosen, rejected, paired=paired, mismatched=mismatched)
    # A copy: the schedule divides the returned loss by the number of microbatches in place (and
    # multiplies it by CP: megatron's DDP averages over data x context parallel ranks, whose
    # gradients are parts of one gradient, to be summed).
    return loss, {"loss": loss.detach().clone(), **metrics}


def logps_loss_func(batch: dict, token_logps: torch.Tensor):
    """Report per-sequence log-probs and response lengths, with a zero loss (forward only)."""
    logps, lengths = _sequence_logps(batch, token_logps)
    return token_logps.sum() * 0.0, {"logps": logps.detach(), "lengths": lengths}


def surrogate_loss_func(scale: float, batch: dict, token_logps: torch.Tensor):
    """Gradient caching's second pass: ``scale * sum_k g_k * policy_logp_k`` with ``g`` in ``batch["logp_grads"]``.

    ``scale`` undoes the schedule's division by the number of microbatches.
    """
    logps, _ = _sequence_logps(batch, token_logps)
    surrogate = scale * (batch["logp_grads"].to(logps.dtype) * logps).sum()
    return surrogate, {}


def forward_step(data_iterator, model, *, loss_fn: LossFn):
    """Megatron's ``forward_step(data_iterator, model) -> (output, loss_func)``; bind the rest with partial.

    Every pipeline stage reads the same microbatch: the first uses ``tokens``, the last
    ``labels``, ``loss_mask`` and the loss inputs.

    Args:
        data_iterator: yields microbatches.
        model: this stage's model chunk (:class:`megatron_rpo.models.provider.PreferenceGPTModel`).
        loss_fn: ``loss_fn(batch, token_logps) -> (loss, report)``, one of the functions above
            with its leading arguments bound.
    """
    batch = context_parallel_batch(next(data_iterator))
    packed = packed_seq_params(batch, batch["tokens"].device, get_attr_wrapped_model(model, "transformer_engine"))
    # The last stage turns ``labels`` into their [b, s] log-probs (the vocabulary stays split,
    # and is chunked when model.logprob_chunk_tokens says so); the others return hidden states.
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], packed_seq_params=packed)
    return output, partial(loss_fn, batch)
