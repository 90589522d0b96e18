"""Model FLOPs for TFLOP/s and MFU, against counts made independently."""

import pytest
import torch

from megatron_rpo.config import ModelConfig
from megatron_rpo.models.flops import matmul_params, peak_tflops, step_flops


@pytest.mark.parametrize("groups,tied", [(2, False), (4, True)])
def test_matmul_params_count_the_weights_of_every_linear_layer(groups, tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=groups, tie_word_embeddings=tied))
    linear = sum(m.weight.numel() for m in hf.modules() if isinstance(m, torch.nn.Linear))  # lm_head included
    ours = ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=groups,
                       vocab_size=300, untie_embeddings_and_output_weights=not tied)
    assert matmul_params(ours) == linear


def test_step_flops_by_hand():
    m = ModelConfig(num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2, vocab_size=10)
    n = matmul_params(m)  # 2 * (8 * 24 + 64 + 3 * 128) + 80
    assert n == 2 * (8 * 24 + 64 + 3 * 128) + 80
    # Policy forward + backward (3 passes), reference forward (1): 2N per token and 2 x hidden x L^2 per layer.
    want = 4 * (2 * n * 8 + 2 * 2 * 8 * (9 + 25))
    assert step_flops(m, 8, 34, reference_forward=True) == want
    assert step_flops(m, 8, 34, reference_forward=False) == want * 3 / 4


def test_peak_rates_by_device_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some Future GPU") is None


def test_matmul_params_of_a_mixture_of_experts_count_the_active_experts_by_hand():
    # Qwen3-MoE-like: head_dim 16 apart from hidden / heads (8), layer 0 dense, layers 1-2 with 8
    # experts of width 24, top 2, untied output layer.
    m = ModelConfig(num_layers=3, hidden_size=32, ffn_hidden_size=80, num_attention_heads=4, num_query_groups=2,
                    kv_channels=16, vocab_size=50, num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=24,
                    moe_layer_freq=[0, 1, 1])
    attention = 32 * 64 + 32 * 32 + 32 * 32 + 64 * 32  # q (4 x 16), k and v (2 x 16), output
    dense = 3 * 32 * 80
    moe = 32 * 8 + 2 * 3 * 32 * 24  # router, two experts' gate/up/down
    assert matmul_params(m) == 3 * attention + dense + 2 * moe + 50 * 32
    # attention flops use the heads' width (4 x 16 = 64), not hidden (32)
    assert step_flops(m, 1, 100, reference_forward=False) == 3 * (2.0 * matmul_params(m) + 2.0 * 3 * 64 * 100)
