"""One forward-backward over a step's microbatches, for every ``contrast_scope`` and reference.

:func:`train_step` is a whole step (the gradients, then the optimizer and the schedule): the
trainer's, the benchmarks' and the tests' one step. The gradients:

* ``reference: online``: the frozen reference runs first, forward only, through the same
  :func:`~megatron_rpo.training.forward_step.forward_step`; its log-probs become the batch's
  ``ref_logps``. With low-rank adapters the reference is the policy with its adapters switched off.
* ``contrast_scope: local`` / ``data_parallel``: one schedule run; the matrix spans the
  microbatch on this rank / on every data-parallel rank.
* ``contrast_scope: global_batch``: gradient caching (:mod:`megatron_rpo.loss.gradcache`):
  a forward-only pass, the global loss, then forward-backward with the surrogate loss.

:func:`forward_backward` and :func:`sequence_logps` are the device boundary's only callers
(:func:`megatron_rpo.device.to_device`): whatever builds microbatches on the host hands them to
one of these two, and everything after (the model, the reference, the loss, gradient caching)
sees them on the model's device.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rpo.config import LossConfig
from megatron_rpo.device import to_device
from megatron_rpo.loss.gradcache import cached_logp_gradients
from megatron_rpo.models.lora import adapters_disabled
from megatron_rpo.training.forward_step import (
    forward_step,
    logps_loss_func,
    preference_loss_func,
    surrogate_loss_func,
)

__all__ = ["run_schedule", "sequence_logps", "forward_backward", "gradients", "train_step"]


def run_schedule(model, microbatches: list[dict], loss_fn, *, forward_only: bool) -> list[dict]:
    """megatron's pipeline schedule over ``microbatches`` with :func:`forward_step` and ``loss_fn``.

    Every microbatch must have the same [B, S] shape (pipeline stages exchange fixed shapes).
    ``model`` is a module or megatron's list of model chunks; under the interleaved schedule each
    chunk reads every microbatch through an iterator of its own.
    Returns the per-microbatch reports on the last pipeline stage, [] elsewhere.
    """
    rows, seq = microbatches[0]["tokens"].shape
    models = model if isinstance(model, list) else [model]
    count = len(microbatches)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if len(models) > 1 and count % pp:
        if not forward_only:  # Config.data_parallel_size refuses such a step before any work
            raise ValueError(f"the interleaved pipeline trains a multiple of {pp} microbatches, got {count}")
        # Forward only (evaluation, references): top up with copies of the last microbatch and
        # drop their reports; they change no result.
        microbatches = microbatches + [microbatches[-1]] * (pp - count % pp)
    reports = get_forward_backward_func()(
        forward_step_func=partial(forward_step, loss_fn=loss_fn),
        data_iterator=[iter(microbatches) for _ in models] if len(models) > 1 else iter(microbatches),
        model=models,
        num_microbatches=len(microbatches),
        seq_length=seq,
        micro_batch_size=rows,
        forward_only=forward_only,
    )
    return reports[:count]


@torch.no_grad()
def sequence_logps(model, microbatches: list[dict]):
    """Per-sequence response log-probs and lengths of ``model``, forward only.

    Returns:
        On the last pipeline stage, ``([B] float32 log-probs, [B] lengths)`` per microbatch, on
        the model's device; None on other stages.
    """
    microbatches = [to_device(mb) for mb in microbatches]
    reports = run_schedule(model, microbatches, logps_loss_func, forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return [(r["logps"], r["lengths"]) for r in reports]


def _data_parallel_group(loss: LossConfig):
    if loss.contrast_scope == "local":
        return None
    return parallel_state.get_data_parallel_group()


def forward_backward(
    model,
    microbatches: list[dict],
    loss: LossConfig,
    *,
    reference=None,
    forward_only: bool = False,
    paired: bool = True,
) -> list[dict]:
    """Accumulate this step's parameter gradients (unless ``forward_only``) and return reports.

    Args:
        model: the policy (a module or megatron's list of model chunks; DDP-wrapped to train).
        microbatches: this rank's microbatches for the step, on the host or the device; moved
            to the model's device here (the callers' dicts are left as they are).
        loss: the loss config (type, ``contrast_scope``, ``reference``).
        reference: the frozen reference model for ``loss.reference == "online"``: a separate one, or
            the policy itself when it carries adapters (run with them switched off).
        forward_only: evaluate without gradients.
        paired: the microbatches hold pairs (chosen i and rejected i share a prompt); decides
            which accuracy the reports hold (:func:`megatron_rpo.loss.preference_metrics`).

    Returns:
        Per-microbatch reports on the last pipeline stage ([] elsewhere). Under
        ``global_batch`` one report, for the whole global batch.
    """
    microbatches = [to_device(mb) for mb in microbatches]
    if loss.uses_reference and loss.reference == "online":
        if reference is None:
            raise ValueError("loss.reference='online' needs a reference model")
        with adapters_disabled(reference):  # a LoRA policy's frozen base (a separate reference has none)
            ref = sequence_logps(reference, microbatches)
        for mb, (logps, _) in zip(microbatches, ref or []):
            mb["ref_logps"] = logps
    group = _data_parallel_group(loss)
    if loss.contrast_scope != "global_batch" or forward_only:
        # Evaluation of a global-batch run still builds one matrix per microbatch over all ranks.
        loss_fn = partial(preference_loss_func, loss, group, paired)
        return run_schedule(model, microbatches, loss_fn, forward_only=forward_only)

    # Pass 1: forward only; keep per-sequence log-probs (last pipeline stage).
    first = sequence_logps(model, microbatches)
    report = []
    if first is not None:
        grads, value, metrics = cached_logp_gradients(
            loss, microbatches, [lp for lp, _ in first], [n for _, n in first], group, paired=paired
        )
        for mb, g in zip(microbatches, grads):
            mb["logp_grads"] = g
        report = [{"loss": value, **metrics}]
    # Pass 2: forward-backward with the surrogate; other stages only relay activations.
    scale = float(len(microbatches))
    run_schedule(model, microbatches, partial(surrogate_loss_func, scale), forward_only=False)
    return report


def gradients(model: list, optimizer, batches: list[dict], loss: LossConfig, *, reference=None, paired: bool = True,
              experts=None) -> list[dict]:
    """This rank's gradients for one step over ``batches`` (its microbatches, on the host), reduced
    over the data-parallel ranks, in ``model``'s (megatron DDP chunks') gradient buffers; returns
    the reports. ``experts``, a :class:`~megatron_rpo.training.experts.ExpertMetrics`, is reset
    first."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    if experts is not None:
        experts.reset()
    reports = forward_backward(model, batches, loss, reference=reference, paired=paired)
    finalize_model_grads(model)
    return reports


def train_step(model: list, optimizer, batches: list[dict], loss: LossConfig, *, scheduler=None, reference=None,
               paired: bool = True, experts=None) -> tuple[list[dict], float | None]:
    """:func:`gradients`, then the optimizer and (when one is given) the schedule; the reports and
    the gradient norm (None where the optimizer skipped the step)."""
    reports = gradients(model, optimizer, batches, loss, reference=reference, paired=paired, experts=experts)
    updated, grad_norm, _ = optimizer.step()
    if updated and scheduler is not None:
        scheduler.step(increment=1)
    return reports, grad_norm
