"""Hugging Face ``config.json`` <-> :class:`~megatron_rpo.config.ModelConfig` for the Llama family."""

from __future__ import annotations

import json
import os

from megatron_rpo.config import ModelConfig

__all__ = ["ARCHITECTURES", "read_hf_config", "model_config_from_hf", "hf_config_from_model"]

# architecture -> (model_type, QKV bias by default)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", False),
    "MistralForCausalLM": ("mistral", False),
    "Qwen2ForCausalLM": ("qwen2", True),
}


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{hf_dir} is not a Hugging Face model directory: no config.json") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


# megatron-core's Llama-3.1 RoPE scaling has these fixed; only the factor is a parameter.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope(cfg: dict, source: str) -> tuple[float, float | None]:
    """``(theta, llama3 scaling factor or None)``; other RoPE scalings are refused by name."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type")) or "default"
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ValueError(f"{source}: RoPE scaling {kind!r} is not supported (plain RoPE and llama3 are)")
    odd = {k: scaling.get(k) for k, v in LLAMA3_ROPE.items() if float(scaling.get(k, v)) != v}
    if odd:
        raise ValueError(f"{source}: llama3 RoPE scaling with {odd} is not supported: megatron-core's uses "
                         f"{LLAMA3_ROPE}")
    return float(theta), float(scaling["factor"])


def model_config_from_hf(cfg: dict, source: str = "config.json") -> tuple[ModelConfig, str]:
    """``(ModelConfig, architecture)`` from a config.json dict.

    Raises:
        ValueError: an architecture or feature we do not convert (named), or missing fields.
    """
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; "
                         f"supported: {sorted(ARCHITECTURES)}")
    theta, rope_factor = _rope(cfg, source)
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if cfg.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias=true is not supported")
    if cfg.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window=true is not supported (full causal attention only)")
    try:
        heads = cfg["num_attention_heads"]
        model = ModelConfig(
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            ffn_hidden_size=cfg["intermediate_size"],
            num_attention_heads=heads,
            num_query_groups=cfg.get("num_key_value_heads") or heads,
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rotary_base=theta,
            rope_scaling_factor=rope_factor,
            norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
            untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
            add_qkv_bias=bool(cfg.get("attention_bias", ARCHITECTURES[arch][1])),
        )
    except KeyError as e:
        raise ValueError(f"{source}: missing field {e.args[0]!r}") from None
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != model.hidden_size // heads:
        raise ValueError(f"{source}: head_dim {head_dim} != hidden_size / num_attention_heads is not supported")
    return model, arch


def hf_config_from_model(model: ModelConfig, architecture: str = "LlamaForCausalLM") -> dict:
    """A config.json dict for ``model`` (the inverse of :func:`model_config_from_hf`)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {sorted(ARCHITECTURES)}")
    model_type, _ = ARCHITECTURES[architecture]
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "num_hidden_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups or model.num_attention_heads,
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_position_embeddings,
        "rope_theta": model.rotary_base,
        "rms_norm_eps": model.norm_epsilon,
        "tie_word_embeddings": not model.untie_embeddings_and_output_weights,
        "attention_bias": model.add_qkv_bias,
        "hidden_act": "silu",
        "rope_scaling": None if model.rope_scaling_factor is None else dict(
            rope_type="llama3", factor=model.rope_scaling_factor, **LLAMA3_ROPE),
    }
