"""The run configuration's schema: six sections, dataclasses with a docstring under each field.

Defaults live in these dataclasses and nowhere else. Each section type-checks its fields and
validates its own values; :class:`Config` runs the checks across sections
(:mod:`megatron_rpo.config.checks`) once it is whole. Unknown keys, wrong types and conflicting
values raise ``ValueError`` naming the key and the values.

Batch sizes (``train.micro_batch_size``, ``train.global_batch_size``) count **pairs** for
paired data (``data.paired: true``; each pair is two sequences) and **items** (one prompt with
one labelled response) for unpaired data.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from megatron_rpo.config import checks
from megatron_rpo.config.losses import LOSSES
from megatron_rpo.errors import InputError

__all__ = ["ModelConfig", "ParallelConfig", "LossConfig", "DataConfig", "OptimizerConfig", "TrainConfig", "LoRAConfig",
           "Config", "LORA_TARGETS",
           "RECOMPUTE_MODULES", "RECOMPUTE_KEYS", "MEMORY_KEYS", "MODEL_TRAINING_CHOICES"]

def _check_type(where: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` checked (and int -> float widened) against a field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(where, value, option)
            except ValueError as e:
                errors.append(str(e))
        raise InputError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {options}")
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise InputError(f"{where} must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where} must be a list, got {value!r} ({type(value).__name__})")
        return [_check_type(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads 5e-7, without a dot, as a string: accept what float() accepts.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where} must be a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where} must be an integer, got {value!r} ({type(value).__name__})")
        return value
    if annotation in (bool, str):
        if not isinstance(value, annotation):
            raise InputError(f"{where} must be a {annotation.__name__}, got {value!r} ({type(value).__name__})")
        return value
    raise TypeError(f"{where}: unsupported annotation {annotation!r}")  # a bug in this module


class _Section:
    """Type-checks every field on construction, then runs the section's own ``validate``."""

    _section: str = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            where = f"{self._section}.{f.name}"
            object.__setattr__(self, f.name, _check_type(where, getattr(self, f.name), hints[f.name]))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError for values that are well-typed but wrong."""

    def _positive(self, *names: str, allow_zero: bool = False) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and (value < 0 if allow_zero else value <= 0):
                bound = ">= 0" if allow_zero else "> 0"
                raise InputError(f"{self._section}.{name} must be {bound}, got {value}")


RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp", "moe")
"""megatron's selective-recompute parts that our models have (moe_act needs grouped GEMM, mla_up_proj MLA)."""
RECOMPUTE_KEYS = ("recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules")
MEMORY_KEYS = (*RECOMPUTE_KEYS, "logprob_chunk_tokens")
"""The ``model`` keys that trade compute for memory and change no result."""
MODEL_TRAINING_CHOICES = frozenset({"make_vocab_size_divisible_by", "moe_aux_loss_coeff", "moe_token_dispatcher_type",
                                    *MEMORY_KEYS})
"""The ``model`` keys that are not the architecture (see :class:`ModelConfig`)."""


@dataclass
class ModelConfig(_Section):
    """A Llama/Mistral/Qwen2/Qwen3-family decoder, dense or mixture-of-experts (Qwen3-MoE, Mixtral).
    The defaults are Llama-2-7B's shape.

    Every field but ``make_vocab_size_divisible_by``, ``moe_aux_loss_coeff``,
    ``moe_token_dispatcher_type``, the ``recompute_*`` ones and ``logprob_chunk_tokens`` is the
    architecture: training reads it from the converted checkpoint, and a value a recipe sets must
    agree with it. Those are training choices a recipe may set freely (the checkpoint's value is
    the default)."""

    _section = "model"

    num_layers: int = 32
    """Transformer layers."""
    hidden_size: int = 4096
    """Width of the residual stream."""
    ffn_hidden_size: int = 11008
    """Width of the SwiGLU MLP (each of gate and up)."""
    num_attention_heads: int = 32
    """Query heads."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; None means one per query head."""
    vocab_size: int = 32000
    """Tokenizer vocabulary; padded to a multiple of ``make_vocab_size_divisible_by * TP``."""
    make_vocab_size_divisible_by: int = 128
    """Vocabulary padding multiple (before multiplying by the tensor-parallel size)."""
    max_position_embeddings: int = 4096
    """Longest sequence the model is built for."""
    rotary_base: float = 10000.0
    """RoPE theta (Llama-2: 1e4, Llama-3: 5e5, Mistral: 1e6 for v0.2+)."""
    rope_scaling_factor: Optional[float] = None
    """Llama-3.1-style RoPE scaling (``rope_type: llama3``) with this factor (Llama-3.1: 8, 3.2: 32),
    low/high frequency factors 1 and 4 over an original context of 8192; None: plain RoPE."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    untie_embeddings_and_output_weights: bool = True
    """False ties the output layer to the input embedding (e.g. small Qwen2 models)."""
    add_qkv_bias: bool = False
    """Bias on the query/key/value projection (Qwen2)."""
    qk_layernorm: bool = False
    """RMSNorm over each query and key head before RoPE (Qwen3)."""
    kv_channels: Optional[int] = None
    """Width of one attention head (Hugging Face's ``head_dim``); None: hidden_size / num_attention_heads.
    Qwen3 sets it apart from that (e.g. Qwen3-0.6B: 128 with hidden 1024 and 16 heads)."""
    num_moe_experts: Optional[int] = None
    """Experts per mixture-of-experts layer; None: a dense model."""
    moe_router_topk: int = 2
    """Experts each token is routed to."""
    moe_ffn_hidden_size: Optional[int] = None
    """Width of each expert's SwiGLU MLP; None: ffn_hidden_size (Mixtral). Qwen3-MoE's
    ``moe_intermediate_size``; ``ffn_hidden_size`` stays the width of its dense layers."""
    moe_router_pre_softmax: bool = False
    """False: top-k of the router logits, then softmax over those k (Hugging Face's softmax, top-k,
    renormalise: Mixtral, Qwen3-MoE with ``norm_topk_prob: true``). True: softmax over every expert,
    then top-k, weights not renormalised (Qwen3-MoE with ``norm_topk_prob: false``)."""
    moe_layer_freq: Union[int, list[int]] = 1
    """Which layers are mixture-of-experts (megatron's meaning): N, every N-th layer from the first;
    or one 0 (dense) / 1 (experts) per layer (Qwen3-MoE's ``mlp_only_layers`` / ``decoder_sparse_step``)."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the router's load-balancing loss (per layer, megatron's form); conversion takes the
    checkpoint's ``router_aux_loss_coef``. The loss only adds a gradient: it never enters the
    preference loss, the rewards or the reference log-probs. NeMo-RL trains with 0 (it found the
    aux loss hurts post-training); TRL's default is 0.001."""
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"
    """How tokens reach their experts' ranks under expert parallelism (megatron's dispatchers);
    the result is the same, the communication differs (alltoall is megatron's choice for EP > 1)."""
    recompute_granularity: Optional[Literal["full", "selective"]] = None
    """Activation recomputation (megatron's): ``full`` keeps only the input of groups of layers and
    recomputes the rest in backward; ``selective`` recomputes the parts ``recompute_modules`` names;
    None keeps every activation. Gradients are the same; the frozen reference never recomputes."""
    recompute_method: Optional[Literal["uniform", "block"]] = None
    """With ``full``: ``uniform`` splits each pipeline stage's layers into groups of
    ``recompute_num_layers`` and keeps one input per group; ``block`` recomputes the first
    ``recompute_num_layers`` layers of each stage and keeps the others' activations."""
    recompute_num_layers: Optional[int] = None
    """With ``full``: layers per group (``uniform``) or layers recomputed per stage (``block``)."""
    recompute_modules: Optional[list[str]] = None
    """With ``selective``: which parts (megatron's names): ``core_attn`` (the attention scores,
    the default), ``layernorm``, ``mlp`` (dense MLPs), ``moe`` (mixture-of-experts layers)."""
    logprob_chunk_tokens: Optional[int] = None
    """Run the output layer and the log-softmax over this many tokens at a time, each chunk's logits
    recomputed in backward, so the whole ``[tokens, vocab / TP]`` logits (about 20 GB in float32 at
    32k tokens and a 152k vocabulary, TP 1) and their gradient never exist; None: all tokens at
    once. Costs one more output-layer matmul per token (and 3 small all-reduces per chunk under
    TP); log-probs and gradients are the same up to the order of float sums. The policy and the
    online reference use it; the reference tool takes ``--logprob-chunk-tokens``."""

    def validate(self) -> None:
        self._positive("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                       "vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings", "rotary_base",
                       "norm_epsilon", "rope_scaling_factor", "kv_channels", "num_moe_experts",
                       "moe_router_topk", "moe_ffn_hidden_size", "logprob_chunk_tokens")
        self._positive("moe_aux_loss_coeff", allow_zero=True)
        if self.num_moe_experts is not None:
            if self.moe_router_topk > self.num_moe_experts:
                raise InputError(f"model.moe_router_topk ({self.moe_router_topk}) exceeds model.num_moe_experts "
                                 f"({self.num_moe_experts})")
            if self.moe_router_topk == 1 and not self.moe_router_pre_softmax:
                raise InputError("model.moe_router_topk=1 needs model.moe_router_pre_softmax=true (megatron's rule: "
                                 "a softmax over the one chosen expert is 1 and has no gradient)")
            pattern = self.moe_layers
            if len(pattern) != self.num_layers:
                raise InputError(f"model.moe_layer_freq lists {len(pattern)} layers but model.num_layers is "
                                 f"{self.num_layers}")
            if any(v not in (0, 1) for v in pattern):
                raise InputError(f"model.moe_layer_freq must hold 0 (dense) or 1 (experts) per layer, got "
                                 f"{self.moe_layer_freq}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise InputError(
                f"model.hidden_size ({self.hidden_size}) is not divisible by "
                f"model.num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_query_groups is not None and self.num_attention_heads % self.num_query_groups:
            raise InputError(
                f"model.num_attention_heads ({self.num_attention_heads}) is not divisible by "
                f"model.num_query_groups ({self.num_query_groups})"
            )
        self._check_recompute()
        if self.moe_layer_freq != 1 and self.num_moe_experts is None:
            raise InputError(f"model.moe_layer_freq={self.moe_layer_freq} needs model.num_moe_experts (a dense "
                             "model has no expert layers)")
        if isinstance(self.moe_layer_freq, int) and self.moe_layer_freq <= 0:
            raise InputError(f"model.moe_layer_freq must be > 0, got {self.moe_layer_freq}")

    def _check_recompute(self) -> None:
        """megatron's rules for activation recomputation, and settings that would do nothing refused."""
        self._positive("recompute_num_layers")
        granularity = self.recompute_granularity
        if granularity != "full":
            for key in ("recompute_method", "recompute_num_layers"):
                if getattr(self, key) is not None:
                    raise InputError(f"model.{key}={getattr(self, key)!r} only applies to "
                                     f"model.recompute_granularity='full', got {granularity!r}")
        elif self.recompute_method is None or self.recompute_num_layers is None:
            raise InputError("model.recompute_granularity='full' needs model.recompute_method (uniform or block) "
                             "and model.recompute_num_layers")
        if self.recompute_modules is not None:
            if granularity != "selective":
                raise InputError(f"model.recompute_modules={self.recompute_modules} only applies to "
                                 f"model.recompute_granularity='selective', got {granularity!r}")
            unknown = sorted(set(self.recompute_modules) - set(RECOMPUTE_MODULES))
            if unknown or not self.recompute_modules:
                raise InputError(f"model.recompute_modules: {unknown or '[]'} is not among {list(RECOMPUTE_MODULES)}")
            if "moe" in self.recompute_modules and self.num_moe_experts is None:
                raise InputError("model.recompute_modules 'moe' needs a mixture-of-experts model")

    def without_recompute(self) -> "ModelConfig":
        """This model with activation recomputation off (what the frozen reference is built with)."""
        return dataclasses.replace(self, **{key: None for key in RECOMPUTE_KEYS})

    def without_memory_settings(self) -> "ModelConfig":
        """This model with none of the :data:`MEMORY_KEYS` set (what a saved checkpoint records)."""
        return dataclasses.replace(self, **{key: None for key in MEMORY_KEYS})

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def qkv_width(self) -> int:
        """Output width of the fused q/k/v projection (``linear_qkv``): the query heads and each
        group's key and value."""
        return (self.num_attention_heads + 2 * (self.num_query_groups or self.num_attention_heads)) * self.head_dim

    @property
    def moe_layers(self) -> list[int]:
        """Per layer, 1 where it is mixture-of-experts, 0 where dense (all 0 for a dense model)."""
        if self.num_moe_experts is None:
            return [0] * self.num_layers
        if isinstance(self.moe_layer_freq, list):
            return list(self.moe_layer_freq)
        return [1 if i % self.moe_layer_freq == 0 else 0 for i in range(self.num_layers)]

    def padded_vocab_size(self, tensor_model_parallel_size: int) -> int:
        """The vocabulary rounded up to a multiple of ``make_vocab_size_divisible_by * TP``
        (Megatron-LM's rule), the embedding's and output layer's rows.

        The extra rows exist only so the embedding and output layer split evenly over
        tensor-parallel ranks; log-probs never give them probability mass
        (see :func:`megatron_rpo.logprobs.token_logprobs`).
        """
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple


@dataclass
class ParallelConfig(_Section):
    """How the model and the batch are split over ranks (Megatron's names and meanings)."""

    _section = "parallel"

    tensor_model_parallel_size: int = 1
    """Intra-layer model parallelism. Splits tensors across ranks."""
    pipeline_model_parallel_size: int = 1
    """Inter-layer model parallelism. Splits the layers into stages across ranks."""
    context_parallel_size: int = 1
    """Context parallelism (megatron's meaning): every sequence of a packed microbatch is cut into
    2 x CP chunks and CP rank r holds chunks r and 2 x CP - 1 - r; attention spans the group
    (transformer-engine's on GPU, an exact all-gather of keys and values on the local spec), and
    per-sequence log-probs are summed over it before the contrast matrix. Needs ``data.packing``.
    The world is TP x PP x CP x DP."""
    sequence_parallel: bool = False
    """Split layer norms and dropout along the sequence over the tensor-parallel ranks (TP > 1).
    Mixture-of-experts models need it whenever TP > 1 (megatron's rule)."""
    expert_model_parallel_size: int = 1
    """Expert parallelism: each rank holds num_moe_experts / EP experts of every MoE layer. The
    EP ranks are carved out of the data-parallel ranks (megatron's layout), so the world is still
    TP x PP x DP and DP (times TP / ETP) must be a multiple of EP; dense layers stay replicated."""
    expert_tensor_parallel_size: Optional[int] = None
    """Tensor parallelism inside each expert; None: tensor_model_parallel_size (megatron's default).
    1 keeps every expert whole on its rank (what large-EP recipes use)."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Interleaved pipeline: each pipeline rank holds this many model chunks of
    ``num_layers / (PP x VPP)`` layers (megatron's ``vp_stage``), which shrinks the pipeline bubble
    by about this factor for more point-to-point traffic. Needs PP > 1, and the microbatches of a
    step a multiple of PP (megatron's rule). None: one chunk per rank. Checkpoints load at any
    VPP split (or none)."""
    distributed_timeout_minutes: float = 10.0
    """Collective timeout: a dead rank makes the others fail after this long instead of hanging."""

    def validate(self) -> None:
        self._positive("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                       "distributed_timeout_minutes", "expert_model_parallel_size", "expert_tensor_parallel_size",
                       "virtual_pipeline_model_parallel_size")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and self.pipeline_model_parallel_size == 1:
            raise InputError(f"parallel.virtual_pipeline_model_parallel_size={vpp} needs "
                             "parallel.pipeline_model_parallel_size > 1 (it interleaves pipeline stages)")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise InputError(
                "parallel.sequence_parallel=True needs parallel.tensor_model_parallel_size > 1, "
                f"got {self.tensor_model_parallel_size}"
            )

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one copy of the model: TP x PP x CP."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    @property
    def sequence_multiple(self) -> int:
        """What every packed sequence is padded to a multiple of: 2 x CP chunks, each a multiple of
        TP under sequence parallelism (transformer-engine's ``thd`` layout); 1 without CP."""
        if self.context_parallel_size == 1:
            return 1
        return 2 * self.context_parallel_size * (self.tensor_model_parallel_size if self.sequence_parallel else 1)

    @property
    def expert_tensor_size(self) -> int:
        """Tensor parallelism inside each expert (``expert_tensor_parallel_size`` resolved)."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel replicas in a world of ``world_size`` ranks.

        Raises:
            ValueError: if ``world_size`` is not a multiple of TP x PP x CP.
        """
        if world_size <= 0 or world_size % self.model_parallel_size:
            raise InputError(
                f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size "
                f"({self.tensor_model_parallel_size}) x parallel.pipeline_model_parallel_size "
                f"({self.pipeline_model_parallel_size}) x parallel.context_parallel_size "
                f"({self.context_parallel_size})"
            )
        expert_ranks = self.expert_model_parallel_size * self.expert_tensor_size * self.pipeline_model_parallel_size
        if world_size % expert_ranks:
            raise InputError(
                f"world size {world_size} is not divisible by parallel.expert_model_parallel_size "
                f"({self.expert_model_parallel_size}) x parallel.expert_tensor_parallel_size "
                f"({self.expert_tensor_size}) x parallel.pipeline_model_parallel_size "
                f"({self.pipeline_model_parallel_size}): megatron lays the experts out over the same ranks as the "
                "dense layers"
            )
        return world_size // self.model_parallel_size


@dataclass
class LossConfig(_Section):
    """The preference objective (the formulas: docs/loss.md)."""

    _section = "loss"

    loss_type: Literal["rpo", "dpo", "ipo", "simpo", "simpo_rpo", "kto", "sft"] = "rpo"
    """rpo (the contrast matrix), dpo, ipo, simpo (reference-free), simpo_rpo (matrix over SimPO
    rewards), kto (unpaired items against a KL reference point), or sft (supervised warm-up:
    token-mean negative log-likelihood of the chosen responses)."""
    beta: float = 0.1
    """Inverse temperature of the rewards (paper: 0.1; SimPO uses about 2.0)."""
    weighting: Literal["embedding", "uniform", "diagonal"] = "embedding"
    """Contrast weights: prompt-embedding similarity, uniform 1/N, or diagonal emphasis (paired only)."""
    tau: float = 0.5
    """Temperature of the embedding-similarity softmax (paper: 0.5 paired, 0.75 unpaired)."""
    alpha: float = 0.8
    """Diagonal weight of ``weighting: diagonal``; the rest of a row shares 1 - alpha."""
    row_normalization: Literal["sum", "mean"] = "sum"
    """sum: each row of weights sums to 1 (the paper's text; uniform weights are 1/N). mean: rows
    average 1, so a larger matrix does not shrink the effective beta (uniform weights are 1, as in
    the paper's released code)."""
    diagonal_form: Literal["equations", "released"] = "equations"
    """Diagonal weighting: ``equations`` puts the weights inside the sigmoid (the paper's Eq. 13-14);
    ``released`` multiplies the per-cell losses by them, ``alpha l(beta L_ii) + (1 - alpha)
    mean_{j != i} l(beta L_ij)``, as the paper's released ``RPODiagonalTrainer`` does: the loss is
    not divided by the N columns, so near the start its gradient is about M times larger (2x at 2
    pairs, 64x at 64). Needs ``weighting: diagonal`` and ``row_normalization: sum``."""
    ipo_length_normalized: bool = False
    """IPO on per-token average log-ratios (divided by the response length), as TRL computes it;
    false uses the summed log-ratios, as the IPO paper and the RPO paper's code do."""
    gamma: float = 0.5
    """SimPO target reward margin (simpo, simpo_rpo)."""
    kto_desirable_weight: float = 1.0
    """KTO's lambda_D, the weight of a desirable (chosen) item's loss; the paper advises
    lambda_D x desirable items / (lambda_U x undesirable items) in [1, 4/3]."""
    kto_undesirable_weight: float = 1.0
    """KTO's lambda_U, the weight of an undesirable (rejected) item's loss."""
    contrast_scope: Literal["local", "data_parallel", "global_batch"] = "data_parallel"
    """Span of the matrix: each rank's microbatch, the microbatch over all data-parallel ranks,
    or the whole global batch (gradient caching, one extra forward pass)."""
    reference: Literal["precomputed", "online"] = "precomputed"
    """Reference log-probs read from the dataset, or computed by a frozen copy of the model.
    Ignored by the reference-free simpo and simpo_rpo."""
    reference_checkpoint: Optional[str] = None
    """The converted checkpoint precomputed reference log-probs must come from (their manifest
    records it); None: ``train.load``, the model training starts from. Set it only when the
    reference is deliberately another model."""

    def validate(self) -> None:
        self._positive("beta", "tau", "kto_desirable_weight", "kto_undesirable_weight")
        if not 0.0 <= self.alpha <= 1.0:
            raise InputError(f"loss.alpha must be in [0, 1], got {self.alpha}")
        if self.diagonal_form == "released" and (self.weighting != "diagonal" or self.row_normalization != "sum"):
            raise InputError(f"loss.diagonal_form='released' is a form of the diagonal weighting with rows summing "
                             f"to 1, but loss.weighting={self.weighting!r} and "
                             f"loss.row_normalization={self.row_normalization!r}")
        if self.ipo_length_normalized and self.loss_type != "ipo":
            raise InputError(f"loss.ipo_length_normalized=True only changes loss.loss_type='ipo', "
                             f"got {self.loss_type!r}")

    @property
    def facts(self):
        """This loss type's facts (:data:`megatron_rpo.config.losses.LOSSES`)."""
        return LOSSES[self.loss_type]

    @property
    def uses_reference(self) -> bool:
        """Whether the loss needs reference log-probs."""
        return self.facts.reference

    @property
    def uses_matrix(self) -> bool:
        """Whether the loss contrasts every chosen with every rejected sequence."""
        return self.facts.matrix

    @property
    def uses_mismatched(self) -> bool:
        """Whether every microbatch also scores mismatched (prompt, completion) pairs: KTO's
        reference point, from each item's prompt with the previous item's completion."""
        return self.facts.mismatched


@dataclass
class DataConfig(_Section):
    """Preprocessed datasets (tools/preprocess_preference_data.py and friends)."""

    _section = "data"

    train_data_prefix: Optional[str] = None
    """Prefix of the tokenised training set (``PREFIX.bin``/``.idx`` and its manifest)."""
    valid_data_prefix: Optional[str] = None
    """Prefix of the held-out set used for evaluation; None disables evaluation."""
    paired: bool = True
    """True: batches hold (chosen, rejected) pairs of one prompt. False: unpaired items, each one
    prompt with one labelled response (paired data is split and shuffled, as in the paper)."""
    max_prompt_length: Optional[int] = None
    """The prompt limit the datasets were preprocessed with (prompts are cut there, keeping their
    end: ``--max-prompt-length``, paper 256). None takes the training set's; a value given must match
    it. The saved ``config.yaml`` records the value that ran."""
    max_length: int = 512
    """Longest prompt + response in tokens; longer responses are cut."""
    seed: int = 1234
    """Seed of the shuffling samplers."""
    packing: bool = True
    """Pack each microbatch's sequences back to back into one row (megatron's ``thd`` layout:
    attention stays inside each sequence, positions restart at each one) instead of padding
    every sequence to ``max_length``. Same sequences, same contrast matrix, no compute spent on
    padding; false pads as before."""
    pack_multiple: int = 64
    """A packed row is padded up to a multiple of this many tokens (the longest of the step's
    microbatches: pipeline stages exchange one shape per step). With sequence parallelism it
    must be a multiple of the tensor-parallel size."""

    def validate(self) -> None:
        self._positive("max_prompt_length", "max_length", "pack_multiple")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise InputError(
                f"data.max_prompt_length ({self.max_prompt_length}) must be less than "
                f"data.max_length ({self.max_length}) to leave room for the response"
            )


@dataclass
class OptimizerConfig(_Section):
    """Optimizer and learning-rate schedule."""

    _section = "optimizer"

    optimizer: Literal["rmsprop", "adam"] = "rmsprop"
    """rmsprop (the paper) or adam (AdamW-style decoupled weight decay)."""
    lr: float = 5e-7
    """Peak learning rate (paper: 5e-7)."""
    min_lr: float = 0.0
    """Learning rate at the end of a decaying schedule."""
    lr_warmup_iters: int = 0
    """Linear warmup steps from 0 to ``lr``."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Schedule after warmup."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam first-moment decay."""
    adam_beta2: float = 0.999
    """Adam second-moment decay."""
    adam_eps: float = 1e-8
    """Adam denominator epsilon (also RMSprop's)."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""
    bf16: bool = True
    """bf16 mixed precision on GPU (fp32 master weights); CPU always runs fp32."""

    def validate(self) -> None:
        self._positive("lr")
        self._positive("min_lr", "lr_warmup_iters", "weight_decay", "clip_grad", allow_zero=True)
        if self.min_lr > self.lr:
            raise InputError(f"optimizer.min_lr ({self.min_lr}) exceeds optimizer.lr ({self.lr})")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise InputError(f"optimizer.{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass
class TrainConfig(_Section):
    """The training loop."""

    _section = "train"

    micro_batch_size: int = 1
    """Pairs (paired) or items (unpaired) per data-parallel rank per forward pass."""
    global_batch_size: int = 64
    """Pairs or items per optimizer step over all ranks (paper: 64)."""
    train_iters: Optional[int] = None
    """Optimizer steps; None means one epoch over the training set; 0 only evaluates the loaded model."""
    log_interval: int = 1
    """Steps between log lines."""
    exit_interval: Optional[int] = None
    """Stop (after saving a checkpoint) once the step count is a multiple of this; running the same
    command again resumes. For jobs with a time limit, and for testing resumption."""
    eval_interval: Optional[int] = None
    """Steps between evaluations on ``data.valid_data_prefix``; None evaluates only at the end."""
    eval_iters: Optional[int] = None
    """Batches per evaluation; None means the whole held-out set."""
    save: Optional[str] = None
    """Directory for checkpoints; None saves nothing."""
    save_interval: Optional[int] = None
    """Steps between checkpoints (one is always written at the end when ``save`` is set)."""
    keep_last: int = 2
    """Checkpoints kept in ``save``; older ones are deleted."""
    export: bool = True
    """At the end, also write the final weights as a converted checkpoint in ``<save>/export``
    (what tools/convert_megatron_to_hf.py reads and ``train.load`` accepts)."""
    load: Optional[str] = None
    """Converted checkpoint to start from (tools/convert_hf_to_megatron.py, or another run's
    ``<save>/export``). A run whose ``save`` directory already holds a checkpoint resumes from it."""
    tensorboard_dir: Optional[str] = None
    """TensorBoard event directory; None uses ``<save>/tensorboard`` when ``save`` is set."""
    wandb_project: Optional[str] = None
    """Also log to Weights & Biases under this project (rank 0; ``pip install 'megatron_rpo[wandb]'``):
    the same scalars as TensorBoard and the resolved config. A resumed run continues the same
    W&B run (its id is kept in ``<save>/wandb_run_id``). None: no W&B."""
    wandb_entity: Optional[str] = None
    """W&B entity (user or team); None: W&B's default."""
    wandb_run_name: Optional[str] = None
    """W&B run name; None: the save directory's name."""
    wandb_mode: Literal["online", "offline"] = "online"
    """offline writes the run under ``<save>/wandb`` for ``wandb sync`` later (no network needed)."""
    seed: int = 1234
    """Seed of model initialisation and dropout."""
    peak_tflops: Optional[float] = None
    """Peak dense bf16 TFLOP/s of one GPU, for the MFU on the log line; None looks the GPU up by name
    (H100, H200, A100, ...). Without a GPU only TFLOP/s is shown."""
    allow_config_change: bool = False
    """On resume, apply settings that differ from the ones the checkpoint was trained with
    (each change is printed; the learning rate and optimizer settings take effect too) instead of
    refusing them. Settings that only affect logging, evaluation and saving may always change."""
    stop_signal: Literal["SIGTERM", "SIGUSR1", "SIGUSR2"] = "SIGTERM"
    """The signal that stops a run cleanly (as SIGINT also does): every rank finishes its step,
    a checkpoint is saved (with ``save``) and the job exits with code 75 so a scheduler can
    requeue it. Slurm and Kubernetes send SIGTERM before they kill."""

    def validate(self) -> None:
        self._positive("train_iters", allow_zero=True)
        self._positive("micro_batch_size", "global_batch_size", "log_interval", "exit_interval", "eval_interval",
                       "eval_iters", "save_interval", "keep_last", "peak_tflops")
        if self.global_batch_size % self.micro_batch_size:
            raise InputError(
                f"train.global_batch_size ({self.global_batch_size}) is not divisible by "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
"""The linears an adapter can go on (megatron's names): attention's fused q/k/v and its output, the
MLP's fused gate/up and its down projection (in a mixture-of-experts model every expert's)."""


@dataclass
class LoRAConfig(_Section):
    """Low-rank adapters (LoRA): train ``(alpha / rank) B A`` beside each target linear, the model frozen."""

    _section = "lora"

    rank: Optional[int] = None
    """The adapters' rank; None trains every weight of the model (full fine-tuning)."""
    alpha: float = 32.0
    """The adapters' output is scaled by ``alpha / rank`` (PEFT's ``lora_alpha``)."""
    dropout: float = 0.0
    """Dropout on an adapter's input (PEFT's ``lora_dropout``); off in evaluation and in the reference."""
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """The linears that get adapters, by megatron's names (see :data:`LORA_TARGETS`). In a
    mixture-of-experts model ``linear_fc1`` and ``linear_fc2`` are every expert's (without dropout);
    its dense MLP layers, if any, are not adapted."""

    def validate(self) -> None:
        self._positive("rank", "alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise InputError(f"lora.targets {self.targets} must name at least one of {list(LORA_TARGETS)}"
                             + (f"; {unknown} is not one" if unknown else ""))

    @property
    def enabled(self) -> bool:
        return self.rank is not None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class Config:
    """A whole run: one field per section, each a dataclass above."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How it is split over ranks."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The preference objective."""
    data: DataConfig = field(default_factory=DataConfig)
    """The datasets."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Low-rank adapters; off by default (every weight trains)."""
    explicit: Optional[frozenset] = field(default=None, compare=False, repr=False)
    """The ``section.key`` names a recipe or the command line set, as opposed to defaults
    (:func:`~megatron_rpo.config.loader.load_config` fills it in); None for a Config built in
    code, whose every value counts as set. Not a section: it is not written to ``config.yaml``, and
    ``dataclasses.replace`` keeps it."""

    def __post_init__(self) -> None:
        checks.check_config(self)

    def check_lengths(self) -> None:
        """``data.max_length`` within the model's positions (:func:`~megatron_rpo.config.checks.check_lengths`)."""
        checks.check_lengths(self)

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel size for ``world_size`` ranks, checking that the batch sizes fit it
        (:func:`~megatron_rpo.config.checks.check_batch`)."""
        return checks.check_batch(self, world_size)
