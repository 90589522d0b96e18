"""Initialise and tear down torch.distributed and megatron's parallel state.

NCCL on GPU, gloo on CPU (where :mod:`megatron_rpo.cpu` is activated first). Under
``torchrun`` the rendezvous comes from the usual environment variables
(``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).
"""

from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron_rpo import cpu

__all__ = ["initialize", "destroy", "backend"]


def backend() -> str:
    """The torch.distributed backend for this machine: ``nccl`` with CUDA, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def initialize(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    *,
    seed: int = 1234,
    timeout_minutes: float = 10.0,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> None:
    """Start torch.distributed (if not started) and megatron's model-parallel groups.

    Args:
        tensor_model_parallel_size: ranks that split each layer's tensors.
        pipeline_model_parallel_size: ranks that split the layers into stages.
        context_parallel_size: ranks that split the sequence (transformer-engine only).
        seed: base seed; pipeline stage p uses ``seed + 100 * p`` (tensor-parallel ranks fork
            ``seed + 2718 + tp_rank`` inside megatron), data-parallel replicas share it.
        timeout_minutes: collective timeout; a rank that dies makes the others fail after it.
        init_method, rank, world_size: explicit rendezvous; default is torchrun's environment.

    Raises:
        ValueError: if the world size is not a multiple of TP x PP x CP.
    """
    from megatron.core import parallel_state, tensor_parallel

    if not torch.cuda.is_available():
        cpu.activate()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        kwargs = {}
        if init_method is not None:
            kwargs = dict(init_method=init_method, rank=rank, world_size=world_size)
        dist.init_process_group(backend(), timeout=timedelta(minutes=timeout_minutes), **kwargs)
    world = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by tensor_model_parallel_size "
            f"({tensor_model_parallel_size}) x pipeline_model_parallel_size "
            f"({pipeline_model_parallel_size}) x context_parallel_size ({context_parallel_size})"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        distributed_timeout_minutes=max(1, int(timeout_minutes)),
    )
    # As Megatron-LM does: every pipeline stage its own stream, data-parallel replicas the
    # same one (their initial weights must agree), tensor-parallel ranks forked inside megatron.
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def destroy() -> None:
    """Destroy megatron's parallel state and the default process group (if any)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
