"""ModelConfig -> megatron TransformerConfig -> GPTModel, for the Llama/Mistral/Qwen2/Qwen3 family.

RMSNorm, SwiGLU, RoPE, grouped-query attention, optional QKV bias and q/k norms, tied or untied
embeddings, and megatron's mixture-of-experts layers (top-k router, SequentialMLP experts,
expert parallelism; dense and expert layers as ``moe_layer_freq`` says).
:func:`layer_spec` is the one place a layer spec is chosen: transformer-engine's when it
imports and CUDA is present, otherwise megatron's local spec with our :class:`RMSNorm`
(sequence-parallel aware) and :class:`SDPAttention`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_decoder_layer_specs,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_rpo.config import RECOMPUTE_KEYS, Config, ModelConfig, ParallelConfig
from megatron_rpo.errors import InputError
from megatron_rpo.logprobs import output_logprobs
from megatron_rpo.models.layers import RMSNorm, SDPAttention
from megatron_rpo.models.lora import apply_lora

__all__ = ["transformer_config", "layer_spec", "model_provider", "model_chunks",
           "use_transformer_engine", "transformer_engine_layers", "PreferenceGPTModel"]


@functools.lru_cache(maxsize=None)
def use_transformer_engine() -> bool:
    """Whether the transformer-engine layer spec is used: CUDA present and transformer_engine imports.

    Answered once per process: the forward step asks it for every microbatch, and a failed
    import is searched for again each time.
    """
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _moe_settings(model: ModelConfig) -> dict:
    """megatron's mixture-of-experts fields for ``model`` (none for a dense one)."""
    if model.num_moe_experts is None:
        return {}
    return dict(
        num_moe_experts=model.num_moe_experts,
        moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size or model.ffn_hidden_size,
        moe_router_pre_softmax=model.moe_router_pre_softmax,
        moe_layer_freq=model.moe_layer_freq,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_token_dispatcher_type=model.moe_token_dispatcher_type,
        # Dropless: every token reaches its k experts, so no padding or batch-mate changes a
        # token's output (the log-probs of a sequence do not depend on what it is packed with).
        moe_expert_capacity_factor=None,
        # Hugging Face takes the softmax in float32; the gating matmul in float32 too costs little.
        moe_router_dtype="fp32",
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
    )


def transformer_engine_layers(config: Config) -> bool:
    """Whether this run's model is built of transformer-engine's layers: where they are available
    (:func:`use_transformer_engine`), except with low-rank adapters, which go on megatron's local
    layers (docs/lora.md)."""
    return use_transformer_engine() and not config.lora.enabled


def transformer_config(model: ModelConfig, parallel: ParallelConfig, *, bf16: bool | None = None,
                       transformer_engine: bool | None = None) -> TransformerConfig:
    """Megatron's TransformerConfig for our model and parallel layout.

    Args:
        model: the architecture.
        parallel: the parallel layout.
        bf16: bf16 parameters and compute; default: on GPU, never on CPU.
        transformer_engine: whether the layers will be transformer-engine's; default: where available.
    """
    te = use_transformer_engine() if transformer_engine is None else transformer_engine
    if model.num_moe_experts is None and (parallel.expert_model_parallel_size != 1
                                          or parallel.expert_tensor_size != parallel.tensor_model_parallel_size):
        raise InputError(f"parallel.expert_model_parallel_size={parallel.expert_model_parallel_size} / "
                         f"expert_tensor_parallel_size={parallel.expert_tensor_parallel_size} need a "
                         "mixture-of-experts model, and this one is dense (model.num_moe_experts is not set)")
    if "layernorm" in (model.recompute_modules or []) and not te:
        # megatron-core's CheckpointWithoutOutput (0.16.1 through 0.19) reads transformer-engine's FP8
        # state unconditionally (its fp8 flag is `fp8 is not None`), a NameError without it.
        raise InputError("model.recompute_modules 'layernorm' needs transformer-engine (megatron-core's "
                         "norm recompute calls it); leave it out here")
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu if bf16 is None else bf16
    if bf16 and not on_gpu:
        raise InputError("bf16=True needs a GPU; CPU runs are fp32")
    dtype = torch.bfloat16 if bf16 else torch.float32
    interleaved = parallel.virtual_pipeline_model_parallel_size is not None
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups or model.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        kv_channels=model.head_dim,
        **{key: getattr(model, key) for key in RECOMPUTE_KEYS},  # megatron's names
        qk_layernorm=model.qk_layernorm,
        **_moe_settings(model),
        # Fine-tuning: no dropout (none of the supported families trains with it).
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        # transformer-engine's context-parallel attention: keys and values passed around the ring
        cp_comm_type="p2p" if parallel.context_parallel_size > 1 else None,
        sequence_parallel=parallel.sequence_parallel,
        # The interleaved schedule exchanges activations and gradients both ways at once. With
        # batched p2p ops at PP 2 the one peer is both previous and next stage, and the two sends
        # meet the two receives in the order posted: activations land where gradients were
        # expected (wrong gradients, no error; Megatron-LM issues #750, #1450). Megatron-LM's own
        # choice for the interleaved schedule, separate forward and backward exchanges, is exact.
        overlap_p2p_comm=interleaved,
        batch_p2p_comm=not interleaved,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_size,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        autocast_dtype=dtype,
        # On CPU the full weights are drawn and then split, so every parallel layout of one
        # pipeline stage starts from the same model; on GPU each rank draws its own shard (fast).
        use_cpu_initialization=not on_gpu,
    )


def _use_our_modules(spec: ModuleSpec, config: TransformerConfig) -> None:
    """megatron's local layer ``spec``, changed in place to our norms (q/k norms included) and attention."""
    norm = ModuleSpec(module=RMSNorm)
    spec.submodules.input_layernorm = norm
    spec.submodules.pre_mlp_layernorm = norm
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = SDPAttention
    if config.qk_layernorm:
        # megatron's torch norm for q/k refuses sequence parallelism; ours is the same arithmetic.
        attention.q_layernorm = attention.k_layernorm = norm


def layer_spec(config: TransformerConfig, vp_stage: int | None = None, transformer_engine: bool | None = None):
    """The decoder spec: transformer-engine's layers on GPU when available (``transformer_engine``
    None) or asked for, our local ones otherwise.

    Dense or mixture-of-experts layers where ``config.moe_layer_freq`` puts them (megatron's own
    per-layer specs), those of this pipeline stage.
    """
    if use_transformer_engine() if transformer_engine is None else transformer_engine:
        if config.num_moe_experts is None:
            return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
        return get_gpt_decoder_block_spec(config, use_transformer_engine=True, normalization="RMSNorm",
                                          vp_stage=vp_stage)
    specs = get_gpt_decoder_layer_specs(config, use_transformer_engine=False, normalization="RMSNorm")
    for spec in {id(s): s for s in specs}.values():  # one dense spec and one MoE spec, shared by the layers
        _use_our_modules(spec, config)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    # The block spec names the final norm too; a bare layer spec would get megatron's torch
    # norm there, which refuses sequence parallelism.
    return TransformerBlockSubmodules(layer_specs=specs[offset: offset + num_layers],
                                      layer_norm=ModuleSpec(module=RMSNorm))


class PreferenceGPTModel(GPTModel):
    """megatron's GPTModel whose last stage, given ``labels``, returns their [b, s] float32 log-probs.

    Without labels it is GPTModel (logits; the conversion tests compare them with transformers').
    With them, the output layer and the vocab-parallel log-softmax run as
    :func:`megatron_rpo.logprobs.output_logprobs` says: whole, or ``logprob_chunk_tokens`` tokens
    at a time. The parameters, and so the checkpoints, are GPTModel's.

    Args:
        real_vocab_size: the tokenizer's vocabulary (``vocab_size`` is the padded one).
        logprob_chunk_tokens: see :attr:`megatron_rpo.config.ModelConfig.logprob_chunk_tokens`.
        The rest: GPTModel's.
    """

    def __init__(self, *args, real_vocab_size: int, logprob_chunk_tokens: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.real_vocab_size = real_vocab_size
        self.logprob_chunk_tokens = logprob_chunk_tokens

    def _postprocess(self, hidden_states, labels=None, **kwargs):
        if labels is None or not self.post_process:
            return super()._postprocess(hidden_states=hidden_states, labels=labels, **kwargs)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        return output_logprobs(self.output_layer, hidden_states, weight, labels, self.real_vocab_size,
                               self.logprob_chunk_tokens)


def model_provider(
    config: Config,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    *,
    bf16: bool | None = None,
) -> GPTModel:
    """Build this rank's part of the GPTModel (Megatron's provider signature plus our config).

    Args:
        config: the run config (``model`` and ``parallel`` are read).
        pre_process: whether this stage holds the embedding; default: first pipeline stage.
        post_process: whether it holds the output layer; default: last pipeline stage.
        vp_stage: virtual pipeline stage (interleaved schedules).
        bf16: see :func:`transformer_config`.

    megatron's parallel state must be initialised first (:func:`megatron_rpo.parallel.initialize`).
    Given ``labels``, the last stage returns their log-probs (:class:`PreferenceGPTModel`). With
    ``config.lora`` enabled the model carries adapters and everything else is frozen
    (:mod:`megatron_rpo.models.lora`).
    """
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    te = transformer_engine_layers(config)
    tconfig = transformer_config(config.model, config.parallel, bf16=bf16, transformer_engine=te)
    m = config.model
    model = PreferenceGPTModel(
        real_vocab_size=m.vocab_size,
        logprob_chunk_tokens=m.logprob_chunk_tokens,
        config=tconfig,
        transformer_layer_spec=layer_spec(tconfig, vp_stage, te),
        vocab_size=m.padded_vocab_size(config.parallel.tensor_model_parallel_size),
        max_sequence_length=m.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=m.rotary_base,
        # megatron's Llama-3.1 scaling: low/high frequency factors 1 and 4, original context 8192
        # (what conversion checks the checkpoint's config against).
        rope_scaling=m.rope_scaling_factor is not None,
        rope_scaling_factor=m.rope_scaling_factor or 8.0,
        vp_stage=vp_stage,
    )
    model.transformer_engine = te  # what the forward step's packed-sequence description is made for
    _mark_experts(model)
    if config.lora.enabled:
        apply_lora(model, config.lora)
    return model


def model_chunks(config: Config, *, bf16: bool | None = None) -> list[GPTModel]:
    """This rank's model as megatron's list of chunks: one, or one per virtual pipeline stage
    (``parallel.virtual_pipeline_model_parallel_size``, the interleaved schedule)."""
    vpp = config.parallel.virtual_pipeline_model_parallel_size
    if vpp is None:
        return [model_provider(config, bf16=bf16)]
    return [model_provider(config, vp_stage=stage, bf16=bf16) for stage in range(vpp)]


def _mark_experts(model: GPTModel) -> None:
    """Treat expert weights as expert-parallel at EP = 1 too (megatron does only for EP > 1).

    megatron's DDP and optimizer keep expert-parallel weights in buffers and an optimizer of their
    own (a chained optimizer), so the optimizer state a checkpoint holds would otherwise change
    shape between EP = 1 and EP > 1, and a run could not resume at another EP size. At EP = 1 the
    expert-data-parallel group is the data-parallel group, so the gradients are reduced the same.
    """
    for module in model.modules():
        if isinstance(module, MoELayer):
            for param in module.experts.parameters():
                param.allreduce = False
