"""Low-rank adapters on megatron's tensor-parallel linears, exact under TP and sequence parallelism.

``y = W x + (alpha / rank) B A x``, with the base weight ``W`` frozen and only ``A`` (rank x in) and
``B`` (out x rank) trained (B starts at zero, so an adapted model starts as its base). On megatron's
local layer spec (the CPU and no-transformer-engine path):

* **column-parallel** layers (``linear_qkv``, ``linear_fc1``), whose output is split over TP: ``A`` is
  whole on every rank and ``B`` holds the rank's output rows, sliced as the base weight's rows (same
  partition stride, so ``B A`` has the base weight's layout). The adapter reads the layer's whole
  input: gathered over the sequence under SP (its backward splits, since the adapter's input
  gradient is already whole on every rank), and ``A x`` goes through ``copy_to_tensor_model_parallel_region``,
  whose backward sums the ranks' parts of its gradient, so ``A``'s gradient is the whole one everywhere;
* **row-parallel** layers (``linear_proj``, ``linear_fc2``), whose input is split over TP: ``A`` holds
  the rank's input columns, ``A x`` is summed over TP, ``B`` is whole; under SP ``A x`` is cut to the
  rank's part of the sequence before ``B`` (as the base's output is), and ``B`` is marked
  ``sequence_parallel`` so that megatron's ``finalize_model_grads`` sums its per-part gradients over
  TP, as it does for norms.

This is the adapters' arithmetic; the config section, checkpoints, the reference with the adapters
switched off in training, the PEFT export and the transformer-engine layers come next (issue 35).
"""

from __future__ import annotations

import contextlib
import math
import types
import zlib
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)

from megatron_rpo.errors import InputError

__all__ = ["LoRASettings", "TARGETS", "apply_lora", "adapters_disabled", "merged_delta"]

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
"""The linears an adapter can go on (megatron's names; the experts' linears come with EP support)."""


@dataclass(frozen=True)
class LoRASettings:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise InputError(f"lora rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"lora dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown:
            raise InputError(f"lora targets {unknown} are not adaptable; choose from {list(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _mark(p: torch.nn.Parameter, split: bool, dim: int = 0, stride: int = 1, sequence_parallel: bool = False):
    p.tensor_model_parallel = split
    p.partition_dim = dim
    p.partition_stride = stride
    if sequence_parallel:
        p.sequence_parallel = True


def _column_forward(self, input_, *args, **kwargs):
    output, bias = self._lora_base_forward(input_, *args, **kwargs)
    if self._lora_enabled:
        x = input_
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        x = self._lora_dropout(x)
        h = copy_to_tensor_model_parallel_region(torch.nn.functional.linear(x, self.lora_A))
        output = output + self._lora_scale * torch.nn.functional.linear(h, self.lora_B)
    return output, bias


def _row_forward(self, input_, *args, **kwargs):
    output, bias = self._lora_base_forward(input_, *args, **kwargs)
    if self._lora_enabled:
        h = reduce_from_tensor_model_parallel_region(torch.nn.functional.linear(self._lora_dropout(input_),
                                                                                 self.lora_A))
        if self.sequence_parallel:
            h = scatter_to_sequence_parallel_region(h)  # this rank's part of the sequence, as the base's output
        output = output + self._lora_scale * torch.nn.functional.linear(h, self.lora_B)
    return output, bias


def _adapt(layer, name: str, settings: LoRASettings) -> None:
    weight = layer.weight
    out_local, in_local = weight.shape
    tp = parallel_state.get_tensor_model_parallel_world_size()
    column = isinstance(layer, ColumnParallelLinear)
    a = torch.nn.Parameter(torch.empty(settings.rank, in_local, dtype=weight.dtype, device=weight.device))
    b = torch.nn.Parameter(torch.zeros(out_local, settings.rank, dtype=weight.dtype, device=weight.device))
    stride = getattr(weight, "partition_stride", 1)
    if column:  # A whole on every rank, B this rank's output rows
        _mark(a, split=False)
        _mark(b, split=tp > 1, dim=0, stride=stride)
    else:  # A this rank's input columns, B whole
        _mark(a, split=tp > 1, dim=1, stride=stride)
        _mark(b, split=False, sequence_parallel=bool(layer.sequence_parallel))
    # The whole A drawn from the layer's name, the rank's part kept: the same adapter at any TP.
    parts = 1 if column else tp
    a_full = torch.empty(settings.rank, in_local * parts, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(a_full, a=math.sqrt(5),
                                   generator=torch.Generator(device="cpu").manual_seed(zlib.crc32(name.encode())))
    with torch.no_grad():
        a.copy_(torch.chunk(a_full, parts, dim=1)[0 if column else parallel_state.get_tensor_model_parallel_rank()])
    layer._lora_base_forward = types.MethodType(type(layer).forward, layer)
    layer.forward = types.MethodType(_column_forward if column else _row_forward, layer)
    layer.lora_A, layer.lora_B = a, b
    layer._lora_scale = settings.scale
    layer._lora_enabled = True
    layer._lora_dropout = torch.nn.Dropout(settings.dropout) if settings.dropout else torch.nn.Identity()


def apply_lora(model: torch.nn.Module, settings: LoRASettings) -> list[str]:
    """Put adapters on every ``settings.targets`` linear of ``model`` (megatron's local spec) and
    freeze everything else; returns the adapted layers' names.

    Raises:
        InputError: a target that is not a megatron tensor-parallel linear here (transformer-engine's
            layers are not adaptable yet).
    """
    adapted = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in settings.targets:
            continue
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            raise InputError(f"{name} is a {type(module).__name__}; adapters go on megatron's local layer spec's "
                             "ColumnParallelLinear and RowParallelLinear only (transformer-engine layers come later)")
        _adapt(module, name, settings)
        adapted.append(name)
    if not adapted:
        raise InputError(f"no layer of the model is one of the lora targets {list(settings.targets)}")
    for pname, p in model.named_parameters():
        p.requires_grad_(".lora_" in f".{pname.rsplit('.', 1)[-1]}")
    return adapted


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run ``model`` as its base inside this block: the frozen reference, without a second copy."""
    layers = [m for m in model.modules() if hasattr(m, "_lora_enabled")]
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
