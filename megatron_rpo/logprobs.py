"""Per-token and per-sequence log-probs from vocab-parallel logits, never gathering the vocabulary.

Each tensor-parallel rank holds logits for its slice of the (padded) vocabulary. megatron's
``vocab_parallel_cross_entropy`` turns the slices into ``-log p(label)`` with three small
all-reduces (max, the label's logit, the normaliser), so the full [b, s, V] logits never exist
on one rank. Rows added by vocabulary padding get ``-inf`` first: they have weights (random or
zero) but no token, and must take no probability mass, or log-probs would differ from the
unpadded Hugging Face model.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel

__all__ = ["token_logprobs", "sequence_logprobs"]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``log p(labels[b, t] | tokens[b, :t+1])`` for every position, in float32.

    Args:
        logits: [b, s, V_pad / TP] this rank's vocabulary slice (GPTModel's output without labels).
        labels: [b, s] next-token ids (tokens shifted by one).
        vocab_size: the real vocabulary; ids at or above it are padding rows.

    Returns:
        [b, s] float32 log-probs, identical on every tensor-parallel rank. fp32 ``logits`` are
        overwritten (the cross entropy reuses their memory); clone them first to keep them.
    """
    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    logits = logits.float()  # a no-op for fp32 logits
    if start + shard > vocab_size:
        # [b, s, V/tp]: this slice holds padding rows; mask them out of the softmax.
        padding = torch.arange(start, start + shard, device=logits.device) >= vocab_size
        logits = logits.masked_fill(padding, float("-inf"))
    # megatron's kernel takes any leading dims ([b, s] here, no transpose copy) and works in
    # place on the logits to save memory, as megatron's own loss path does.
    return -tensor_parallel.vocab_parallel_cross_entropy(logits, labels)


def sequence_logprobs(token_logps: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of response-token log-probs per sequence, and the response token counts.

    Args:
        token_logps: [b, s] from :func:`token_logprobs`.
        loss_mask: [b, s], 1 where ``labels`` is a response token, 0 on prompt and padding.

    Returns:
        ([b] float32 log-probs, [b] int64 counts).
    """
    mask = loss_mask.to(token_logps.dtype)
    # Multiplying would turn a -inf or NaN at a masked position into NaN; select instead.
    logps = torch.where(mask.bool(), token_logps, torch.zeros_like(token_logps)).sum(dim=1)
    return logps, loss_mask.sum(dim=1).long()
