"""The model provider: ModelConfig -> TransformerConfig -> GPTModel (Llama/Mistral/Qwen2/Qwen3, dense and MoE)."""

from megatron_rpo.models.provider import (
    layer_spec,
    model_chunks,
    model_provider,
    transformer_config,
    transformer_engine_layers,
    use_transformer_engine,
)

__all__ = ["layer_spec", "model_chunks", "model_provider", "transformer_config",
           "use_transformer_engine", "transformer_engine_layers"]
