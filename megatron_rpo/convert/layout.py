"""The declarative map between Hugging Face and Megatron parameter names, and its transforms.

Our converted checkpoint stores every tensor *whole* (no tensor-parallel split, vocabulary not
padded) under Megatron's names with global layer numbers, in Megatron's fused layouts:

* ``linear_qkv``: q, k and v grouped per key/value head: ``[q1 q2 k1 v1 | q3 q4 k2 v2]`` for 4
  query heads and 2 groups (each block is one head's ``head_dim`` rows);
* ``linear_fc1``: the gated MLP as ``[gate; up]``, also for each expert;
* experts: ``mlp.experts.local_experts.{e}.linear_fc{1,2}`` numbered globally, beside the router
  ``mlp.router.weight`` (Hugging Face saves experts one by one, whatever it fuses in memory).

So any tensor/pipeline/expert split can read its slices straight from the files
(:mod:`megatron_rpo.convert.load`).
"""

from __future__ import annotations

import torch

from megatron_rpo.config import ModelConfig
from megatron_rpo.errors import InputError

__all__ = ["GLOBAL_MAP", "layer_map", "is_expert", "global_expert_name", "file_groups", "group_of", "weights_file",
           "fuse_qkv", "split_qkv", "fuse_gate_up", "split_gate_up", "expected_shapes"]

# Megatron name (per layer, after "decoder.layers.{i}.") -> HF names (after "model.layers.{i}.") and the transform.
ATTENTION_MAP = {
    "input_layernorm.weight": (["input_layernorm.weight"], None),
    "self_attention.linear_qkv.weight": (
        ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"], "qkv"),
    "self_attention.linear_qkv.bias": (
        ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"], "qkv"),
    "self_attention.q_layernorm.weight": (["self_attn.q_norm.weight"], None),
    "self_attention.k_layernorm.weight": (["self_attn.k_norm.weight"], None),
    "self_attention.linear_proj.weight": (["self_attn.o_proj.weight"], None),
    "pre_mlp_layernorm.weight": (["post_attention_layernorm.weight"], None),
}
DENSE_MLP_MAP = {
    "mlp.linear_fc1.weight": (["mlp.gate_proj.weight", "mlp.up_proj.weight"], "gate_up"),
    "mlp.linear_fc2.weight": (["mlp.down_proj.weight"], None),
}
# Mixture-of-experts layers: HF's router and per-expert names, by family ({e}: the global expert index).
# Megatron's SequentialMLP names each expert ``mlp.experts.local_experts.{e}``; the checkpoint numbers
# them globally, so any expert-parallel split reads its own.
EXPERT = "mlp.experts.local_experts.{e}."
MOE_MAPS = {
    "MixtralForCausalLM": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.", ("w1", "w3", "w2")),
    "Qwen3MoeForCausalLM": ("mlp.gate.weight", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj")),
}
GLOBAL_MAP = {
    "embedding.word_embeddings.weight": (["model.embed_tokens.weight"], None),
    "decoder.final_layernorm.weight": (["model.norm.weight"], None),
    "output_layer.weight": (["lm_head.weight"], None),
}
# Buffers some HF checkpoints carry that are recomputed, not learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def layer_map(m: ModelConfig, architecture: str, layer: int) -> dict[str, tuple[list[str], str | None]]:
    """Megatron name -> (HF names, transform) for one layer (names relative to the layer), only the
    tensors this config has: QKV bias, q/k norms, a dense MLP or the router and every expert."""
    names = dict(ATTENTION_MAP)
    if not m.add_qkv_bias:
        del names["self_attention.linear_qkv.bias"]
    if not m.qk_layernorm:
        del names["self_attention.q_layernorm.weight"], names["self_attention.k_layernorm.weight"]
    if not m.moe_layers[layer]:
        return {**names, **DENSE_MLP_MAP}
    if architecture not in MOE_MAPS:
        raise InputError(f"{architecture} has no mixture-of-experts layers; the checkpoint's model says "
                         f"num_moe_experts={m.num_moe_experts}")
    router, expert, (gate, up, down) = MOE_MAPS[architecture]
    names["mlp.router.weight"] = ([router], None)
    for e in range(m.num_moe_experts):
        hf = expert.format(e=e)
        names[EXPERT.format(e=e) + "linear_fc1.weight"] = ([f"{hf}{gate}.weight", f"{hf}{up}.weight"], "gate_up")
        names[EXPERT.format(e=e) + "linear_fc2.weight"] = ([f"{hf}{down}.weight"], None)
    return names


def _dims(m: ModelConfig) -> tuple[int, int, int]:
    groups = m.num_query_groups or m.num_attention_heads
    return m.head_dim, m.num_attention_heads // groups, groups


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


def _layer_shapes(m: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    h, d = m.hidden_size, m.head_dim
    _, _, groups = _dims(m)
    qkv_rows = (m.num_attention_heads + 2 * groups) * d
    shapes = {
        "input_layernorm.weight": (h,),
        "self_attention.linear_qkv.weight": (qkv_rows, h),
        "self_attention.linear_qkv.bias": (qkv_rows,),
        "self_attention.q_layernorm.weight": (d,),
        "self_attention.k_layernorm.weight": (d,),
        "self_attention.linear_proj.weight": (h, m.num_attention_heads * d),
        "pre_mlp_layernorm.weight": (h,),
        "mlp.linear_fc1.weight": (2 * m.ffn_hidden_size, h),
        "mlp.linear_fc2.weight": (h, m.ffn_hidden_size),
    }
    if m.moe_layers[layer]:
        f = m.moe_ffn_hidden_size or m.ffn_hidden_size
        shapes["mlp.router.weight"] = (m.num_moe_experts, h)
        for e in range(m.num_moe_experts):
            shapes[EXPERT.format(e=e) + "linear_fc1.weight"] = (2 * f, h)
            shapes[EXPERT.format(e=e) + "linear_fc2.weight"] = (h, f)
    return shapes


def file_groups(m: ModelConfig, architecture: str) -> list[tuple[str, dict[str, tuple[list[str], str | None]]]]:
    """The checkpoint's files in order, one per group (the embedding, each layer, the final norm and
    output layer): ``(group, {megatron name: (hf names, transform)})`` with whole names."""
    final = {"decoder.final_layernorm.weight": GLOBAL_MAP["decoder.final_layernorm.weight"]}
    if m.untie_embeddings_and_output_weights:
        final["output_layer.weight"] = GLOBAL_MAP["output_layer.weight"]
    layers = [(_layer_group(i), {f"decoder.layers.{i}.{key}": ([f"model.layers.{i}.{n}" for n in hf], transform)
                                 for key, (hf, transform) in layer_map(m, architecture, i).items()})
              for i in range(m.num_layers)]
    return ([("embedding", {"embedding.word_embeddings.weight": GLOBAL_MAP["embedding.word_embeddings.weight"]})]
            + layers + [("final", final)])


def expected_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Megatron name -> whole shape, for every tensor :func:`file_groups` can list."""
    h = m.hidden_size
    shapes = {"embedding.word_embeddings.weight": (m.vocab_size, h), "decoder.final_layernorm.weight": (h,),
              "output_layer.weight": (m.vocab_size, h)}
    for i in range(m.num_layers):
        shapes.update({f"decoder.layers.{i}.{key}": shape for key, shape in _layer_shapes(m, i).items()})
    return shapes


def is_expert(name: str) -> bool:
    """Whether a Megatron parameter belongs to one expert (split by expert parallelism)."""
    return ".mlp.experts." in name


def global_expert_name(name: str, offset: int) -> str:
    """A local expert parameter's name with its index made global (``offset``: this rank's first expert)."""
    parts = name.split(".")
    at = parts.index("local_experts") + 1
    parts[at] = str(int(parts[at]) + offset)
    return ".".join(parts)


def _layer_group(layer: int) -> str:
    return f"layer_{layer:05d}"


def group_of(name: str) -> str:
    """The file group (see :func:`file_groups`) that holds the Megatron tensor ``name`` (a file
    per layer; a training run's export writes each expert-parallel rank's experts beside it)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        return _layer_group(int(parts[2]))
    return "embedding" if name.startswith("embedding.") else "final"


def weights_file(group: str) -> str:
    """A group's file, relative to the checkpoint directory."""
    return f"weights/{group}.safetensors"
