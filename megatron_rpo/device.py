"""The device boundary: where a microbatch built on the host reaches the device the model is on.

The data path (:func:`megatron_rpo.data.dataset.collate`) builds microbatches on the host; the
model runs on this process's CUDA device under torchrun (``LOCAL_RANK``, set by
:func:`megatron_rpo.parallel.connect`) or on the CPU. :func:`to_device` is the one function that
moves a whole microbatch across, and :mod:`megatron_rpo.training.step` calls it at its two
entry points (``forward_backward`` and ``sequence_logps``), through which training, evaluation,
both passes of gradient caching, the reference log-prob tool and the benchmarks all reach the
model. Everything downstream derives its device from a tensor it was given.

On CPU the shim in :mod:`megatron_rpo.cpu` makes "cuda" mean the CPU, so a missing move would
be invisible; ``tests/unit/test_device.py`` catches one anyway with host tensors that refuse
every computation until they have crossed this boundary.
"""

from __future__ import annotations

import torch

__all__ = ["current_device", "to_device"]


def current_device() -> torch.device:
    """This process's compute device: the current CUDA device when CUDA exists, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(batch: dict, device: torch.device | str | None = None) -> dict:
    """A copy of ``batch`` with every tensor on ``device`` (default: :func:`current_device`).

    Host tensors bound for CUDA are pinned and copied without blocking, so the host can go on
    queueing kernels while the copy runs; tensors already on ``device`` are passed through.
    Values that are not tensors (e.g. packed-sequence boundaries, plain ints) are kept as they are.
    """
    device = current_device() if device is None else torch.device(device)
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            if device.type == "cuda" and value.device.type == "cpu" and not value.is_pinned():
                value = value.pin_memory()
            value = value.to(device, non_blocking=True)
        moved[key] = value
    return moved
