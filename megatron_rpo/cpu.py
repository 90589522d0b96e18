"""Run megatron-core on CPU (gloo) for development, CI and the quickstart.

megatron-core assumes CUDA in a handful of places: tensors created with
``device="cuda"`` or ``device=torch.cuda.current_device()``, ``tensor.cuda()``,
``torch.cuda.synchronize()``, pinned host memory, the CUDA RNG tracker, and an
assertion in gradient clipping that gradients are ``torch.cuda.FloatTensor``.
:func:`activate` answers each of them for a process without CUDA:

* a :class:`~torch.overrides.TorchFunctionMode` maps every CUDA device argument
  (``"cuda"``, ``"cuda:N"``, ``torch.device("cuda")``, a bare device index) to
  the CPU, drops ``pin_memory``, and turns ``Tensor.cuda()`` into a no-op; it is
  also entered around the backward of custom autograd Functions, which the
  autograd engine runs without the caller's modes;
* ``torch.cuda.current_device``/``synchronize``/``current_stream`` get CPU answers;
* megatron's RNG tracker keeps CPU generator states instead of CUDA ones, so
  ``get_cuda_rng_tracker().fork()`` still gives tensor-parallel ranks their own
  dropout stream;
* ``Tensor.type()`` reports a CPU tensor under its CUDA name ('torch.cuda.FloatTensor'),
  which is what megatron's optimizers and gradient clipping dispatch on.

This is the only module in the package that patches megatron or torch. It is a
no-op when CUDA is available, and :func:`megatron_rpo.parallel.connect` activates
it on CPU.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["activate", "is_active"]

_lock = threading.Lock()
_mode: "_CudaToCpuMode | None" = None
_CPU = torch.device("cpu")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    # A bare int is a CUDA ordinal in torch's device arguments.
    return isinstance(device, int) and not isinstance(device, bool)


def _map_device(device):
    return _CPU if _is_cuda_device(device) else device


class _CudaToCpuMode(TorchFunctionMode):
    """Send every tensor that megatron asks to put on CUDA to the CPU instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs) if kwargs else {}
        if func is torch.Tensor.cuda:
            # ``tensor.cuda(non_blocking=True)`` etc.: the tensor is already where it will live.
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # The optimizers and grad clipping dispatch on ``param.type()`` names such as
            # 'torch.cuda.FloatTensor'; a CPU tensor stands in for a CUDA one here.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if args[0].device.type == "cpu" else name
        if func is torch.Tensor.to or func is torch.Tensor.new_empty:
            args = tuple(_map_device(a) if isinstance(a, (str, torch.device)) else a for a in args)
        return func(*args, **kwargs)


class _CpuRNGStatesTrackerMixin:
    """``CudaRNGStatesTracker.add`` seeded CUDA generators; on CPU seed the CPU one."""

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cpu rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    # fork()/the checkpointing code read and write "CUDA" RNG states through these two
    # module-level functions; pointing them at the CPU generator keeps fork() meaningful.
    mrandom._get_cuda_rng_state = lambda device=None, clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )
    mrandom.CudaRNGStatesTracker = type(
        "CpuRNGStatesTracker", (_CpuRNGStatesTrackerMixin, mrandom.CudaRNGStatesTracker), {}
    )
    # A tracker created before activation would still hold CUDA semantics.
    mrandom.initialize_rng_tracker(force_reset=True)


def _patch_autograd_backward() -> None:
    # Torch-function modes are thread-local and the autograd engine does not carry them into
    # the backward of custom autograd Functions, where megatron's tensor-parallel layers also
    # allocate on "cuda". The engine calls ``BackwardCFunction.apply`` for every such backward.
    from torch.autograd.function import BackwardCFunction

    original = BackwardCFunction.apply

    def apply(self, *args):
        with _CudaToCpuMode():
            return original(self, *args)

    BackwardCFunction.apply = apply


def _patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: contextlib.nullcontext()


def activate() -> bool:
    """Make megatron-core usable on CPU; idempotent. Returns True if it is (now) active.

    Does nothing and returns False when CUDA is available.
    """
    global _mode
    if torch.cuda.is_available():
        return False
    with _lock:
        if _mode is None:
            _patch_torch_cuda()
            _patch_autograd_backward()
            _patch_megatron()
            _mode = _CudaToCpuMode()
            _mode.__enter__()
    return True


def is_active() -> bool:
    """Whether :func:`activate` has taken effect in this process."""
    return _mode is not None
