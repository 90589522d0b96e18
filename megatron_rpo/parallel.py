"""Initialise and tear down torch.distributed and megatron's parallel state.

NCCL on GPU, gloo on CPU (where :mod:`megatron_rpo.cpu` is activated first). Under
``torchrun`` the rendezvous comes from its environment variables (``MASTER_ADDR``,
``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).
"""

from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron_rpo import cpu
from megatron_rpo.config import ParallelConfig

__all__ = ["backend", "connect", "initialize", "destroy"]


def backend() -> str:
    """The torch.distributed backend for this machine: ``nccl`` with CUDA, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def connect(
    *,
    timeout_minutes: float = 10.0,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> None:
    """Start torch.distributed if it is not started (and make megatron usable on CPU).

    Args:
        timeout_minutes: collective timeout; when a rank dies the others fail after it.
        init_method, rank, world_size: an explicit rendezvous (e.g. ``file://`` in tests);
            the default is torchrun's environment, or one process on its own when there is
            none (``RANK`` unset: ``python -m megatron_rpo.train`` without a launcher).
    """
    if not torch.cuda.is_available():
        cpu.activate()
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if init_method is None and "RANK" not in os.environ:
        init_method, rank, world_size = f"tcp://127.0.0.1:{_free_port()}", 0, 1
    rendezvous = {} if init_method is None else dict(init_method=init_method, rank=rank, world_size=world_size)
    dist.init_process_group(backend(), timeout=timedelta(minutes=timeout_minutes), **rendezvous)


def initialize(config: ParallelConfig | None = None, *, seed: int = 1234) -> None:
    """Connect (if needed) and build megatron's tensor/pipeline/context/data/expert-parallel groups.

    Args:
        config: the parallel layout; the default is one model copy per rank.
        seed: base seed. Pipeline stage p uses ``seed + 100 * p`` for Python, NumPy and torch;
            megatron forks ``seed + 2718 + tp_rank`` for tensor-parallel regions. Data-parallel
            replicas share the seed, so their initial weights agree.

    Raises:
        ValueError: if the world size is not a multiple of TP x PP x CP.
    """
    from megatron.core import parallel_state, tensor_parallel

    config = config or ParallelConfig()
    connect(timeout_minutes=config.distributed_timeout_minutes)
    config.data_parallel_size(dist.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=config.virtual_pipeline_model_parallel_size,
        context_parallel_size=config.context_parallel_size,
        expert_model_parallel_size=config.expert_model_parallel_size,
        expert_tensor_parallel_size=config.expert_tensor_size,
        distributed_timeout_minutes=max(1, round(config.distributed_timeout_minutes)),
    )
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def destroy() -> None:
    """Destroy megatron's parallel state and the default process group, if they exist."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
