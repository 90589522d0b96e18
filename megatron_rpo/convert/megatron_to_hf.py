"""Our converted Megatron checkpoint -> Hugging Face safetensors + config.json + tokenizer.

The inverse of :mod:`.hf_to_megatron`, one layer at a time; the result loads with
``transformers.AutoModelForCausalLM``. HF -> Megatron -> HF gives bit-identical tensors.
"""

from __future__ import annotations

import json
import os
import shutil

from tqdm import tqdm

from megatron_rpo.convert.files import ConvertedCheckpoint, save_tensors
from megatron_rpo.convert.layout import SPLIT, file_groups
from megatron_rpo.publish import StagedDirectory

__all__ = ["convert_megatron_to_hf"]


def _unfuse(ckpt: ConvertedCheckpoint, target: str, hf_names: list[str], transform, model) -> dict:
    tensor = ckpt.get(target)
    parts = SPLIT[transform](tensor, model) if transform else [tensor]
    return dict(zip(hf_names, parts))


def convert_megatron_to_hf(megatron_dir: str, output_dir: str, *, progress: bool = True) -> dict:
    """Write a Hugging Face checkpoint; returns its config.json contents.

    Raises:
        ValueError: not a converted checkpoint, a tensor missing from it, or a non-empty output.
    """
    ckpt = ConvertedCheckpoint(megatron_dir)
    model = ckpt.model_config
    with open(os.path.join(megatron_dir, "hf_config.json")) as f:
        hf_config = json.load(f)
    weight_map: dict[str, str] = {}
    with StagedDirectory(output_dir) as tmp:
        groups = file_groups(model, ckpt.meta["architecture"])
        for number, (group, mapping) in enumerate(tqdm(groups, desc="export", unit=" layers", disable=not progress)):
            tensors = {}
            for target, (hf_keys, transform) in mapping.items():
                tensors.update(_unfuse(ckpt, target, hf_keys, transform, model))
            name = f"model-{number + 1:05d}-of-{len(groups):05d}.safetensors"
            save_tensors(tensors, os.path.join(tmp, name))
            weight_map.update({k: name for k in tensors})
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"format": "pt"}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        tokenizer_dir = os.path.join(megatron_dir, "tokenizer")
        if os.path.isdir(tokenizer_dir):
            for name in os.listdir(tokenizer_dir):
                shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
    return hf_config
