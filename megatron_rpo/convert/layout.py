"""The declarative map between Hugging Face and Megatron parameter names, and its transforms.

Our converted checkpoint stores every tensor *whole* (no tensor-parallel split, vocabulary not
padded) under Megatron's names with global layer numbers, in Megatron's fused layouts:

* ``linear_qkv``: q, k and v grouped per key/value head: ``[q1 q2 k1 v1 | q3 q4 k2 v2]`` for 4
  query heads and 2 groups (each block is one head's ``head_dim`` rows);
* ``linear_fc1``: the gated MLP as ``[gate; up]``.

So any tensor/pipeline split can read its slices straight from the files
(:mod:`megatron_rpo.convert.load`).
"""

from __future__ import annotations

import torch

from megatron_rpo.config import ModelConfig

__all__ = ["LAYER_MAP", "GLOBAL_MAP", "file_groups", "group_of", "weights_file", "fuse_qkv", "split_qkv",
           "fuse_gate_up", "split_gate_up", "expected_shapes"]

# Megatron name (per layer, after "decoder.layers.{i}.") -> HF names (after "model.layers.{i}.") and the transform.
LAYER_MAP = {
    "input_layernorm.weight": (["input_layernorm.weight"], None),
    "self_attention.linear_qkv.weight": (
        ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"], "qkv"),
    "self_attention.linear_qkv.bias": (
        ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"], "qkv"),
    "self_attention.linear_proj.weight": (["self_attn.o_proj.weight"], None),
    "pre_mlp_layernorm.weight": (["post_attention_layernorm.weight"], None),
    "mlp.linear_fc1.weight": (["mlp.gate_proj.weight", "mlp.up_proj.weight"], "gate_up"),
    "mlp.linear_fc2.weight": (["mlp.down_proj.weight"], None),
}
GLOBAL_MAP = {
    "embedding.word_embeddings.weight": (["model.embed_tokens.weight"], None),
    "decoder.final_layernorm.weight": (["model.norm.weight"], None),
    "output_layer.weight": (["lm_head.weight"], None),
}
# Buffers some HF checkpoints carry that are recomputed, not learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _dims(m: ModelConfig) -> tuple[int, int, int]:
    groups = m.num_query_groups or m.num_attention_heads
    return m.hidden_size // m.num_attention_heads, m.num_attention_heads // groups, groups


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """HF q [nh*d, ...], k/v [ng*d, ...] -> Megatron [(nh + 2 ng) * d, ...] grouped per key/value head."""
    d, per_group, groups = _dims(m)
    rest = q.shape[1:]
    q = q.reshape(groups, per_group * d, *rest)  # [ng, nh/ng * d, ...]
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, m: ModelConfig) -> list[torch.Tensor]:
    """Inverse of :func:`fuse_qkv`."""
    d, per_group, groups = _dims(m)
    rest = qkv.shape[1:]
    blocks = qkv.reshape(groups, (per_group + 2) * d, *rest)
    q, k, v = blocks.split([per_group * d, d, d], dim=1)
    return [q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(), v.reshape(-1, *rest).contiguous()]


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor, m: ModelConfig) -> list[torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return [gate.contiguous(), up.contiguous()]


FUSE = {"qkv": fuse_qkv, "gate_up": fuse_gate_up}
SPLIT = {"qkv": split_qkv, "gate_up": split_gate_up}


def expected_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Megatron-name -> whole shape, per layer (key without the layer prefix) and global."""
    d, per_group, groups = _dims(m)
    h, f = m.hidden_size, m.ffn_hidden_size
    qkv_rows = (m.num_attention_heads + 2 * groups) * d
    shapes = {
        "input_layernorm.weight": (h,),
        "self_attention.linear_qkv.weight": (qkv_rows, h),
        "self_attention.linear_proj.weight": (h, m.num_attention_heads * d),
        "pre_mlp_layernorm.weight": (h,),
        "mlp.linear_fc1.weight": (2 * f, h),
        "mlp.linear_fc2.weight": (h, f),
        "embedding.word_embeddings.weight": (m.vocab_size, h),
        "decoder.final_layernorm.weight": (h,),
    }
    if m.add_qkv_bias:
        shapes["self_attention.linear_qkv.bias"] = (qkv_rows,)
    if m.untie_embeddings_and_output_weights:
        shapes["output_layer.weight"] = (m.vocab_size, h)
    return shapes


def file_groups(m: ModelConfig) -> list[tuple[str, dict | None]]:
    """The checkpoint's files in order, one per group: ``(name, {megatron name: (hf names, transform)})``
    for the embedding and the final group, ``(name, None)`` for a transformer layer (LAYER_MAP)."""
    final = {"decoder.final_layernorm.weight": GLOBAL_MAP["decoder.final_layernorm.weight"]}
    if m.untie_embeddings_and_output_weights:
        final["output_layer.weight"] = GLOBAL_MAP["output_layer.weight"]
    return ([("embedding", {"embedding.word_embeddings.weight": GLOBAL_MAP["embedding.word_embeddings.weight"]})]
            + [(_layer_group(i), None) for i in range(m.num_layers)]
            + [("final", final)])


def _layer_group(layer: int) -> str:
    return f"layer_{layer:05d}"


def group_of(name: str) -> str:
    """The file group (see :func:`file_groups`) that holds the Megatron tensor ``name``."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        return _layer_group(int(parts[2]))
    return "embedding" if name.startswith("embedding.") else "final"


def weights_file(group: str) -> str:
    """A group's file, relative to the checkpoint directory."""
    return f"weights/{group}.safetensors"
