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
  which is what megatron's optimizers and gradient clipping dispatch on;
* mixture of experts: the router's gating matmul asks for transformer-engine's GEMM by a name
  that does not exist without it (it is set to None, which selects torch's); the all-to-all
  token dispatcher copies its split sizes to the host on a side CUDA stream (on CPU they are
  turned into host lists directly, no stream); and gloo cannot all-gather or reduce-scatter
  pieces of different lengths, which megatron's uneven first-dimension gather and
  reduce-scatter (expert tensor parallelism under the all-to-all dispatcher) ask of it: they are
  done by padding to the longest piece, and by an all-reduce and a slice.

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


def _patch_moe() -> None:
    import numpy as np
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    def _host_splits(self, point, tokens_per_expert=None):
        # megatron moves these to the host at its "dtoh point" on a side stream and synchronises
        # later; on CPU they are host tensors already: give the all-to-all plain sizes.
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            for name in ("input_splits", "output_splits", "output_splits_tp"):
                value = getattr(self, name, None)
                if torch.is_tensor(value):
                    setattr(self, name, value.numpy())
        return tokens_per_expert

    token_dispatcher.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = _host_splits
    token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = contextlib.nullcontext()

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def _gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in np.asarray(output_split_sizes).tolist()]
        longest = max(sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        pieces = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(pieces, padded.contiguous(), group=group)
        return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)], dim=0)

    def _reduce_scatter_uneven(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(n) for n in np.asarray(input_split_sizes).tolist()]
        total = input_.clone()
        torch.distributed.all_reduce(total, group=group)
        start = sum(sizes[: group.rank()])
        return total[start: start + sizes[group.rank()]].contiguous()

    mappings._gather_along_first_dim = _gather_uneven
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_uneven


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
            _patch_moe()
            _mode = _CudaToCpuMode()
            _mode.__enter__()
    return True


def is_active() -> bool:
    """Whether :func:`activate` has taken effect in this process."""
    return _mode is not None
