"""The checks across sections of a :class:`~megatron_rpo.config.sections.Config`, each a named
function; :func:`check_config` runs them in order when a Config is built (the first failure is
the one reported). Each raises ``ValueError`` naming the settings and their values."""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_rpo.config.losses import LOSSES
from megatron_rpo.errors import InputError

if TYPE_CHECKING:
    from megatron_rpo.config.sections import Config

__all__ = ["check_config", "check_loss_vs_data", "check_layout", "check_experts", "check_context_parallel",
           "check_recompute", "check_lora", "check_lengths", "check_batch"]


def check_config(c: Config) -> None:
    """Every check that needs the whole config and nothing else (no world size, no checkpoint)."""
    check_loss_vs_data(c)
    check_layout(c)
    check_experts(c)
    check_context_parallel(c)
    check_recompute(c)
    check_lora(c)


def check_loss_vs_data(c: Config) -> None:
    """The loss type's needs (:data:`~megatron_rpo.config.losses.LOSSES`) against the data, the
    weighting, the reference and the contrast scope."""
    loss, facts = c.loss, c.loss.facts
    if loss.weighting == "diagonal" and facts.matrix and not c.data.paired:
        raise InputError(
            "loss.weighting='diagonal' needs paired data (the diagonal is each prompt's own pair), "
            "but data.paired=False"
        )
    if facts.data == "paired" and not c.data.paired:
        either = " or ".join(name for name, f in LOSSES.items() if f.matrix and f.data == "either")
        raise InputError(
            f"loss.loss_type={loss.loss_type!r} contrasts each prompt's own pair and needs "
            f"data.paired=True; use {either} for unpaired data"
        )
    if facts.data == "unpaired" and c.data.paired:
        raise InputError(
            f"loss.loss_type={loss.loss_type!r} trains on items, desirable or not: set data.paired=false (a paired "
            "dataset is then split into items, its chosen desirable and its rejected undesirable)"
        )
    if facts.mismatched and loss.reference == "precomputed":
        raise InputError(
            f"loss.loss_type={loss.loss_type!r} needs loss.reference='online': its reference point scores each "
            "microbatch's mismatched (prompt, completion) pairs, which a precomputed reference file does not hold"
        )
    if loss.contrast_scope == "global_batch" and not facts.matrix:
        matrix = ", ".join(name for name, f in LOSSES.items() if f.matrix)
        raise InputError(
            f"loss.contrast_scope='global_batch' only changes matrix losses ({matrix}), "
            f"got loss.loss_type={loss.loss_type!r}"
        )


def check_layout(c: Config) -> None:
    """Tensor and pipeline parallelism against the model's heads and layers and the packed rows."""
    tp = c.parallel.tensor_model_parallel_size
    if c.data.packing and c.parallel.sequence_parallel and c.data.pack_multiple % tp:
        raise InputError(
            f"data.pack_multiple ({c.data.pack_multiple}) must be a multiple of "
            f"parallel.tensor_model_parallel_size ({tp}) with sequence parallelism (packed rows are split over it)"
        )
    if c.model.num_attention_heads % tp:
        raise InputError(
            f"model.num_attention_heads ({c.model.num_attention_heads}) is not divisible by "
            f"parallel.tensor_model_parallel_size ({tp})"
        )
    groups = c.model.num_query_groups or c.model.num_attention_heads
    if groups % tp:
        raise InputError(
            f"model.num_query_groups ({groups}) is not divisible by parallel.tensor_model_parallel_size ({tp})"
        )
    pp = c.parallel.pipeline_model_parallel_size
    if c.model.num_layers % pp:
        raise InputError(
            f"model.num_layers ({c.model.num_layers}) is not divisible by "
            f"parallel.pipeline_model_parallel_size ({pp})"
        )
    vpp = c.parallel.virtual_pipeline_model_parallel_size
    if vpp is not None and c.model.num_layers % (pp * vpp):
        raise InputError(f"model.num_layers ({c.model.num_layers}) is not divisible by "
                         f"parallel.pipeline_model_parallel_size ({pp}) x virtual_pipeline_model_parallel_size "
                         f"({vpp}): every model chunk holds the same number of layers")


def check_experts(c: Config) -> None:
    """megatron's rules for mixture-of-experts layouts, before any process group exists."""
    m, p = c.model, c.parallel
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_size
    if m.num_moe_experts is None:
        return  # a recipe's model is completed from the checkpoint; models.transformer_config checks again
    if m.num_moe_experts % ep:
        raise InputError(f"model.num_moe_experts ({m.num_moe_experts}) is not divisible by "
                         f"parallel.expert_model_parallel_size ({ep})")
    if p.tensor_model_parallel_size > 1 and not p.sequence_parallel:
        raise InputError(f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size} with a "
                         "mixture-of-experts model needs parallel.sequence_parallel=true (megatron's rule)")
    width = m.moe_ffn_hidden_size or m.ffn_hidden_size
    if width % etp:
        raise InputError(f"the experts' width ({width}, model.moe_ffn_hidden_size) is not divisible by "
                         f"parallel.expert_tensor_parallel_size ({etp})")


def check_lora(c: Config) -> None:
    """Adapters on a mixture-of-experts model's experts (``lora.targets`` with ``linear_fc1`` or
    ``linear_fc2``): without dropout (PEFT's adapters on experts take none, so an export could not be
    loaded), and split over ETP 1 or over the tensor-parallel ranks (megatron's gradient norm counts an
    unsplit parameter on the first tensor-parallel rank; :mod:`megatron_rpo.models.lora`)."""
    lora, p = c.lora, c.parallel
    if not (lora.enabled and c.model.num_moe_experts and {"linear_fc1", "linear_fc2"} & set(lora.targets)):
        return
    if lora.dropout:
        raise InputError(f"lora.dropout={lora.dropout} cannot go on the experts (lora.targets has linear_fc1 or "
                         "linear_fc2 and the model has experts): PEFT's expert adapters take no dropout, so the "
                         "exported adapter could not be loaded. Set lora.dropout=0, or leave the experts out of "
                         "lora.targets")
    if p.expert_tensor_size not in (1, p.tensor_model_parallel_size):
        raise InputError(f"parallel.expert_tensor_parallel_size={p.expert_tensor_size} with adapters on the experts "
                         f"must be 1 or parallel.tensor_model_parallel_size ({p.tensor_model_parallel_size})")


def check_context_parallel(c: Config) -> None:
    """Context parallelism cuts packed rows, whose sequences are padded to its chunks."""
    cp = c.parallel.context_parallel_size
    if cp > 1 and not c.data.packing:
        raise InputError(f"parallel.context_parallel_size={cp} cuts packed rows only: set data.packing=true "
                         "(padded rows are not cut)")
    if cp > 1 and c.data.pack_multiple % c.parallel.sequence_multiple:
        raise InputError(f"data.pack_multiple ({c.data.pack_multiple}) must be a multiple of "
                         f"{c.parallel.sequence_multiple} with context parallelism (2 x "
                         "parallel.context_parallel_size chunks per sequence, times TP with sequence parallelism)")


def check_recompute(c: Config) -> None:
    """Full recompute of at most the layers one pipeline stage holds."""
    if c.model.recompute_granularity == "full":
        pp = c.parallel.pipeline_model_parallel_size
        per_stage = c.model.num_layers // pp
        if c.model.recompute_num_layers > per_stage:
            raise InputError(f"model.recompute_num_layers ({c.model.recompute_num_layers}) exceeds the layers "
                             f"of one pipeline stage ({per_stage}: model.num_layers {c.model.num_layers} / "
                             f"parallel.pipeline_model_parallel_size {pp})")


def check_lengths(c: Config) -> None:
    """``data.max_length`` within the model's positions. Called once the model is the one that
    runs (a recipe's model comes from its checkpoint, whose positions the recipe need not say).

    Raises:
        ValueError: the sequences are longer than the model's positions.
    """
    if c.data.max_length > c.model.max_position_embeddings:
        raise InputError(
            f"data.max_length ({c.data.max_length}) exceeds "
            f"model.max_position_embeddings ({c.model.max_position_embeddings})"
        )


def check_batch(c: Config, world_size: int) -> int:
    """The data-parallel size for ``world_size`` ranks, checking that the batch sizes fit it.

    Raises:
        ValueError: world size not a multiple of TP x PP x CP, or a global batch that is
            not a multiple of micro batch x data-parallel size (and, interleaved, of PP microbatches).
    """
    dp = c.parallel.data_parallel_size(world_size)
    step = c.train.micro_batch_size * dp
    if c.train.global_batch_size % step:
        raise InputError(
            f"train.global_batch_size ({c.train.global_batch_size}) is not divisible by "
            f"train.micro_batch_size ({c.train.micro_batch_size}) x data-parallel size ({dp})"
        )
    pp = c.parallel.pipeline_model_parallel_size
    microbatches = c.train.global_batch_size // step
    if c.parallel.virtual_pipeline_model_parallel_size is not None and microbatches % pp:
        raise InputError(f"the interleaved pipeline (parallel.virtual_pipeline_model_parallel_size) runs a "
                         f"multiple of parallel.pipeline_model_parallel_size ({pp}) microbatches per step, and "
                         f"train.global_batch_size {c.train.global_batch_size} / (micro_batch_size "
                         f"{c.train.micro_batch_size} x data-parallel size {dp}) is {microbatches}")
    return dp
