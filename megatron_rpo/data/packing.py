"""The token fields of a microbatch, padded or packed.

A microbatch is B sequences (a prompt and one response each). Its token fields come in two forms:

* **padded**: one row per sequence, right-padded to ``seq_length`` -- ``tokens``,
  ``position_ids``, ``labels``, ``loss_mask``, all [B, S];
* **packed**: the B sequences back to back in one row of ``T`` tokens (megatron's ``thd``
  layout: batch 1, sequence boundaries in ``cu_seqlens``), then padding up to ``T`` --
  ``tokens``, ``position_ids`` (restarting at 0 in each sequence), ``labels``, ``loss_mask``
  and ``sequence_index`` (which sequence a token belongs to; B on padding), all [1, T]; plus
  ``cu_seqlens``, a tuple of ints: the boundaries of the B sequences and, when there is
  padding, of one last segment holding it (so it ends at T, as megatron's packed path needs),
  and ``max_seqlen``, the longest segment. These two are plain ints, not tensors: the forward
  step makes megatron's ``PackedSeqParams`` from them on whichever device each attention
  implementation wants (see :mod:`megatron_rpo.training.forward_step`).

Either way ``labels[t] = tokens[t + 1]`` and ``loss_mask[t] = 1`` exactly where ``labels[t]`` is
a response token, so in the packed row the label that crosses into the next sequence is never
scored. Per-sequence fields (``is_chosen``, ``pair_id``, ``prompt_embedding``, ``ref_logps``)
are indexed by sequence in both forms, in the same order: packing never changes which
sequences form a microbatch, only how they are laid out.
"""

from __future__ import annotations

import math

import torch

__all__ = ["packed_length", "token_fields", "context_parallel_indices"]


def _segment(n: int, sequence_multiple: int) -> int:
    return math.ceil(n / sequence_multiple) * sequence_multiple


def packed_length(lengths: list[int], multiple: int, sequence_multiple: int = 1) -> int:
    """Tokens in the packed row of sequences of ``lengths``, each padded to a multiple of
    ``sequence_multiple``: their sum rounded up to ``multiple``."""
    total = sum(_segment(n, sequence_multiple) for n in lengths)
    return max(multiple, math.ceil(total / multiple) * multiple)


def context_parallel_indices(cu_seqlens: tuple[int, ...], cp_size: int, cp_rank: int) -> torch.Tensor:
    """The tokens of a packed row that context-parallel rank ``cp_rank`` holds, in its row's order.

    megatron's load balancing for causal attention: every segment (of a length divisible by
    2 x ``cp_size``) is cut into 2 x ``cp_size`` equal chunks and rank r holds chunks r and
    2 x cp_size - 1 - r, so every rank gets as much early (cheap) as late (dear) attention.
    """
    pieces = []
    for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        chunk = (b - a) // (2 * cp_size)
        for j in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(torch.arange(a + j * chunk, a + (j + 1) * chunk))
    return torch.cat(pieces)


def token_fields(sequences: list[torch.Tensor], prompt_lengths: list[int], *, packed: bool, length: int,
                 pad_id: int = 0, sequence_multiple: int = 1) -> dict:
    """The token fields of one microbatch (module docstring), built on the host.

    Args:
        sequences: B int64 token tensors, each a prompt followed by its response (already cut
            to the longest allowed length).
        prompt_lengths: B prompt token counts; tokens after them are the response.
        packed: one packed row instead of B padded rows.
        length: S, the padded row length, or T, the packed row length (at least the total of
            the sequences; :func:`packed_length`).
        pad_id: token id of the padding.
        sequence_multiple: packed only: each sequence's segment is padded to a multiple of this
            (context parallelism cuts every segment into 2 x CP chunks); the padding belongs to
            no sequence (``sequence_index`` B) and is never scored.

    Raises:
        ValueError: a sequence longer than a padded row, or sequences longer than the packed row.
    """
    lengths = [len(s) for s in sequences]
    if packed:
        total = sum(_segment(n, sequence_multiple) for n in lengths)
        if total > length:
            raise ValueError(f"{len(sequences)} sequences of {total} tokens do not fit a packed row of {length}")
        rows, width = 1, length
    else:
        if max(lengths, default=0) > length:
            raise ValueError(f"a sequence of {max(lengths)} tokens does not fit a padded row of {length}")
        rows, width = len(sequences), length
    tokens = torch.full((rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros(rows, width, dtype=torch.long)
    loss_mask = torch.zeros(rows, width)
    sequence_index = torch.full((rows, width), len(sequences), dtype=torch.long)
    start = 0
    for b, (ids, prompt) in enumerate(zip(sequences, prompt_lengths)):
        row, offset = (0, start) if packed else (b, 0)
        n = len(ids)
        tokens[row, offset : offset + n] = ids
        segment = _segment(n, sequence_multiple) if packed else n
        position_ids[row, offset : offset + segment] = torch.arange(segment)
        sequence_index[row, offset : offset + n] = b
        # labels[t] = tokens[t + 1]: position t is scored when token t + 1 is a response token.
        loss_mask[row, offset + prompt - 1 : offset + n - 1] = 1.0
        start += segment
    fields = {"tokens": tokens, "position_ids": position_ids, "labels": torch.roll(tokens, -1, dims=1),
              "loss_mask": loss_mask}
    if not packed:
        fields["position_ids"] = torch.arange(width).expand(rows, width).clone()
        return fields
    # Padding positions count on from 0 too: they form one last segment of their own.
    position_ids[0, start:] = torch.arange(width - start)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + _segment(n, sequence_multiple))
    if width > start:
        bounds.append(width)
    fields.update(sequence_index=sequence_index, cu_seqlens=tuple(bounds),
                  max_seqlen=max(b - a for a, b in zip(bounds[:-1], bounds[1:])))
    return fields
