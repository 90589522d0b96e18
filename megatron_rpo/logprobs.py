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
        # In place and outside autograd: no copy of the [b, s, V/tp] logits on the way in, and
        # none of their gradient on the way back. The gradient needs no mask: d(-log p(y))/dz_j
        # is p_j = 0 for a -inf logit, so the cross entropy's own backward already gives 0 there.
        with torch.no_grad():
            logits.masked_fill_(padding, float("-inf"))
    # megatron's kernel takes any leading dims ([b, s] here, no transpose copy) and works in
    # place on the logits to save memory, as megatron's own loss path does.
    return -tensor_parallel.vocab_parallel_cross_entropy(logits, labels)


def sequence_logprobs(
    token_logps: torch.Tensor,
    loss_mask: torch.Tensor,
    sequence_index: torch.Tensor | None = None,
    num_sequences: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of response-token log-probs per sequence, and the response token counts.

    Args:
        token_logps: [b, s] from :func:`token_logprobs`.
        loss_mask: [b, s], 1 where ``labels`` is a response token, 0 on prompt and padding.
        sequence_index: packed rows only: [b, s], the sequence each token belongs to (0..B-1,
            B on padding); None for padded rows, one sequence per row.
        num_sequences: B, with ``sequence_index``.

    Returns:
        ([B] float32 log-probs, [B] int64 counts).
    """
    # Multiplying would turn a -inf or NaN at a masked position into NaN; select instead.
    masked = torch.where(loss_mask.bool(), token_logps, torch.zeros_like(token_logps))
    if sequence_index is None:
        return masked.sum(dim=1), loss_mask.sum(dim=1).long()
    # [b, s] -> [b * s] summed into B + 1 bins; the last bin collects the padding and is dropped.
    index = sequence_index.reshape(-1)
    logps = masked.new_zeros(num_sequences + 1).index_add(0, index, masked.reshape(-1))
    counts = loss_mask.new_zeros(num_sequences + 1).index_add(0, index, loss_mask.reshape(-1))
    return logps[:num_sequences], counts[:num_sequences].long()
