"""The two modules our local (transformer-engine-free) layer spec uses instead of megatron's.

* :class:`RMSNorm`: megatron's torch-norm wrapper refuses sequence parallelism; this one marks
  its weight ``sequence_parallel`` so that megatron's ``finalize_model_grads`` all-reduces the
  weight's gradient over the tensor-parallel group, as it does for transformer-engine norms.
  The arithmetic is Hugging Face Llama's (normalise in float32, cast back, then scale).
* :class:`SDPAttention`: megatron's ``DotProductAttention`` with the core computation done by
  ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on
  GPU, no materialised [b, n, s, s] score tensor) for the cases it covers exactly: causal
  self-attention with no explicit mask, bias, window or softmax offset, padded ([s, b, ...]) or
  packed (megatron's ``thd`` layout: one row of sequences back to back, ``cu_seqlens`` in
  ``PackedSeqParams``). Packed rows are attended one sequence at a time, each causal on its
  own, so attention never crosses a boundary and costs the sum of the squared lengths, not the
  square of the row (a block-diagonal mask would compute, and on the math kernel store, the
  whole [T, T] square). Anything else falls back to megatron's own implementation (which
  refuses packed sequences). Under context parallelism (packed rows only) each rank's queries
  attend to the whole sequence's keys and values, all-gathered over the CP group with autograd
  (their gradients reduce-scattered back), masked by true position: exact, for CPU tests and GPUs
  without transformer-engine, whose own CP attention is the fast one.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_rpo.data.packing import context_parallel_indices

__all__ = ["RMSNorm", "SDPAttention"]


class RMSNorm(torch.nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))``, normalised in float32."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.config = config
        self.eps = eps
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        # Read by megatron's finalize_model_grads: with sequence parallelism each tensor-parallel
        # rank sees a slice of the sequence, so the weight's gradient must be summed over them.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        h = hidden.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class SDPAttention(DotProductAttention):
    """Causal core attention through ``scaled_dot_product_attention``; megatron's otherwise."""

    def __init__(self, config: TransformerConfig, *args, **kwargs):
        # megatron's DotProductAttention refuses context parallelism; ours does it (_packed_cp)
        super().__init__(dataclasses.replace(config, context_parallel_size=1) if config.context_parallel_size > 1
                         else config, *args, **kwargs)
        self.config = config

    def _sdpa_applies(self, attention_mask, attn_mask_type, attention_bias, packed_seq_params) -> bool:
        return (
            attention_mask is None
            and (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
            and attention_bias is None
            and (packed_seq_params is None or packed_seq_params.qkv_format == "thd")
            and self.softmax_offset is None
            and not self.config.apply_query_key_layer_scaling
            and self.config.window_size is None
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if not self._sdpa_applies(attention_mask, attn_mask_type, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        dropout = self.attention_dropout.p if self.training else 0.0
        # Dropout in tensor-parallel regions draws from the tensor-parallel RNG stream, as megatron does.
        forked = dropout and not self.config.sequence_parallel
        with tensor_parallel.get_cuda_rng_tracker().fork() if forked else contextlib.nullcontext():
            if packed_seq_params is not None:
                return self._packed(query, key, value, packed_seq_params, dropout)
            sq, b = query.shape[0], query.shape[1]
            # [s, b, heads, hn] -> [b, heads, s, hn]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            context = self._attend(q, k, v, dropout)
        # [b, heads, s, hn] -> [s, b, heads * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _attend(self, q, k, v, dropout: float) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=dropout,
            is_causal=True,
            scale=self.softmax_scale,
            enable_gqa=self.num_attention_heads_per_partition != self.num_query_groups_per_partition,
        )

    def _packed(self, query, key, value, packed_seq_params, dropout: float) -> torch.Tensor:
        """Causal attention within each segment of a packed row: [t, heads, hn] -> [t, heads * hn]."""
        cu = packed_seq_params.cu_seqlens_q_padded
        cu = packed_seq_params.cu_seqlens_q if cu is None else cu
        bounds = cu.tolist()  # on the host (see forward_step.packed_seq_params): no synchronisation
        if parallel_state.get_context_parallel_world_size() > 1:
            return self._packed_cp(query, key, value, bounds, dropout)
        if bounds[-1] != query.shape[0]:
            raise ValueError(f"packed sequences end at token {bounds[-1]} but the row holds {query.shape[0]}")
        # [t, heads, hn] -> [1, heads, t, hn]; each segment [1, heads, n, hn] attends causally to itself.
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
        segments = [self._attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], dropout)
                    for a, b in zip(bounds[:-1], bounds[1:])]
        # [1, heads, t, hn] -> [t, heads * hn]
        context = torch.cat(segments, dim=2)[0].transpose(0, 1)
        return context.reshape(query.shape[0], self.hidden_size_per_partition)

    def _packed_cp(self, query, key, value, bounds: list[int], dropout: float) -> torch.Tensor:
        """:meth:`_packed` on this CP rank's part of the row ([t / CP, heads, hn]; ``bounds`` the
        whole row's), each segment cut as :func:`megatron_rpo.data.packing.context_parallel_indices`
        cuts it (the batch was cut by the same function)."""
        group = parallel_state.get_context_parallel_group()
        cp, rank = group.size(), group.rank()
        local = query.shape[0]
        # [t / CP, g, hn] -> [CP * t / CP, g, hn] in rank order; backward reduce-scatters the gradient
        keys, values = (tensor_parallel.gather_from_sequence_parallel_region(t, True, group=group)
                        for t in (key, value))
        outputs, offset = [], 0
        for a, b in zip(bounds[:-1], bounds[1:]):
            n = b - a
            # the true positions each rank holds of this segment, rank by rank (the cut the batch had)
            held = [context_parallel_indices((0, n), cp, r) for r in range(cp)]
            part = n // cp  # this segment's tokens on each rank, at ``offset`` in its part of the row
            rows = torch.cat([r * local + offset + torch.arange(part) for r in range(cp)])
            order = rows[torch.cat(held).argsort()].to(key.device)
            k, v = keys.index_select(0, order), values.index_select(0, order)  # [n, g, hn], in true order
            q = query[offset:offset + part]
            mask = (held[rank][:, None] >= torch.arange(n)[None, :]).to(query.device)  # causal by true position
            q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, n, hn]
            outputs.append(F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.softmax_scale,
                enable_gqa=self.num_attention_heads_per_partition != self.num_query_groups_per_partition))
            offset += part
        if offset != local:
            raise ValueError(f"packed sequences hold {offset} tokens on this context-parallel rank, the row {local}")
        context = torch.cat(outputs, dim=2)[0].transpose(0, 1)
        return context.reshape(local, self.hidden_size_per_partition)
