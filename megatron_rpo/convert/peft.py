"""A run's low-rank adapters as a PEFT adapter folder, from any TP/PP/VPP split.

``adapter_config.json`` + ``adapter_model.safetensors`` (+ :data:`BASE_RECORD`), what
``peft.PeftModel.from_pretrained(base, folder)`` loads onto the Hugging Face model the run started
from (tools/convert_megatron_to_hf.py of ``train.load``). Our adapters sit on megatron's fused
linears; Hugging Face's are separate, and ``(alpha / r) B A x`` splits by rows exactly:

* ``linear_qkv`` -> ``q_proj``, ``k_proj``, ``v_proj``: each gets ``A`` whole and its rows of ``B``
  (megatron's per-group ``[q k v]`` order, :func:`~megatron_rpo.convert.layout.split_qkv`);
* ``linear_fc1`` -> ``gate_proj``, ``up_proj``: ``A`` whole, ``B``'s ``[gate; up]`` halves;
* ``linear_proj`` -> ``o_proj`` and ``linear_fc2`` -> ``down_proj``: as they are;
* the experts' ``linear_fc1``/``linear_fc2`` -> the fused ``mlp.experts.gate_up_proj``/``down_proj``
  parameters of transformers 5's mixture-of-experts models, which PEFT adapts through
  ``target_parameters`` (one adapter per parameter, all its experts: ``lora_A`` their ``A`` stacked,
  ``(experts x rank, in)``, ``lora_B`` their ``B`` interleaved, column ``j x experts + e`` being
  expert ``e``'s ``j``-th; PEFT nests the wrappers in the module's order of the parameters, so
  ``gate_up_proj``'s tensors sit under ``experts.base_layer`` when ``down_proj`` is adapted too).

``target_modules`` is a pattern that matches the adapted modules only (never the experts), so PEFT
creates no adapter we did not train.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
import torch.distributed as dist

from megatron_rpo.config import LoRAConfig, ModelConfig
from megatron_rpo.convert.files import ConvertedCheckpoint, save_tensors
from megatron_rpo.convert.layout import ATTENTION_MAP, DENSE_MLP_MAP, SPLIT, is_expert
from megatron_rpo.convert.load import canonical_name, is_adapter
from megatron_rpo.convert.save import whole, writes
from megatron_rpo.publish import StagedDirectory

__all__ = ["save_peft_adapter", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "BASE_RECORD"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_RECORD = "megatron_rpo_base.json"
"""Beside PEFT's files: the converted checkpoint the adapters were trained on (path and id) and the
adapted modules."""
_LINEARS = {key.removesuffix(".weight"): ([n.removesuffix(".weight") for n in hf], transform)
            for key, (hf, transform) in {**ATTENTION_MAP, **DENSE_MLP_MAP}.items()
            if key.endswith(("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight"))}
"""megatron's linear (relative to its layer) -> (Hugging Face modules, how its rows split)."""
_EXPERT_PARAMETERS = {"linear_fc1": "gate_up_proj", "linear_fc2": "down_proj"}
"""An expert's linear -> the fused parameter of ``mlp.experts`` it is a slice of, in the module's order."""


def _hf_tensors(name: str, a: torch.Tensor, b: torch.Tensor, model: ModelConfig) -> dict[str, torch.Tensor]:
    """One adapted linear's whole ``A``/``B`` -> PEFT's tensors, keyed by its names."""
    parts = name.split(".")  # decoder.layers.{i}.<linear>
    hf_modules, transform = _LINEARS[".".join(parts[3:])]
    bs = SPLIT[transform](b, model) if transform else [b]
    out = {}
    for module, b_part in zip(hf_modules, bs):
        prefix = f"base_model.model.model.layers.{parts[2]}.{module}"
        out[f"{prefix}.lora_A.weight"] = a.clone()  # one copy per module (a file holds no shared tensors)
        out[f"{prefix}.lora_B.weight"] = b_part.contiguous()
    return out


def _expert_tensors(layer: str, adapters: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]
                    ) -> dict[str, torch.Tensor]:
    """One layer's experts' adapters (linear -> expert -> whole ``A``, ``B``) -> PEFT's tensors."""
    adapted = [linear for linear in _EXPERT_PARAMETERS if linear in adapters]
    out = {}
    for k, linear in enumerate(adapted):
        experts = [adapters[linear][e] for e in sorted(adapters[linear])]
        rows = experts[0][1].shape[0]
        prefix = f"base_model.model.model.layers.{layer}.mlp.experts" + ".base_layer" * (len(adapted) - 1 - k)
        out[f"{prefix}.lora_A.weight"] = torch.cat([a for a, _ in experts])
        out[f"{prefix}.lora_B.weight"] = torch.stack([b for _, b in experts], dim=2).reshape(rows, -1).contiguous()
    return out


def _peft_tensors(every: dict[str, torch.Tensor], model: ModelConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every adapter of the model (whole, by megatron's global names) -> PEFT's tensors, and the
    experts' fused parameters they adapt (PEFT's ``target_parameters``)."""
    tensors, experts = {}, {}
    for name in sorted({k.rsplit(".", 1)[0] for k in every}):
        a, b = every[f"{name}.lora_A"], every[f"{name}.lora_B"]
        if is_expert(name):  # decoder.layers.{i}.mlp.experts.local_experts.{e}.<linear>
            parts = name.split(".")
            experts.setdefault(parts[2], {}).setdefault(parts[-1], {})[int(parts[-2])] = (a, b)
        else:
            tensors.update(_hf_tensors(name, a, b, model))
    fused = set()
    for layer, adapters in experts.items():
        tensors.update(_expert_tensors(layer, adapters))
        fused.update(adapters)
    return tensors, [f"mlp.experts.{_EXPERT_PARAMETERS[k]}" for k in _EXPERT_PARAMETERS if k in fused]


@torch.no_grad()
def save_peft_adapter(model, output_dir: str, model_config: ModelConfig, lora: LoRAConfig, source: str) -> None:
    """Write the adapters of ``model`` (this rank's chunks, unwrapped) as a PEFT folder at ``output_dir``.

    Every rank must call it; the ranks that write a tensor in the merged export
    (:func:`~megatron_rpo.convert.save.writes`) send their adapters, global rank 0 writes the folder
    (published whole).

    Args:
        model: this rank's model chunks (a GPTModel or megatron's list of them), with adapters.
        output_dir: replaced as a whole when it exists.
        model_config: the architecture (how ``linear_qkv`` splits).
        lora: the adapters' settings (rank, alpha, dropout).
        source: the converted checkpoint training started from (the base the adapters go on).
    """
    chunks = model if isinstance(model, list) else [model]
    mine: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        for local, param in chunk.named_parameters():
            if is_adapter(local):
                name = canonical_name(chunk, local)
                tensor = whole(param, name).float()  # every rank of its group takes part
                if writes(name):  # one copy of each, from the ranks that write the merged export's
                    mine[name] = tensor
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if dist.get_rank() == 0:
        tensors, fused = _peft_tensors({k: v for part in gathered for k, v in part.items()}, model_config)
        modules = sorted({k.split(".lora_")[0].removeprefix("base_model.model.") for k in tensors})
        linears = [m for m in modules if not m.split(".base_layer")[0].endswith(".experts")]
        layers = sorted({m.split(".mlp.experts")[0] for m in modules if m not in linears})
        kinds = sorted({m.rsplit(".", 1)[-1] for m in linears})
        parents = sorted({m.split(".")[-2] for m in linears})
        base = ConvertedCheckpoint(source).meta  # the base: its Hugging Face folder and its id
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
            # the adapted linears and no other; the experts' fused parameters by name
            "target_modules": rf"model\.layers\.\d+\.({'|'.join(parents)})\.({'|'.join(kinds)})" if linears else [],
            "target_parameters": fused or None,
            "base_model_name_or_path": base.get("source"),
        }
        assert all(re.fullmatch(config["target_modules"], m) for m in linears)
        ours = {"base_checkpoint": os.path.abspath(source), "base_checkpoint_id": base.get("checkpoint_id"),
                "adapted_modules": linears + [f"{layer}.{p}" for layer in layers for p in fused]}
        if os.path.exists(output_dir):  # an export of this run that a resume finishes again
            shutil.rmtree(output_dir)
        with StagedDirectory(output_dir) as tmp:
            save_tensors(tensors, os.path.join(tmp, ADAPTER_WEIGHTS))
            with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
                json.dump(config, f, indent=2)
            with open(os.path.join(tmp, BASE_RECORD), "w") as f:  # PEFT's config takes no keys of ours
                json.dump(ours, f, indent=2)
    dist.barrier()
