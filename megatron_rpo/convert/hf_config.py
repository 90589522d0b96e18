"""Hugging Face ``config.json`` <-> :class:`~megatron_rpo.config.ModelConfig`.

Llama 2/3, Mistral, Qwen2 and Qwen3 (dense), Qwen3-MoE and Mixtral (mixture of experts). What
these families can carry and megatron-core's local layers cannot (sliding windows, other RoPE
scalings, shared experts, router biases or jitter) is refused by name. OLMoE, gpt-oss and Gemma
are out of scope: their QK norm over the whole projection, attention sinks, clamped activations
and sandwich norms have no megatron-core 0.16 local-spec equivalent.
"""

from __future__ import annotations

import json
import os

from megatron_rpo.config import ModelConfig
from megatron_rpo.errors import InputError

__all__ = ["ARCHITECTURES", "read_hf_config", "model_config_from_hf", "hf_config_from_model"]

# architecture -> (model_type, QKV bias by default, q/k norms, experts)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", False, False, False),
    "MistralForCausalLM": ("mistral", False, False, False),
    "Qwen2ForCausalLM": ("qwen2", True, False, False),
    "Qwen3ForCausalLM": ("qwen3", False, True, False),
    "Qwen3MoeForCausalLM": ("qwen3_moe", False, True, True),
    "MixtralForCausalLM": ("mixtral", False, False, True),
}


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{hf_dir} is not a Hugging Face model directory: no config.json") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON ({e})") from e


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
        raise InputError(f"{source}: RoPE scaling {kind!r} is not supported (plain RoPE and llama3 are)")
    odd = {k: scaling.get(k) for k, v in LLAMA3_ROPE.items() if float(scaling.get(k, v)) != v}
    if odd:
        raise InputError(f"{source}: llama3 RoPE scaling with {odd} is not supported: megatron-core's uses "
                         f"{LLAMA3_ROPE}")
    return float(theta), float(scaling["factor"])


def _moe_fields(cfg: dict, arch: str, source: str) -> dict:
    """The ModelConfig fields of a mixture-of-experts config.json (Qwen3-MoE, Mixtral)."""
    if arch == "MixtralForCausalLM":
        if float(cfg.get("router_jitter_noise") or 0.0):
            raise InputError(f"{source}: router_jitter_noise={cfg['router_jitter_noise']} is not supported (0 only)")
        experts, width = cfg["num_local_experts"], cfg["intermediate_size"]
        pattern, renormalise = 1, True
    else:
        for key in ("shared_expert_intermediate_size", "num_shared_experts", "n_shared_experts"):
            if cfg.get(key):
                raise InputError(f"{source}: shared experts ({key}={cfg[key]}) are not supported")
        experts = cfg.get("num_experts", cfg.get("num_local_experts"))
        if experts is None:
            raise KeyError("num_experts")
        width = cfg["moe_intermediate_size"]
        step, dense = int(cfg.get("decoder_sparse_step", 1)), set(cfg.get("mlp_only_layers") or [])
        # transformers' rule for which layers carry experts
        moe = [int(i not in dense and (i + 1) % step == 0) for i in range(cfg["num_hidden_layers"])]
        pattern = 1 if all(moe) else moe
        renormalise = bool(cfg.get("norm_topk_prob", False))
    for key in ("router_bias", "moe_router_bias", "router_bias_update_rate"):
        if cfg.get(key):
            raise InputError(f"{source}: a router bias ({key}) is not supported")
    return dict(
        num_moe_experts=experts,
        moe_router_topk=cfg["num_experts_per_tok"],
        moe_ffn_hidden_size=width,
        # megatron's pre_softmax=False is top-k of the logits, then softmax over the k: Hugging Face's
        # softmax, top-k and renormalise. pre_softmax=True is softmax, then top-k, not renormalised.
        moe_router_pre_softmax=not renormalise,
        moe_layer_freq=pattern,
        moe_aux_loss_coeff=float(cfg.get("router_aux_loss_coef", 0.0)),
    )


def model_config_from_hf(cfg: dict, source: str = "config.json") -> tuple[ModelConfig, str]:
    """``(ModelConfig, architecture)`` from a config.json dict.

    Raises:
        ValueError: an architecture or feature we do not convert (named), or missing fields.
    """
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise InputError(f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; "
                         f"supported: {sorted(ARCHITECTURES)}")
    _, bias, qk_norm, experts = ARCHITECTURES[arch]
    theta, rope_factor = _rope(cfg, source)
    if cfg.get("hidden_act", "silu") != "silu":
        raise InputError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if cfg.get("mlp_bias"):
        raise InputError(f"{source}: mlp_bias=true is not supported")
    if cfg.get("use_sliding_window"):
        raise InputError(f"{source}: use_sliding_window=true is not supported (full causal attention only)")
    if any(t != "full_attention" for t in cfg.get("layer_types") or []):
        raise InputError(f"{source}: layer_types {sorted(set(cfg['layer_types']))} is not supported (full causal "
                         "attention in every layer only)")
    if experts and cfg.get("sliding_window"):
        raise InputError(f"{source}: sliding_window={cfg['sliding_window']} is not supported (full causal "
                         "attention only)")
    try:
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim")
        model = ModelConfig(
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            ffn_hidden_size=cfg["intermediate_size"],
            num_attention_heads=heads,
            num_query_groups=cfg.get("num_key_value_heads") or heads,
            kv_channels=head_dim if head_dim and head_dim * heads != cfg["hidden_size"] else None,
            qk_layernorm=qk_norm,
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rotary_base=theta,
            rope_scaling_factor=rope_factor,
            norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
            untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
            add_qkv_bias=bool(cfg.get("attention_bias", bias)),
            **(_moe_fields(cfg, arch, source) if experts else {}),
        )
    except KeyError as e:
        raise InputError(f"{source}: missing field {e.args[0]!r}") from None
    return model, arch


def hf_config_from_model(model: ModelConfig, architecture: str = "LlamaForCausalLM") -> dict:
    """A config.json dict for ``model`` (the inverse of :func:`model_config_from_hf`)."""
    if architecture not in ARCHITECTURES:
        raise InputError(f"unsupported architecture {architecture!r}; supported: {sorted(ARCHITECTURES)}")
    model_type, _, _, experts = ARCHITECTURES[architecture]
    cfg = {
        "architectures": [architecture],
        "model_type": model_type,
        "num_hidden_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups or model.num_attention_heads,
        "head_dim": model.head_dim,
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
    if experts:
        cfg.update(num_experts_per_tok=model.moe_router_topk, router_aux_loss_coef=model.moe_aux_loss_coeff)
        if architecture == "MixtralForCausalLM":
            cfg.update(num_local_experts=model.num_moe_experts)
        else:
            dense = [i for i, moe in enumerate(model.moe_layers) if not moe]
            cfg.update(num_experts=model.num_moe_experts, moe_intermediate_size=model.moe_ffn_hidden_size,
                       norm_topk_prob=not model.moe_router_pre_softmax, decoder_sparse_step=1, mlp_only_layers=dense)
    return cfg
