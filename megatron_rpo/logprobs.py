"""Per-token and per-sequence log-probs from vocab-parallel logits, never gathering the vocabulary.

Each tensor-parallel rank holds logits for its slice of the (padded) vocabulary. megatron's
``vocab_parallel_cross_entropy`` turns the slices into ``-log p(label)`` with three small
all-reduces (max, the label's logit, the normaliser), so the full [b, s, V] logits never exist
on one rank. Rows added by vocabulary padding get ``-inf`` first: they have weights (random or
zero) but no token, and must take no probability mass, or log-probs would differ from the
unpadded Hugging Face model.

:func:`output_logprobs` is the last pipeline stage's whole tail, from the final hidden states:
megatron's output layer and :func:`token_logprobs` at once, or, with ``chunk_tokens``, the same
over chunks of tokens with each chunk's logits recomputed in backward, so that neither the
whole ``[tokens, V / TP]`` logits nor their gradient ever exist.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from torch.utils.checkpoint import checkpoint

__all__ = ["token_logprobs", "output_logprobs", "sequence_logprobs"]


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
    logits = logits.float()  # a no-op for fp32 logits; megatron's kernel works in float32
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


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[c] log-probs of one chunk's [c] labels from its [c, h] hidden states."""
    return token_logprobs(torch.matmul(hidden, weight.t()), labels, vocab_size)


def output_logprobs(
    output_layer,
    hidden_states: torch.Tensor,
    weight: torch.Tensor | None,
    labels: torch.Tensor,
    vocab_size: int,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """``log p(labels)`` from the final hidden states, through the (vocab-parallel) output layer.

    Args:
        output_layer: megatron's ColumnParallelLinear output layer of this stage.
        hidden_states: [s, b, h] after the final norm ([s / TP, b, h] under sequence parallelism).
        weight: the output weight when it is tied to the embedding, else None (the layer's own).
        labels: [b, s] next-token ids.
        vocab_size: the real vocabulary (see :func:`token_logprobs`).
        chunk_tokens: None: megatron's output layer over every token at once. N: N tokens at a
            time, the chunk's logits recomputed in backward; the result and the gradients are
            the same up to the order of floating-point sums.

    Returns:
        [b, s] float32 log-probs.
    """
    if chunk_tokens is None:
        logits, _ = output_layer(hidden_states, weight=weight)  # [s, b, V/tp]
        # The [b, s] labels transposed rather than the logits: no copy of the [s, b, V/tp] logits.
        return token_logprobs(logits, labels.t().contiguous(), vocab_size).t()
    weight = output_layer.weight if weight is None else weight
    # Each rank's slice of the vocabulary gives a part of every token's gradient: the parts are
    # summed over the tensor-parallel group in backward, as the output layer does.
    if output_layer.sequence_parallel:
        # [s/tp, b, h] -> [s, b, h]; backward reduce-scatters.
        hidden_states = tensor_parallel.gather_from_sequence_parallel_region(hidden_states)
    rows, seq = labels.shape
    # [s, b, h] -> [b * s, h] in the labels' order (a view for packed rows, b = 1).
    tokens = hidden_states.transpose(0, 1).reshape(rows * seq, -1)
    if not output_layer.sequence_parallel and parallel_state.get_tensor_model_parallel_world_size() > 1:
        # Backward all-reduces. Here, not before the transpose: megatron's all-reduce is lost on a
        # non-contiguous gradient (it reduces a contiguous copy), and this one is contiguous.
        tokens = tensor_parallel.copy_to_tensor_model_parallel_region(tokens)
    chunks = zip(torch.split(tokens, chunk_tokens), torch.split(labels.reshape(-1), chunk_tokens))
    if torch.is_grad_enabled():
        # Each chunk keeps only its inputs (views of ``tokens``, and the weight); its logits are
        # recomputed when backward reaches it, then freed. No randomness: no RNG state to keep.
        out = [checkpoint(_chunk_logprobs, h, weight, y, vocab_size, use_reentrant=False, preserve_rng_state=False)
               for h, y in chunks]
    else:
        out = [_chunk_logprobs(h, weight, y, vocab_size) for h, y in chunks]
    return torch.cat(out).view(rows, seq)


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
