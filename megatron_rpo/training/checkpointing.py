"""Model weights in and out: converted checkpoints, and resumable training checkpoints.

Training checkpoints use megatron's ``dist_checkpointing`` (model, optimizer, scheduler, sampler
position and per-rank RNG state), so they reshard across parallel layouts::

    SAVE/iter_0000100/      one checkpoint (written as iter_0000100.tmp, renamed when complete)
    SAVE/latest             the name of the newest complete checkpoint, replaced atomically
    SAVE/export/            the final weights as a converted checkpoint (for Hugging Face export)

A crash during a save leaves a ``.tmp`` directory (every rank writes into it, so its name is the
step's, not :mod:`megatron_rpo.publish`'s per-process one; the next save of that step clears it)
and ``latest`` still naming the previous checkpoint. The files are megatron's ``torch_dist``
format, written synchronously by torch.distributed.checkpoint's own writer
(:class:`SyncTorchDistSaveStrategy`): megatron's writer starts a manager process and forks
workers, which hangs on CPU and is not allowed in daemonic processes.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)

from megatron_rpo.config import ModelConfig
from megatron_rpo.convert.files import ConvertedCheckpoint
from megatron_rpo.convert.load import is_adapter, load_converted
from megatron_rpo.errors import InputError
from megatron_rpo.publish import write_text
from megatron_rpo.training.optimizer import optimizer_parts
from megatron_rpo.versions import megatron_core_version, refuse_newer_checkpoint

__all__ = ["checkpoint_model_config", "load_weights", "latest_checkpoint", "save_training_checkpoint",
           "describe_layout", "read_training_state", "check_readable", "check_base", "mark_done",
           "load_training_checkpoint", "SyncTorchDistSaveStrategy"]

LATEST = "latest"
# How the distributed optimizer's state is laid out in a checkpoint. megatron's "dp_reshardable"
# stores each rank's flat gradient buckets, which change shape whenever the parameters a rank holds
# change (EP, VPP, TP, PP): a checkpoint in it resumes at another DP size only. "fully_reshardable"
# stores each parameter's state whole, gathered on data-parallel rank 0 when saving, and loads at
# any layout. Checkpoints record theirs; those that do not were written in "dp_reshardable".
OPTIMIZER_FORMAT = "fully_reshardable"
_LEGACY_OPTIMIZER_FORMAT = "dp_reshardable"


def checkpoint_model_config(path: str) -> ModelConfig:
    """The architecture a converted checkpoint (or a training run's export) was written for."""
    return ConvertedCheckpoint(path).model_config


def load_weights(model, path: str) -> None:
    """Load a converted checkpoint's weights into this rank's model (a module or megatron's list of
    chunks), at the model's TP/PP/VPP split."""
    for chunk in model if isinstance(model, list) else [model]:
        load_converted(chunk, path)


def latest_checkpoint(save_dir: str | None) -> str | None:
    """The newest complete training checkpoint under ``save_dir``, or None."""
    if not save_dir:
        return None
    pointer = os.path.join(save_dir, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(save_dir, name)
    if not os.path.isdir(path):
        raise InputError(f"{pointer} names {name}, which does not exist")
    return path


def _rng_object() -> ShardedObject:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    # one state per rank: the data-parallel place counts the context-parallel ranks in (as at CP 1)
    ranks = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
             parallel_state.get_data_parallel_rank(with_context_parallel=True))
    sizes = (parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_tensor_model_parallel_world_size(),
             parallel_state.get_data_parallel_world_size(with_context_parallel=True))
    return ShardedObject("rng_state", state, sizes, ranks, replica_id=0)


def _restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron's ``torch_dist`` checkpoint format, saved in-process (no forked writer processes)."""

    def __init__(self):
        super().__init__("torch_dist", 1, thread_count=1)

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint import save as dcp_save

        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict,
                                                                             self.keep_only_main_replica)
        dcp_save(
            mcore_to_pyt_state_dict(sharded_state_dict, False),
            storage_writer=FileSystemWriter(checkpoint_dir, thread_count=1),
            planner=MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                     flatten_state_dict=False),
        )


def _layout() -> list[int]:
    """TP, PP, DP (then EP and ETP when experts are split, CP when sequences are): the layout per-rank
    RNG states belong to."""
    layout = [parallel_state.get_tensor_model_parallel_world_size(),
              parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_data_parallel_world_size()]
    ep, etp = (parallel_state.get_expert_model_parallel_world_size(),
               parallel_state.get_expert_tensor_parallel_world_size())
    cp = parallel_state.get_context_parallel_world_size()
    return layout + ([ep, etp] if (ep, etp) != (1, layout[0]) else []) + ([cp] if cp > 1 else [])


def describe_layout(layout: list[int] | None) -> str:
    """A checkpoint's recorded layout (:func:`_layout`'s list) with its names: "TP 1 x PP 2 x DP 2"."""
    if not layout:
        return "an unrecorded layout"
    names = ["TP", "PP", "DP"] + (["EP", "ETP"] if len(layout) in (5, 6) else []) + (["CP"] if len(layout) in (4, 6)
                                                                                     else [])
    return " x ".join(f"{name} {size}" for name, size in zip(names, layout))


def _placeholder_optimizer_state(optimizer) -> None:
    """Give an optimizer that has not stepped yet the state tensors a checkpoint will fill.

    megatron's distributed optimizer over torch's Adam (no apex or transformer-engine: a pip
    install, or any CPU run) reads the step count out of the inner optimizer's per-parameter
    state while it builds the state dict it loads into, and asserts there is exactly one; before
    the first step there is none. Zero moments and a zero step, all overwritten by the load, are
    what megatron's own ``init_state_fn`` gives the non-distributed optimizer.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for chained in optimizer_parts(optimizer):
        inner = getattr(chained, "optimizer", None)
        if not isinstance(chained, DistributedOptimizer) or not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    # fused/capturable Adam keeps the step on the parameter's device
                    device = p.device if group.get("fused") or group.get("capturable") else "cpu"
                    inner.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=device),
                                      "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def _load_optimizer(optimizer, state_dict: dict, optimizer_format: str) -> None:
    """``optimizer.load_state_dict``, with the per-parameter state of a ``fully_reshardable``
    checkpoint loaded apart: megatron-core's loader copies the checkpoint's tensors into every key
    of each parameter's state, torch Adam's step included, which such a checkpoint does not hold
    (a KeyError wherever megatron falls back to torch's Adam: CPU, or a GPU without
    transformer-engine or apex). The steps are set aside meanwhile (:func:`_restore_step_counters`
    then sets them from the checkpoint)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = optimizer_parts(optimizer)
    states = [state_dict] if len(parts) == 1 else [v for _, v in sorted(state_dict.items())]
    apart = []
    if optimizer_format == "fully_reshardable":
        for opt, state in zip(parts, states):
            if isinstance(opt, DistributedOptimizer) and "param_state" in state:
                apart.append((opt, state.pop("param_state")))
                state.pop("param_state_sharding_type", None)
    optimizer.load_state_dict(state_dict)
    for opt, param_state in apart:
        steps = {p: state.pop("step") for p, state in opt.optimizer.state.items() if "step" in state}
        opt.load_parameter_state_from_fully_reshardable(param_state)
        for p, step in steps.items():
            opt.optimizer.state[p]["step"] = step


def _restore_step_counters(optimizer, loaded: dict) -> None:
    """Put the checkpoint's step count back into each parameter's state after a distributed-optimizer load.

    Without apex or transformer-engine the count lives twice: in the saved param groups, and in
    every parameter's torch Adam state, which megatron's per-bucket state copies over from the
    state it loads *into* (the placeholder's zero). The bias correction of every resumed step
    reads the latter. One tensor per parameter: torch's fused Adam advances each in place.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chained = optimizer_parts(optimizer)
    states = [loaded] if len(chained) == 1 else [v for _, v in sorted(loaded.items())]
    for opt, state_dict in zip(chained, states):
        if not isinstance(opt, DistributedOptimizer):
            continue
        steps = {g.get("step") for g in state_dict["optimizer"]["param_groups"]} - {None}
        if len(steps) != 1:
            continue
        step = float(steps.pop())
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = torch.tensor(step, dtype=torch.float32, device=state["step"].device)


def _adapted(module) -> bool:
    """Whether the model carries low-rank adapters (then only they train)."""
    chunks = module if isinstance(module, list) else [module]
    return any(is_adapter(name) for chunk in chunks for name, _ in chunk.named_parameters())


def _model_state(module) -> dict:
    """The model's sharded state dict; model chunks (the interleaved pipeline) nest one per chunk.
    The tensors are keyed by global layer number either way, so a checkpoint loads at any VPP split.
    With adapters, theirs only: the frozen base is the converted checkpoint ``train.load`` names."""
    chunks = module if isinstance(module, list) else [module]
    states = [chunk.sharded_state_dict() for chunk in chunks]
    if _adapted(chunks):
        states = [{key: value for key, value in state.items() if is_adapter(key)} for state in states]
    if len(chunks) == 1:
        return states[0]
    return {f"chunk{i}": state for i, state in enumerate(states)}


def _sharded(module, optimizer, loading: bool, rng: bool = True, optimizer_format: str = OPTIMIZER_FORMAT) -> dict:
    model_sd = _model_state(module)
    if loading:
        _placeholder_optimizer_state(optimizer)
    sharded = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=loading,
                                                  metadata={"distrib_optim_sharding_type": optimizer_format}),
    }
    if rng:
        sharded["rng_state"] = _rng_object()
    return sharded


def save_training_checkpoint(save_dir: str, step: int, module, optimizer, scheduler, state: dict,
                             keep_last: int, base: str) -> str:
    """Write ``SAVE/iter_<step>`` aside, then point ``latest`` at it; keep the newest ``keep_last``.
    ``base`` is the converted checkpoint training started from (``train.load``): a model with
    adapters saves only them, and the checkpoint names ``base`` by its id (:func:`check_base`).

    Every rank must call it. Returns the checkpoint's path.
    """
    name = f"iter_{step:07d}"
    final = os.path.join(save_dir, name)
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dist_checkpointing.save(_sharded(module, optimizer, loading=False), tmp,
                            sharded_strategy=SyncTorchDistSaveStrategy())
    if dist.get_rank() == 0:
        with open(os.path.join(tmp, "training_state.json"), "w") as f:
            if _adapted(module):  # the base is not in the checkpoint: name it
                state = dict(state, base={"path": os.path.abspath(base),
                                          "checkpoint_id": ConvertedCheckpoint(base).meta.get("checkpoint_id")})
            json.dump(dict(state, step=step, scheduler=scheduler.state_dict(), layout=_layout(),
                           optimizer_format=OPTIMIZER_FORMAT, megatron_core=megatron_core_version()), f, indent=2)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text(os.path.join(save_dir, LATEST), name + "\n")
        kept = sorted(d for d in os.listdir(save_dir) if d.startswith("iter_") and not d.endswith(".tmp"))
        for old in kept[:-keep_last]:
            shutil.rmtree(os.path.join(save_dir, old))
    dist.barrier()
    return final


def check_base(path: str, load: str) -> None:
    """Refuse to resume the adapters of ``path`` on another base than the one they were trained on:
    the checkpoint records the converted checkpoint's id (``base``), ``load`` is ``train.load``.

    Raises:
        InputError: naming both checkpoints.
    """
    base = read_training_state(path).get("base")
    if not base:
        return
    now = ConvertedCheckpoint(load).meta.get("checkpoint_id")
    if base["checkpoint_id"] != now:
        raise InputError(f"{path} holds adapters trained on the base {base['path']} (checkpoint id "
                         f"{base['checkpoint_id']}), but train.load={load} is another model (id {now}): resume with "
                         f"train.load={base['path']}, or start in a new train.save directory")


def read_training_state(path: str) -> dict:
    """A checkpoint's ``training_state.json``: step, sampler position, scheduler and the config it was
    trained with (``config``; absent in checkpoints written before it was recorded)."""
    with open(os.path.join(path, "training_state.json")) as f:
        return json.load(f)


def check_readable(path: str) -> None:
    """Refuse, before any work, a checkpoint this megatron-core cannot read: one written by a newer
    release (``training_state.json`` records the writer's version as ``megatron_core``).

    Raises:
        InputError: naming both versions and the fix.
    """
    problem = refuse_newer_checkpoint(path, read_training_state(path).get("megatron_core"))
    if problem:
        raise InputError(problem)


def mark_done(path: str, what: str) -> None:
    """Strike ``what`` ("export", "eval") off the work a checkpoint's step still owes (rank 0 only)."""
    state = read_training_state(path)
    state["pending"] = [p for p in state.get("pending", []) if p != what]
    write_text(os.path.join(path, "training_state.json"), json.dumps(state, indent=2))


def load_training_checkpoint(path: str, module, optimizer, scheduler, *, keep_schedule: bool = True) -> dict:
    """Restore model, optimizer, scheduler and RNG from ``path``; returns the training state.

    ``keep_schedule=False`` keeps the scheduler's and optimizer's settings as they were built from
    the current config (a deliberate change on resume) and restores only the step count.
    """
    state = read_training_state(path)
    # Each rank's RNG state belongs to its place in the TP x PP x DP layout; weights and optimizer
    # state reshard to another layout, the RNG streams cannot and start afresh (seeded) then.
    same_layout = state.get("layout") == _layout()
    with torch.no_grad():
        optimizer_format = state.get("optimizer_format", _LEGACY_OPTIMIZER_FORMAT)
        loaded = dist_checkpointing.load(_sharded(module, optimizer, loading=True, rng=same_layout,
                                                  optimizer_format=optimizer_format), path)
        chunks = module if isinstance(module, list) else [module]
        adapters = _adapted(chunks)  # the base stays as loaded from train.load
        for i, chunk in enumerate(chunks):
            missing, unexpected = chunk.load_state_dict(loaded["model"] if len(chunks) == 1 else
                                                        loaded["model"][f"chunk{i}"], strict=not adapters)
            if adapters and (unexpected or any(is_adapter(k) for k in missing)):
                raise InputError(f"{path}: its adapters do not match the model's (missing "
                                 f"{[k for k in missing if is_adapter(k)][:3]}, unexpected {unexpected[:3]})")
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        _load_optimizer(optimizer, loaded["optimizer"], optimizer_format)
        _restore_step_counters(optimizer, loaded["optimizer"])
        if not keep_schedule:
            for group, mine in zip(optimizer.param_groups, settings):
                group.update(mine)
    # megatron's scheduler adds the saved step count to its own, which build_scheduler already
    # advanced to step 1: counted from there a resumed run would be one step ahead.
    scheduler.num_steps = 0
    if keep_schedule:
        scheduler.load_state_dict(state["scheduler"])
    else:
        scheduler.num_steps = state["scheduler"]["num_steps"]
        scheduler.step(increment=0)  # the learning rate and weight decay of the new schedule at this step
    if same_layout:
        _restore_rng(loaded["rng_state"])
    state["rng_restored"] = same_layout
    return state

