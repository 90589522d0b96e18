"""Write this run's model as a converted checkpoint (whole tensors), from any TP/PP/EP split.

The inverse of :mod:`.load`: tensor-parallel slices are gathered (honouring the partition
stride), each pipeline stage's first data-parallel, first tensor-parallel rank writes its
layers' files, the first expert-data-parallel, first expert-tensor-parallel rank of each
expert-parallel rank writes its experts beside them, and global rank 0 writes the index and
renames the directory into place. The result is what ``tools/convert_megatron_to_hf.py`` reads
and what ``train.load`` accepts. Every rank must call it; the output directory must be on a
filesystem all ranks share.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_rpo.config import ModelConfig
from megatron_rpo.convert.files import MARKER, ConvertedCheckpoint, save_tensors
from megatron_rpo.convert.layout import group_of, is_expert, weights_file
from megatron_rpo.convert.load import VOCAB_TENSORS, canonical_name, is_adapter, tensor_split

__all__ = ["save_converted", "whole", "writes"]


def whole(param: torch.Tensor, name: str) -> torch.Tensor:
    """All tensor-parallel slices of ``param`` put back together (every rank of its group must call
    this); an adapted weight merged with its adapter first."""
    _, size, group = tensor_split(name)
    data = param.detach()
    if hasattr(param, "adapter_delta"):
        data = (data.float() + param.adapter_delta().float()).to(data.dtype)
    if not getattr(param, "tensor_model_parallel", False) or size == 1:
        return data.cpu()
    shards = [torch.empty_like(data) for _ in range(size)]
    dist.all_gather(shards, data.contiguous(), group=group)
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = [torch.chunk(s.cpu(), stride, dim=dim) for s in shards]
    return torch.cat([pieces[r][k] for k in range(stride) for r in range(size)], dim=dim)


def writes(name: str) -> bool:
    """Whether this rank writes the whole tensor ``name`` (after :func:`whole`): a layer's on the first
    data-parallel, first tensor-parallel rank of its stage, an expert's on the first expert-data-parallel,
    first expert-tensor-parallel rank of its expert-parallel rank."""
    if is_expert(name):
        return (parallel_state.get_expert_data_parallel_rank() == 0
                and parallel_state.get_expert_tensor_parallel_rank() == 0)
    return parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0


@torch.no_grad()
def save_converted(model, output_dir: str, model_config: ModelConfig, source: str) -> None:
    """Write ``model`` (this rank's GPTModel, unwrapped) as a converted checkpoint at ``output_dir``.

    Args:
        model: this rank's part of the model (a GPTModel, or megatron's list of model chunks).
        output_dir: must not exist yet (it is replaced as a whole when it does).
        model_config: the architecture (recorded).
        source: the converted checkpoint training started from: its ``hf_config.json`` and
            tokenizer are copied, so the export converts back to Hugging Face.
    """
    tmp = f"{os.path.abspath(output_dir)}.tmp"
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    files: dict[str, dict[str, torch.Tensor]] = {}
    tied = not model_config.untie_embeddings_and_output_weights
    chunks = model if isinstance(model, list) else [model]
    for chunk, local, param in ((c, n, p) for c in chunks for n, p in c.named_parameters()
                                if not is_adapter(n)):  # merged into their weights
        name = canonical_name(chunk, local)
        tensor = whole(param, name)
        if not writes(name) or (tied and name == "output_layer.weight"):
            continue
        if name in VOCAB_TENSORS:
            tensor = tensor[: model_config.vocab_size]  # drop the padding rows
        # Each expert-parallel rank holds other experts of the same layer: a file of its own.
        group = f"{group_of(name)}_experts{ep_rank:04d}" if is_expert(name) else group_of(name)
        files.setdefault(weights_file(group), {})[name] = tensor.contiguous()
        if len(files) > 1:  # one layer at a time in memory: flush the finished files
            for path in list(files)[:-1]:
                save_tensors(files.pop(path), os.path.join(tmp, path))
    for path, tensors in files.items():
        save_tensors(tensors, os.path.join(tmp, path))
    dist.barrier()
    if dist.get_rank() == 0:
        from safetensors import safe_open

        index = {}
        for name in sorted(os.listdir(os.path.join(tmp, "weights"))):
            with safe_open(os.path.join(tmp, "weights", name), "pt") as f:
                index.update({key: f"weights/{name}" for key in f.keys()})
        src = ConvertedCheckpoint(source)
        shutil.copy2(os.path.join(source, "hf_config.json"), os.path.join(tmp, "hf_config.json"))
        if os.path.isdir(os.path.join(source, "tokenizer")):
            shutil.copytree(os.path.join(source, "tokenizer"), os.path.join(tmp, "tokenizer"))
        # the architecture and its training defaults; how this run saved memory is not the model's
        meta = dict(src.meta, checkpoint_id=uuid.uuid4().hex, model=vars(model_config.without_memory_settings()),
                    source=os.path.abspath(source),
                    index=index,
                    dtype=str(next(iter(chunks[0].parameters())).dtype).replace("torch.", ""))
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(meta, f, indent=2)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    dist.barrier()
