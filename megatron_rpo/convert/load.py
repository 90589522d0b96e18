"""Load a converted checkpoint into this rank's part of a GPTModel, at any tensor/pipeline/expert split.

Each parameter reads only its own slice from the files: the rows (or columns) this
tensor-parallel rank holds, honouring megatron's partition stride (``[gate; up]`` splits each
half), for the layers of this pipeline stage and the experts of this expert-parallel rank
(split inside by the expert-tensor-parallel rank). The vocabulary is padded with zero rows, which the
log-probs mask out. Shapes are checked and a missing tensor is named.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_rpo.convert.files import MARKER, ConvertedCheckpoint
from megatron_rpo.convert.layout import global_expert_name, is_expert
from megatron_rpo.errors import InputError

__all__ = ["load_converted", "canonical_name", "tensor_split", "is_adapter", "VOCAB_TENSORS", "ADAPTERS"]

VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")
ADAPTERS = ("lora_A", "lora_B")
"""The names of low-rank adapters' parameters (megatron_rpo/models/lora.py) on an adapted linear."""


def is_adapter(name: str) -> bool:
    """Whether the parameter ``name`` is an adapter's (``...linear_qkv.lora_A``): not in a converted
    checkpoint, merged into its weight by the export."""
    return name.rsplit(".", 1)[-1] in ADAPTERS
# transformer-engine's layer spec fuses the norms into the following linear layer.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def canonical_name(model, name: str) -> str:
    """A local parameter name -> the checkpoint's name (global layer and expert numbers, local-spec names)."""
    parts = name.split(".")
    if parts[:2] != ["decoder", "layers"]:
        return name
    layer = model.decoder.layers[int(parts[2])]
    parts[2] = str(layer.layer_number - 1)
    rest = ".".join(parts[3:])
    if rest in _TE_ALIASES:
        return ".".join(parts[:3] + [_TE_ALIASES[rest]])
    name = ".".join(parts)
    if is_expert(name):
        local = layer.mlp.experts.num_local_experts
        name = global_expert_name(name, parallel_state.get_expert_model_parallel_rank() * local)
    return name


def tensor_split(name: str) -> tuple[int, int, object]:
    """``(rank, size, group)`` of the tensor parallelism that splits the checkpoint tensor ``name``:
    the expert-tensor-parallel group for an expert's weights, the tensor-parallel group otherwise."""
    if is_expert(name):
        return (parallel_state.get_expert_tensor_parallel_rank(),
                parallel_state.get_expert_tensor_parallel_world_size(),
                parallel_state.get_expert_tensor_parallel_group())
    return (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_group())


def _tp_ranges(param, full: int, rank: int, size: int) -> list[tuple[int, int]]:
    stride = getattr(param, "partition_stride", 1)
    chunk = full // (size * stride)
    return [((k * size + rank) * chunk, (k * size + rank + 1) * chunk) for k in range(stride)]


def _check_whole_shape(ckpt, name: str, shape: tuple, param, split: bool, dim: int, tp: int) -> None:
    """The checkpoint's whole tensor against the whole parameter the model expects, before any slicing."""
    want = list(param.shape)
    if split:
        want[dim] *= tp
    if name in VOCAB_TENSORS:
        # Vocabulary rows: the model's are padded up, so compare the width and that the rows fit.
        ok = len(shape) == len(want) and tuple(shape[1:]) == tuple(want[1:]) and shape[0] <= want[0]
    else:
        ok = tuple(shape) == tuple(want)
    if not ok:
        raise InputError(f"{ckpt.path}/{ckpt.index[name]}: tensor {name!r} has shape {tuple(shape)} but the model "
                         f"expects {tuple(want)} (the whole tensor): the checkpoint does not match its "
                         f"{MARKER} or the model config")


@torch.no_grad()
def load_converted(model, path: str) -> None:
    """Copy the checkpoint's weights into ``model`` (this rank's GPTModel, not DDP-wrapped).

    Raises:
        ValueError: a tensor is missing, or a slice does not match the parameter's shape.
    """
    ckpt = ConvertedCheckpoint(path)
    for local, param in model.named_parameters():
        if is_adapter(local):
            continue  # an adapter's: not in a converted checkpoint (drawn by the model)
        name = canonical_name(model, local)
        if name == "output_layer.weight" and name not in ckpt.index:
            name = "embedding.word_embeddings.weight"  # tied embeddings: the last stage holds a copy
        rank, tp, _ = tensor_split(name)
        shape = ckpt.shape(name)
        split = getattr(param, "tensor_model_parallel", False) and tp > 1
        dim = param.partition_dim if split else 0
        _check_whole_shape(ckpt, name, shape, param, split, dim, tp)
        if name in VOCAB_TENSORS:
            # Rows [start, start + rows) of the padded vocabulary; rows past the real ones stay 0.
            rows = param.shape[0]
            start = rank * rows if split else 0
            real = max(0, min(rows, shape[0] - start))
            value = torch.zeros(param.shape, dtype=param.dtype)
            if real:
                value[:real] = ckpt.rows(name, 0, [(start, start + real)])
        elif split:
            value = ckpt.rows(name, dim, _tp_ranges(param, shape[dim], rank, tp))
        else:
            value = ckpt.get(name)
        if tuple(value.shape) != tuple(param.shape):
            raise InputError(f"{path}: {name} gives shape {tuple(value.shape)} on this rank, the model's "
                             f"{local} is {tuple(param.shape)}: does the checkpoint match the model config?")
        param.copy_(value.to(param.dtype))
