"""All-gather over the data-parallel group with autograd: one contrast matrix for all ranks.

Every data-parallel rank gathers the chosen and rejected sides of its microbatch (log-probs,
reference log-probs, lengths, prompt embeddings) from all ranks in rank order, so each rank
computes the same global loss ``L``. The backward of the gather sums, over ranks, each rank's
gradient with respect to the slice a rank owns (a reduce-scatter; done here as an all-reduce
and a slice, because the slices may differ in size): rank r receives ``R * dL/dx_r``. Megatron
DDP then *averages* parameter gradients over the R ranks, which gives exactly ``dL/dtheta``, so
the per-rank loss needs no further scaling.

Ranks may hold different numbers of sequences, including none on one side (unpaired data).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from megatron_rpo.loss.objective import Sequences

__all__ = ["all_gather_with_grad", "gather_sequences"]


def _sizes(n: int, group) -> list[int]:
    local = torch.tensor([n], dtype=torch.long)
    if dist.get_backend(group) == "nccl":
        local = local.cuda()
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, local, group=group)
    return [int(s.item()) for s in sizes]


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group):
        sizes = _sizes(tensor.shape[0], group)
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


def gather_sequences(side: Sequences, group) -> Sequences:
    """Every rank's chosen (or rejected) sequences, concatenated in rank order.

    Only ``policy_logps`` carries a gradient; the reference log-probs, lengths and prompt
    embeddings are data.
    """
    def gather_data(t):
        return None if t is None else all_gather_with_grad(t.detach(), group)

    return dataclasses.replace(
        side,
        policy_logps=all_gather_with_grad(side.policy_logps, group),
        lengths=gather_data(side.lengths),
        ref_logps=gather_data(side.ref_logps),
        prompt_emb=gather_data(side.prompt_emb),
    )
