"""All-gather over the data-parallel group with autograd: one contrast matrix for all ranks.

Every data-parallel rank gathers the per-sequence rows of its microbatch (policy and reference
log-probs, lengths, chosen/rejected labels, prompt embeddings) from all ranks in rank order, in
one collective, so each rank computes the same global loss ``L``. The backward of the gather sums, over ranks, each rank's
gradient with respect to the slice a rank owns (a reduce-scatter; done here as an all-reduce
and a slice, because the slices may differ in size): rank r receives ``R * dL/dx_r``. Megatron
DDP then *averages* parameter gradients over the R ranks, which gives exactly ``dL/dtheta``, so
the per-rank loss needs no further scaling.

Ranks may hold different numbers of sequences, including none on one side (unpaired data).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_with_grad", "gather_rows"]


def _sizes(n: int, group, device: torch.device) -> list[int]:
    local = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, local, group=group)
    return [int(s.item()) for s in sizes]


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group):
        sizes = _sizes(tensor.shape[0], group, tensor.device)
        ctx.group, ctx.sizes, ctx.rank = group, sizes, dist.get_rank(group)
        # Pad every slice to the largest so the collective has equal shapes: [max, ...] per rank.
        longest = max(sizes)
        padded = torch.zeros((longest,) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.shape[0]] = tensor
        slices = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(slices, padded.contiguous(), group=group)
        return torch.cat([s[:n] for s, n in zip(slices, sizes)])  # [sum(sizes), ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``tensor`` (any first-dimension size, may be 0) from every rank in rank order.

    Differentiable: the gradient of this rank's slice is the sum over ranks of their gradients
    with respect to it.
    """
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    return _AllGather.apply(tensor, group)


def gather_rows(rows: dict[str, torch.Tensor | None], group) -> dict[str, torch.Tensor | None]:
    """Every rank's per-sequence rows, concatenated in rank order, in one collective.

    Args:
        rows: tensors whose first dimension is this rank's B sequences (e.g. ``policy_logps``,
            ``lengths``, ``is_chosen``, ``ref_logps``, ``prompt_embedding``); None values stay None.
            Gradients flow back to every tensor that requires them.
        group: the data-parallel group.

    Returns:
        The same keys with each tensor's first dimension the sum of all ranks' B, dtypes kept.
    """
    present = {k: v for k, v in rows.items() if v is not None}
    if group is None or dist.get_world_size(group) == 1 or not present:
        return dict(rows)
    dtype = torch.float64 if any(v.dtype == torch.float64 for v in present.values()) else torch.float32
    # [B] or [B, D] columns -> one [B, C] tensor, so one all-gather carries them all.
    columns = [v.reshape(v.shape[0], -1) for v in present.values()]
    packed = torch.cat([c.to(dtype) for c in columns], dim=1)
    gathered = all_gather_with_grad(packed, group)
    out: dict[str, torch.Tensor | None] = {k: None for k in rows}
    start = 0
    for (key, value), column in zip(present.items(), columns):
        width = column.shape[1]
        piece = gathered[:, start : start + width].reshape((-1,) + tuple(value.shape[1:]))
        out[key] = piece if value.is_floating_point() else piece.round().to(value.dtype)
        start += width
    return out
