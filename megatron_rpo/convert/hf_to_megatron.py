"""Hugging Face (Llama 2/3, Mistral, Qwen2, Qwen3, Qwen3-MoE, Mixtral) -> our converted Megatron
checkpoint, one layer at a time.

Every source tensor must be consumed and every target must have its expected shape; the error
names the tensor otherwise. Nothing is left at the output path when conversion fails.
"""

from __future__ import annotations

import json
import os
import uuid

from tqdm import tqdm

from megatron_rpo.config import ModelConfig, ParallelConfig, config_from_dict
from megatron_rpo.convert.files import MARKER, HFWeights, copy_tokenizer, save_tensors
from megatron_rpo.convert.hf_config import model_config_from_hf, read_hf_config
from megatron_rpo.convert.layout import FUSE, IGNORED_SUFFIXES, expected_shapes, file_groups, weights_file
from megatron_rpo.errors import InputError
from megatron_rpo.publish import StagedDirectory

__all__ = ["convert_hf_to_megatron"]


def _check_tokenizer(hf_dir: str, model: ModelConfig) -> None:
    """The tokenizer the conversion copies must fit the model's vocabulary: every token id needs an
    embedding row, and a tokenizer of far fewer tokens than the vocabulary is another model's."""
    from megatron_rpo.data.tokenizer import holds_tokenizer, load_tokenizer

    if not holds_tokenizer(hf_dir):
        return  # nothing to copy
    sp = os.path.join(hf_dir, "tokenizer.model")
    path = sp if os.path.isfile(sp) and not os.path.isfile(os.path.join(hf_dir, "tokenizer.json")) else hf_dir
    size = load_tokenizer(path).vocab_size
    if size > model.vocab_size:
        raise InputError(f"{path}: the tokenizer has {size} tokens, more than the model's vocabulary "
                         f"({model.vocab_size}, config.json vocab_size): ids from {model.vocab_size} on have no "
                         "embedding. Is it this model's tokenizer?")
    if size < model.vocab_size // 2:
        raise InputError(f"{path}: the tokenizer has {size} tokens for a model vocabulary of {model.vocab_size} "
                         "(config.json vocab_size): it is not this model's tokenizer. Put the model's own "
                         "tokenizer files in the folder, or remove them and preprocess with the right one")


def _convert(weights: HFWeights, model: ModelConfig, hf_names: list[str], transform: str | None, target: str,
             expected: tuple[int, ...], consumed: set[str]):
    tensors = [weights.get(n) for n in hf_names]
    consumed.update(hf_names)
    out = FUSE[transform](*tensors, model) if transform else tensors[0]
    if tuple(out.shape) != tuple(expected):
        raise InputError(f"{target} (from {', '.join(hf_names)}): shape {tuple(out.shape)}, "
                         f"expected {tuple(expected)} for this config")
    return out


def convert_hf_to_megatron(
    hf_dir: str,
    output_dir: str,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    progress: bool = True,
) -> dict:
    """Convert a Hugging Face checkpoint; returns the checkpoint's metadata.

    The output holds whole tensors, so it loads at any tensor/pipeline/expert split; the split given
    here is checked against the model (heads, query groups, layers and experts must divide) and
    recorded.

    Raises:
        ValueError: unsupported architecture, malformed directory, a missing, unused or
            mis-shaped tensor (named), or a split that does not fit the model.
    """
    hf_config = read_hf_config(hf_dir)
    model, arch = model_config_from_hf(hf_config, os.path.join(hf_dir, "config.json"))
    if model.num_moe_experts is None and expert_model_parallel_size != 1:
        raise InputError(f"--expert-model-parallel-size {expert_model_parallel_size} splits experts, and {hf_dir} "
                         f"({arch}) is a dense model: leave it out")
    parallel = ParallelConfig(tensor_model_parallel_size=tensor_model_parallel_size,
                              pipeline_model_parallel_size=pipeline_model_parallel_size,
                              expert_model_parallel_size=expert_model_parallel_size,
                              # megatron's rule for experts with TP > 1; it does not change the weights
                              sequence_parallel=tensor_model_parallel_size > 1 and model.num_moe_experts is not None)
    # The cross-checks of a whole config (heads and layers divisible by the split).
    config_from_dict({"model": vars(model), "parallel": vars(parallel),
                      "data": {"max_length": min(512, model.max_position_embeddings),
                               "max_prompt_length": min(256, model.max_position_embeddings - 1)}},
                     source=f"converting {hf_dir}")
    _check_tokenizer(hf_dir, model)
    weights = HFWeights(hf_dir)
    shapes = expected_shapes(model)
    consumed: set[str] = set()
    index: dict[str, str] = {}
    dtype = None
    with StagedDirectory(output_dir) as tmp:
        # one file per group: the embedding, each layer, the final norm and output layer
        for group, mapping in tqdm(file_groups(model, arch), desc="convert", unit=" files", disable=not progress):
            tensors = {target: _convert(weights, model, hf_keys, transform, target, shapes[target], consumed)
                       for target, (hf_keys, transform) in mapping.items()}
            dtype = dtype or str(next(iter(tensors.values())).dtype).replace("torch.", "")
            path = weights_file(group)
            save_tensors(tensors, os.path.join(tmp, path))
            index.update({name: path for name in tensors})
        unused = sorted(n for n in weights.names() - consumed if not n.endswith(IGNORED_SUFFIXES)
                        and not (n == "lm_head.weight" and not model.untie_embeddings_and_output_weights))
        if unused:
            raise InputError(f"{hf_dir}: tensors not consumed by the conversion: {unused[:10]}"
                             f"{' ...' if len(unused) > 10 else ''}")
        with open(os.path.join(tmp, "hf_config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        tokenizer = copy_tokenizer(hf_dir, os.path.join(tmp, "tokenizer"))
        meta = {
            "kind": "converted",
            "version": 1,
            "checkpoint_id": uuid.uuid4().hex,  # names these weights (reference log-probs record it)
            "architecture": arch,
            "model": vars(model),
            "dtype": dtype,
            "source": os.path.abspath(hf_dir),
            "planned_split": {"tensor_model_parallel_size": tensor_model_parallel_size,
                              "pipeline_model_parallel_size": pipeline_model_parallel_size,
                              "expert_model_parallel_size": expert_model_parallel_size},
            "tokenizer_files": tokenizer,
            "index": index,
        }
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(meta, f, indent=2)
    return meta
