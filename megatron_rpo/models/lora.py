"""Low-rank adapters on megatron's tensor-parallel linears, exact under TP and sequence parallelism.

``y = W x + (alpha / rank) B A x``, with the base weight ``W`` frozen and only ``A`` (rank x in) and
``B`` (out x rank) trained (B starts at zero, so an adapted model starts as its base). On megatron's
local layer spec (the CPU and no-transformer-engine path):

* **column-parallel** layers (``linear_qkv``, ``linear_fc1``), whose output is split over TP: ``A`` is
  whole on every rank and ``B`` holds the rank's output rows, sliced as the base weight's rows (same
  partition stride, so ``B A`` has the base weight's layout). ``A x`` goes through
  ``copy_to_tensor_model_parallel_region``, whose backward sums the ranks' parts of its gradient.
  Under SP ``A`` reads this rank's tokens and the rank-``r`` result is gathered over the sequence
  (its backward a reduce-scatter), so no rank gathers the ``h``-wide input for the adapter; ``A``
  is then marked ``sequence_parallel`` (its gradient comes from the rank's tokens, and
  ``finalize_model_grads`` sums it over TP);
* **row-parallel** layers (``linear_proj``, ``linear_fc2``), whose input is split over TP: ``A`` holds
  the rank's input columns, ``A x`` is summed over TP (under SP reduce-scattered to the rank's part of
  the sequence, as the base's output is), ``B`` is whole; under SP ``B`` is marked
  ``sequence_parallel``;
* **experts** (every expert's ``linear_fc1`` and ``linear_fc2`` in a mixture-of-experts layer), split
  over the expert-tensor-parallel (ETP) group, whose token dispatcher does what the layers do not:
  every ETP rank gets the same tokens and the dispatcher sums the input's (partial) gradient over
  ETP, and sums ``linear_fc2``'s partial outputs. So an expert's adapter communicates nothing but
  the gradient of its ETP-whole side: ``A`` of ``linear_fc1`` (each rank's gradient comes from its
  rows of ``B``) and ``B`` of ``linear_fc2`` (from its part of ``A x``), summed over ETP through
  ``copy_to_tensor_model_parallel_region`` on the parameter; the input's gradient stays partial,
  as the base's. No dropout (PEFT's expert adapters take none: :mod:`megatron_rpo.config.checks`).

Every layout draws the same adapters: ``A`` from the layer's global name (whole, then the rank's part
kept), ``B`` zero. The base weights are frozen, so megatron's DDP and optimizer hold the adapters
only (an expert's in the experts' buffers, reduced over expert data parallelism, as its weights). A
training checkpoint holds them by their TP-split layout (``B`` of ``linear_fc1`` in megatron's
``[gate; up]`` order, as its weight), so a run resumes at another TP or EP; the merged export adds
``(alpha / rank) B A`` to each adapted weight (:func:`merged_delta`, read by
:mod:`megatron_rpo.convert.save` through the weight's ``adapter_delta``). Not adapted yet: the dense
MLP layers of a mixture-of-experts model (see :func:`apply_lora`) and transformer-engine's layers
(the GPU spec).
"""

from __future__ import annotations

import contextlib
import math
import types
import zlib
from functools import partial

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_rpo.config import LoRAConfig
from megatron_rpo.convert.layout import is_expert
from megatron_rpo.convert.load import canonical_name, is_adapter
from megatron_rpo.errors import InputError

__all__ = ["apply_lora", "adapters_disabled", "merged_delta"]


def _mark(p: torch.nn.Parameter, split: bool, dim: int = 0, stride: int = 1, sequence_parallel: bool = False):
    p.tensor_model_parallel = split
    p.partition_dim = dim
    p.partition_stride = stride
    if sequence_parallel:
        p.sequence_parallel = True


def _dropout(self, x):
    """The adapter's input dropout; under SP each rank holds other tokens, so the masks come from
    megatron's tensor-parallel random stream (different per rank), as for SP's hidden dropout."""
    if not self.training or isinstance(self._lora_dropout, torch.nn.Identity):
        return x
    if self.sequence_parallel:
        with get_cuda_rng_tracker().fork():
            return self._lora_dropout(x)
    return self._lora_dropout(x)


def _column_forward(self, input_, *args, **kwargs):
    output, bias = self._lora_base_forward(input_, *args, **kwargs)
    if self._lora_enabled and self.is_expert:  # the ETP ranks' gradients of A summed, the input's left partial
        h = torch.nn.functional.linear(input_, copy_to_tensor_model_parallel_region(self.lora_A, group=self.tp_group))
        output = output + self._lora_scale * torch.nn.functional.linear(h, self.lora_B)
    elif self._lora_enabled:
        h = torch.nn.functional.linear(_dropout(self, input_), self.lora_A)
        if self.sequence_parallel:
            # A on this rank's tokens, then [s, b, rank] gathered: its backward sums the ranks'
            # gradients and keeps this rank's tokens (a reduce-scatter)
            h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True, group=self.tp_group)
        else:
            h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)  # backward: the ranks' gradients summed
        output = output + self._lora_scale * torch.nn.functional.linear(h, self.lora_B)
    return output, bias


def _row_forward(self, input_, *args, **kwargs):
    output, bias = self._lora_base_forward(input_, *args, **kwargs)
    if self._lora_enabled and self.is_expert:  # summed over ETP with the base's output by the dispatcher
        h = torch.nn.functional.linear(input_, self.lora_A)
        output = output + self._lora_scale * torch.nn.functional.linear(
            h, copy_to_tensor_model_parallel_region(self.lora_B, group=self.tp_group))  # B's gradients summed
    elif self._lora_enabled:
        h = torch.nn.functional.linear(_dropout(self, input_), self.lora_A)
        if self.sequence_parallel:  # summed over TP and cut to this rank's tokens, as the base's output
            h = reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
        else:
            h = reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
        output = output + self._lora_scale * torch.nn.functional.linear(h, self.lora_B)
    return output, bias


def _sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
    """The layer's sharded state with its adapters split over TP as they are held (see the module
    docstring); ``B`` of a ``[gate; up]`` linear in megatron's order of its weight."""
    column = isinstance(self, ColumnParallelLinear)
    axes = {"weight": 0, "bias": 0, "lora_B": 0} if column else {"weight": 1, "lora_A": 1}
    out = make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, axes,
                                              sharded_offsets, tp_group=self.tp_group,
                                              dp_cp_group=(metadata or {}).get("dp_cp_group"))
    if column and getattr(self.weight, "partition_stride", 1) == 2:
        key = f"{prefix}lora_B"
        out[key] = apply_swiglu_sharded_factory(out[key], sharded_offsets,
                                                (metadata or {}).get("singleton_local_shards", False))
    return out


def _adapt(layer, name: str, settings: LoRAConfig) -> None:
    weight = layer.weight
    out_local, in_local = weight.shape
    tp, rank = layer.tp_group.size(), layer.tp_group.rank()  # an expert's: its ETP group
    column = isinstance(layer, ColumnParallelLinear)
    a = torch.nn.Parameter(torch.empty(settings.rank, in_local, dtype=weight.dtype, device=weight.device))
    b = torch.nn.Parameter(torch.zeros(out_local, settings.rank, dtype=weight.dtype, device=weight.device))
    stride = getattr(weight, "partition_stride", 1)
    sp = bool(layer.sequence_parallel) and not layer.is_expert
    # megatron's gradient norm counts a parameter not marked split on the first TP rank only; an
    # expert's adapters at ETP 1 are this rank's alone (config.checks allows ETP 1 or TP for them)
    alone = layer.is_expert and tp == 1
    if column:  # A whole on every rank (under SP its gradient from this rank's tokens), B this rank's output rows
        _mark(a, split=alone, sequence_parallel=sp)
        _mark(b, split=tp > 1 or alone, dim=0, stride=stride)
    else:  # A this rank's input columns, B whole
        _mark(a, split=tp > 1 or alone, dim=1, stride=stride)
        _mark(b, split=alone, sequence_parallel=sp)
    for p in (a, b):  # an expert's adapters reduced over expert data parallelism, as its weight (megatron's DDP)
        p.allreduce = getattr(weight, "allreduce", True)
    # The whole A drawn from the layer's name, the rank's part kept: the same adapter at any TP.
    parts = 1 if column else tp
    a_full = torch.empty(settings.rank, in_local * parts, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(a_full, a=math.sqrt(5),
                                   generator=torch.Generator(device="cpu").manual_seed(zlib.crc32(name.encode())))
    with torch.no_grad():
        a.copy_(torch.chunk(a_full, parts, dim=1)[0 if column else rank])
    layer._lora_base_forward = types.MethodType(type(layer).forward, layer)
    layer.forward = types.MethodType(_column_forward if column else _row_forward, layer)
    layer.lora_A, layer.lora_B = a, b
    layer._lora_scale = settings.scale
    layer._lora_enabled = True
    layer._lora_dropout = torch.nn.Dropout(settings.dropout) if settings.dropout else torch.nn.Identity()
    layer.sharded_state_dict = types.MethodType(_sharded_state_dict, layer)
    weight.adapter_delta = partial(merged_delta, layer)  # what the merged export adds (convert/save.py)


def apply_lora(model: torch.nn.Module, settings: LoRAConfig) -> list[str]:
    """Put adapters on every ``settings.targets`` linear of ``model`` (this rank's chunk, megatron's
    local spec; in a mixture-of-experts model ``linear_fc1``/``linear_fc2`` are every expert's, and a
    dense MLP layer's are not adapted) and freeze everything else; returns the adapted layers' global
    names (the same adapters at any TP, PP, VPP and EP: ``A`` is drawn from that name).

    Raises:
        InputError: a target that is not a megatron tensor-parallel linear here (transformer-engine's
            layers are not adaptable yet).
    """
    adapted = []
    for local, module in model.named_modules():
        if local.rsplit(".", 1)[-1] not in settings.targets:
            continue
        name = canonical_name(model, f"{local}.weight").removesuffix(".weight")
        if ".mlp." in name and model.config.num_moe_experts and not is_expert(name):
            # A dense MLP layer of a mixture-of-experts model (moe_layer_freq) is not adapted: PEFT on
            # transformers 5 reads its gate/up/down names as the fused experts' and could not load it.
            continue
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            raise InputError(f"{name} is a {type(module).__name__}; adapters go on megatron's local layer spec's "
                             "ColumnParallelLinear and RowParallelLinear only (transformer-engine layers come later)")
        _adapt(module, name, settings)
        adapted.append(name)
    if not adapted and len(getattr(getattr(model, "decoder", None), "layers", [])):
        raise InputError(f"lora.targets {list(settings.targets)} adapt no linear of this model's layers (a "
                         "mixture-of-experts model's dense MLP layers are not adapted): add linear_qkv or linear_proj")
    for pname, p in model.named_parameters():
        p.requires_grad_(is_adapter(pname))
    if getattr(model, "pre_process", False):
        # With the embedding frozen its output needs no gradient, and a layer recomputed in the
        # backward (model.recompute_granularity: full) whose input needs none passes none to the
        # adapters inside it: the embedding's output asks for one.
        model.embedding.register_forward_hook(_input_needs_grad)
    return adapted


def _input_needs_grad(module, args, output):
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_(True)


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run ``model`` (a module or megatron's list of chunks) as its base inside this block: the frozen
    reference, without a second copy (a model without adapters runs as it is)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    layers = [m for chunk in chunks for m in chunk.modules() if hasattr(m, "_lora_enabled")]
    before = [m._lora_enabled for m in layers]
    for m in layers:
        m._lora_enabled = False
    try:
        yield model
    finally:
        for m, state in zip(layers, before):
            m._lora_enabled = state


def merged_delta(layer) -> torch.Tensor:
    """``(alpha / rank) B A`` for this rank's slice of ``layer.weight``: what a merge adds to it."""
    return layer._lora_scale * layer.lora_B @ layer.lora_A
