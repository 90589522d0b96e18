"""The device boundary: nothing reaches the model or the loss without crossing it.

On CPU the shim maps "cuda" to the CPU, so a batch that was never moved works anyway and a
missing move is invisible. Here every microbatch the data path builds is made of
:class:`HostTensor`: a tensor that refuses every computation, as a host tensor does when a CUDA
model meets it, and becomes a plain tensor only when ``.to(device)`` moves it, which is what
:func:`megatron_rpo.device.to_device` does. A path that feeds the model or the loss without the
boundary raises at its first use of the batch.
"""

from __future__ import annotations

import sys

import pytest
import torch

from tests.multiprocess import run_ranks
from tests.workspace import RECIPE, overrides

_SHAPE_QUERIES = {torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
                  torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.__len__,
                  torch.Tensor.is_pinned, torch.Tensor.is_floating_point}


class HostTensor(torch.Tensor):
    """A host tensor that has not crossed the device boundary."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            if func is torch.Tensor.to or func is torch.Tensor.pin_memory:
                # Crossing the boundary: what comes out is an ordinary tensor.
                return func(*args, **kwargs).as_subclass(torch.Tensor)
            if func in _SHAPE_QUERIES:
                return func(*args, **kwargs)
        raise RuntimeError(f"{getattr(func, '__name__', func)} on a host tensor that never crossed the device "
                           "boundary (megatron_rpo.device.to_device)")


def _poisoned(collate):
    def poisoned_collate(*args, **kwargs):
        return {k: v.as_subclass(HostTensor) if isinstance(v, torch.Tensor) else v
                for k, v in collate(*args, **kwargs).items()}
    return poisoned_collate


def _poison_the_data_path() -> None:
    """Every module holding ``collate`` now hands out host tensors."""
    from megatron_rpo.data import dataset

    # Importing the consumers first, so that each has its own reference to replace.
    import megatron_rpo.training.reference  # noqa: F401
    import megatron_rpo.training.trainer  # noqa: F401

    original = dataset.collate
    for module in list(sys.modules.values()):
        if module is not None and getattr(module, "collate", None) is original:
            module.collate = _poisoned(original)


def test_host_tensor_refuses_computation_until_moved():
    host = torch.arange(6.0).as_subclass(HostTensor)
    assert host.shape == (6,)
    with pytest.raises(RuntimeError, match="never crossed the device boundary"):
        host + 1
    from megatron_rpo.device import to_device

    moved = to_device({"x": host, "n": 3})
    assert type(moved["x"]) is torch.Tensor and moved["n"] == 3
    assert (moved["x"] + 1).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def _train_through_host_batches(argv: list[str]) -> list[float]:
    from megatron.core import parallel_state

    from megatron_rpo.config import load_config
    from megatron_rpo.training.trainer import Trainer

    _poison_the_data_path()
    trainer = Trainer(load_config(RECIPE, argv))
    try:
        trainer.train()  # training steps, then the evaluation at the end
    finally:
        trainer.scalars.close()
        parallel_state.destroy_model_parallel()
    return [h["loss"] for h in trainer.history]


@pytest.mark.parametrize("extra", [
    # online reference, the matrix over both ranks, evaluation
    [],
    # gradient caching: the forward-only pass, the global loss, the surrogate pass
    ["loss.contrast_scope=global_batch", "loss.weighting=uniform"],
    ["loss.loss_type=dpo", "loss.weighting=diagonal"],
], ids=["rpo-online", "global-batch", "dpo"])
def test_training_and_evaluation_cross_the_boundary(workspace, tmp_path, extra):
    argv = overrides(workspace, tmp_path / "run", "train.train_iters=2", "train.export=false", *extra)
    losses = run_ranks(_train_through_host_batches, 2, argv, timeout=300)[0]
    assert len(losses) == 2 and all(loss == loss for loss in losses)


def _reference_tool_through_host_batches(ckpt: str, prefix: str):
    from megatron_rpo import parallel
    from megatron_rpo.config import Config, DataConfig
    from megatron_rpo.models import model_provider
    from megatron_rpo.training.checkpointing import checkpoint_model_config, load_weights
    from megatron_rpo.training.reference import compute_reference_logps

    _poison_the_data_path()
    config = Config(model=checkpoint_model_config(ckpt), data=DataConfig(max_prompt_length=96, max_length=160))
    parallel.initialize(config.parallel)
    model = model_provider(config)
    load_weights(model, ckpt)
    return compute_reference_logps(model, prefix, micro_batch_size=16,
                                   progress=False)


def test_reference_tool_crosses_the_boundary(workspace, tmp_path):
    import shutil

    root = workspace["root"]
    for path in root.glob("valid.*"):
        shutil.copy(path, tmp_path / path.name)
    (logps,) = run_ranks(_reference_tool_through_host_batches, 1, str(root / "ckpt"), str(tmp_path / "valid"))
    assert logps.shape == (64,) and (logps < 0).all()
