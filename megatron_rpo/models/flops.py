"""Model FLOPs of a training step, and the GPUs' peak rates: TFLOP/s per GPU and MFU.

Counted the way Megatron users read them, over real tokens only (padding never counts):

* matrix multiplies: ``2 N`` per token forward, ``4 N`` backward, with ``N`` the weights that
  take part in a token's matrix multiplies (attention projections, the gated MLP -- for a
  mixture-of-experts layer the router and the top-k experts --, the output layer; not the
  embedding lookup or the norms) -- ``6 N`` for the policy and ``2 N`` for an online
  reference's forward;
* causal attention (scores and the weighted sum): ``2 x heads x head_dim x L^2`` per layer for a sequence
  of ``L`` tokens forward, three times that forward and backward.

Gradient caching's extra forward pass is overhead and is not counted.
"""

from __future__ import annotations

from megatron_rpo.config import ModelConfig

__all__ = ["matmul_params", "step_flops", "peak_tflops"]

# Peak dense bf16 TFLOP/s (no sparsity) by device name; the first substring that matches wins.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0),
                    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("A10G", 125.0))


def matmul_params(model: ModelConfig) -> int:
    """N: the weights of one model copy that take part in a token's matrix multiplies.

    For a mixture-of-experts layer that is the router and the ``moe_router_topk`` experts a token
    is sent to (the active parameters), not every expert.
    """
    h, heads, d = model.hidden_size, model.num_attention_heads, model.head_dim
    q, kv = heads * d, (model.num_query_groups or heads) * d
    attention = h * (q + 2 * kv) + q * h  # qkv, output projection
    dense = 3 * h * model.ffn_hidden_size  # gate/up/down
    moe = 0
    if model.num_moe_experts is not None:
        expert = 3 * h * (model.moe_ffn_hidden_size or model.ffn_hidden_size)
        moe = h * model.num_moe_experts + model.moe_router_topk * expert  # the router and the top-k experts
    return sum(attention + (moe if expert else dense) for expert in model.moe_layers) + model.vocab_size * h


def step_flops(model: ModelConfig, tokens: int, squared_lengths: int, *, reference_forward: bool) -> float:
    """FLOPs of a step over ``tokens`` real tokens whose sequences' squared lengths sum to ``squared_lengths``."""
    passes = 3 + (1 if reference_forward else 0)  # forward + backward of the policy, forward of the reference
    return passes * (2.0 * matmul_params(model) * tokens
                     + 2.0 * model.num_layers * model.num_attention_heads * model.head_dim * squared_lengths)


def peak_tflops(device_name: str) -> float | None:
    """The peak dense bf16 TFLOP/s of a GPU by its name, or None when it is not in the table."""
    return next((value for key, value in PEAK_BF16_TFLOPS if key in device_name), None)
