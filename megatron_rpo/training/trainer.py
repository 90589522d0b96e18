"""The training loop: build everything from a Config, train, evaluate, checkpoint, export.

Everything that can be wrong with the inputs is checked in :meth:`Trainer.__init__`, before the
first step: the world size against TP x PP, and :mod:`megatron_rpo.training.inputs` (the
datasets' manifests against each other and the checkpoint, the checkpoint's architecture against
``model``).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from megatron_rpo import parallel
from megatron_rpo.config import Config, config_changes, config_to_dict, dump_config
from megatron_rpo.convert.peft import save_peft_adapter
from megatron_rpo.convert.save import save_converted
from megatron_rpo.data.dataset import PairedSampler, PreferenceDataset, UnpairedSampler, collate_step
from megatron_rpo.device import current_device
from megatron_rpo.errors import InputError
from megatron_rpo.models import model_chunks, transformer_engine_layers
from megatron_rpo.models.flops import peak_tflops, step_flops
from megatron_rpo.plan import plan
from megatron_rpo.training.checkpointing import (
    check_base,
    check_readable,
    checkpoint_model_config,
    describe_layout,
    latest_checkpoint,
    load_training_checkpoint,
    load_weights,
    mark_done,
    read_training_state,
    save_training_checkpoint,
)
from megatron_rpo.training.experts import ExpertMetrics
from megatron_rpo.training.inputs import check_inputs, resolve
from megatron_rpo.training.interrupts import Preempted, StopRequests
from megatron_rpo.training.lock import SaveDirLock
from megatron_rpo.training.metrics_log import Scalars, accuracy_text, format_line, reduce_reports, require_wandb
from megatron_rpo.training.optimizer import build_optimizer, build_scheduler
from megatron_rpo.training.step import forward_backward, gradients, train_step

__all__ = ["Trainer"]


def _log(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


class Trainer:
    """One run: ``Trainer(config).train()``; call :meth:`close` in a ``finally``."""

    def __init__(self, config: Config):
        self.config = config
        c = config
        parallel.initialize(c.parallel, seed=c.train.seed)
        self.dp = c.data_parallel_size(dist.get_world_size())
        if not c.train.load:
            raise InputError("train.load must name the converted checkpoint to start from")
        if not c.data.train_data_prefix:
            raise InputError("data.train_data_prefix must name a preprocessed dataset")
        needs_emb = c.loss.uses_matrix and c.loss.weighting == "embedding"
        needs_ref = c.loss.uses_reference and c.loss.reference == "precomputed"
        self.train_data = PreferenceDataset(c.data.train_data_prefix, embeddings=needs_emb, reference_logps=needs_ref)
        self.valid_data = (PreferenceDataset(c.data.valid_data_prefix, embeddings=needs_emb, reference_logps=needs_ref)
                           if c.data.valid_data_prefix else None)
        self.config = c = resolve(c, checkpoint_model_config(c.train.load), self.train_data)
        check_inputs(c, self.train_data, self.valid_data)
        resume = latest_checkpoint(c.train.save)
        if resume:
            check_readable(resume)  # a newer megatron-core's checkpoint: said before the model is built
            check_base(resume, c.train.load)  # adapters resume on the base they were trained on
        if c.train.wandb_project:
            require_wandb()  # on every rank, so that all of them stop here with the same message

        self.bf16 = c.optimizer.bf16  # resolved: false without a GPU
        # megatron's list of model chunks: one, or one per virtual pipeline stage
        self.module = model_chunks(c, bf16=self.bf16)
        load_weights(self.module, c.train.load)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                   use_distributed_optimizer=c.optimizer.use_distributed_optimizer)
        # megatron's rule for chunks: only the first one's buffer is split into buckets
        self.model = [DistributedDataParallel(chunk.config, ddp_config, chunk, disable_bucketing=i > 0)
                      for i, chunk in enumerate(self.module)]
        self.reference = None
        if c.loss.uses_reference and c.loss.reference == "online" and c.lora.enabled:
            self.reference = self.model  # run with its adapters switched off: the frozen base, no second copy
        elif c.loss.uses_reference and c.loss.reference == "online":
            # forward only, under no_grad: nothing to recompute
            frozen = dataclasses.replace(c, model=c.model.without_recompute())
            self.reference = model_chunks(frozen, bf16=self.bf16)
            load_weights(self.reference, c.train.load)  # the starting policy, also when resuming
            for chunk in self.reference:
                chunk.requires_grad_(False).eval()

        self.samples_per_step = c.train.global_batch_size
        self.num_microbatches = c.train.global_batch_size // (c.train.micro_batch_size * self.dp)
        self.experts = (ExpertMetrics(torch.nn.ModuleList(self.module), c.model.num_layers, c.model.num_moe_experts,
                                      self.num_microbatches, c.model.moe_aux_loss_coeff)
                        if c.model.num_moe_experts else None)
        self.sampler = self._sampler(self.train_data, shuffle_seed=c.data.seed)
        epoch_steps = self.sampler.samples_per_epoch() // self.samples_per_step
        if epoch_steps == 0 and c.train.train_iters is None:
            raise InputError(f"{c.data.train_data_prefix} holds fewer samples than one global batch "
                             f"({self.samples_per_step})")
        self.total_steps = epoch_steps if c.train.train_iters is None else c.train.train_iters
        if self.valid_data is not None:
            self._eval_microbatches(self._eval_sampler())  # too small to evaluate: said now, not after training
        self.optimizer = build_optimizer(c.optimizer, self.model, bf16=self.bf16)
        self.scheduler = build_scheduler(self.optimizer, c.optimizer, self.total_steps)
        self.step = 0
        self.history: list[dict] = []  # per-step metrics of this session
        self._evaluated_at = -1
        self._checkpoint: tuple[str, int] | None = None  # the newest checkpoint (path, step), written or resumed
        self._pending: list[str] = []  # what that checkpoint's step still owes: "export", "eval"
        self.lock = self._lock_save_dir()
        try:
            resume = latest_checkpoint(c.train.save)
            if resume:
                state = read_training_state(resume)
                changed = self._check_resume_config(resume, state)
                state = load_training_checkpoint(resume, self.module, self.optimizer, self.scheduler,
                                                 keep_schedule=not changed)
                self.step = state["step"]
                self._checkpoint, self._pending = (resume, self.step), list(state.get("pending", []))
                self.sampler.consumed_samples = state["consumed_samples"]
                _log(f"resumed from {resume} at step {self.step}" + (
                    "" if state["rng_restored"] else f" (trained as {describe_layout(state.get('layout'))}: weights "
                    "and optimizer state resharded, random streams seeded afresh)"))
            log_dir = c.train.tensorboard_dir or (os.path.join(c.train.save, "tensorboard") if c.train.save else None)
            self.scalars = Scalars(log_dir, self._wandb_settings())
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise
        if c.train.save and dist.get_rank() == 0:
            self._record_config()
        self.stops = StopRequests(c.train.stop_signal)
        # MFU needs a GPU's peak rate: the configured one, else the GPU's by name; none on CPU.
        self.peak_tflops = c.train.peak_tflops or (peak_tflops(torch.cuda.get_device_name())
                                                   if torch.cuda.is_available() else None)
        steps = (f"{self.total_steps} steps" if self.total_steps else
                 "no training (train.train_iters=0): evaluation only")
        experts = (f" (experts: EP {c.parallel.expert_model_parallel_size} x ETP {c.parallel.expert_tensor_size}, "
                   f"{c.model.num_moe_experts // c.parallel.expert_model_parallel_size} of {c.model.num_moe_experts} "
                   f"per rank, top {c.model.moe_router_topk}, aux loss coeff {c.model.moe_aux_loss_coeff:g})"
                   if c.model.num_moe_experts else "")
        p = c.parallel
        vpp = f" (VPP {p.virtual_pipeline_model_parallel_size})" if p.virtual_pipeline_model_parallel_size else ""
        cp = f" x CP {p.context_parallel_size}" if p.context_parallel_size > 1 else ""
        _log(f"world {dist.get_world_size()} = TP {p.tensor_model_parallel_size} x PP "
             f"{p.pipeline_model_parallel_size}{vpp}{cp} x DP {self.dp}{experts}; {self.num_microbatches} "
             "microbatches of "
             f"{c.train.micro_batch_size} {'pairs' if c.data.paired else 'items'} per rank per step; "
             f"{steps}; loss {c.loss.loss_type} ({c.loss.contrast_scope})")
        if c.lora.enabled:
            trainable = sum(p.numel() for chunk in self.module for p in chunk.parameters() if p.requires_grad)
            every = sum(p.numel() for chunk in self.module for p in chunk.parameters())
            _log(f"lora: rank {c.lora.rank}, alpha {c.lora.alpha:g} on {', '.join(c.lora.targets)}; "
                 f"{trainable:,} of rank 0's {every:,} parameters train ({100 * trainable / every:.2f}%)"
                 + ("; the reference is the model with its adapters off" if self.reference is self.model else ""))
        self._log_memory_plan()

    def _log_memory_plan(self) -> None:
        """The memory plan's total for this run (rank 0, one line; ``python -m megatron_rpo.plan``)."""
        c = self.config
        gpu = torch.cuda.is_available()
        memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30 if gpu else 0.0
        estimate = plan(c, dist.get_world_size(), memory, bf16=self.bf16,
                        transformer_engine=transformer_engine_layers(c))
        worst = estimate.worst
        verdict = (f" of {memory:.0f} GiB ({'fits' if estimate.fits else 'does NOT fit'}: "
                   f"python -m megatron_rpo.plan for the breakdown)" if gpu else "")
        _log(f"memory plan: {worst.total / 2**30:.2f} GiB per GPU on pipeline stage {worst.stage}{verdict}")

    # -- the save directory ---------------------------------------------------------------------
    def _lock_save_dir(self) -> SaveDirLock | None:
        """Take ``<save>/.lock`` on rank 0; every rank raises the same error if another job holds it."""
        if not self.config.train.save:
            return None
        lock = SaveDirLock(self.config.train.save)
        outcome = [None, None]
        if dist.get_rank() == 0:
            try:
                outcome = [lock.acquire(), None]
            except ValueError as e:
                outcome = [None, str(e)]
        dist.broadcast_object_list(outcome, src=0)
        note, error = outcome
        if error:
            raise InputError(error)
        if note:
            _log(note)
        return lock

    def _check_resume_config(self, checkpoint: str, state: dict) -> bool:
        """Compare the config with the one ``checkpoint`` was trained with; True when changes are applied.

        Raises:
            ValueError: settings differ and ``train.allow_config_change`` is false.
        """
        trained = state.get("config")
        if trained is None:
            _log(f"note: {checkpoint} does not record its config; the current one is taken as is")
            return False
        changes = config_changes(trained, self.config)
        if not changes:
            return False
        listing = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)
        if not self.config.train.allow_config_change:
            raise InputError(f"the config differs from the one {checkpoint} was trained with ({listing}); resume with "
                             "the same settings, or pass train.allow_config_change=true to apply the changes")
        for key, old, new in changes:
            _log(f"config change on resume: {key} {old!r} -> {new!r}")
        return True

    def _wandb_settings(self) -> dict | None:
        t = self.config.train
        if not t.wandb_project:
            return None
        name = t.wandb_run_name or (os.path.basename(os.path.abspath(t.save)) if t.save else None)
        return {"project": t.wandb_project, "entity": t.wandb_entity, "name": name, "mode": t.wandb_mode,
                "dir": t.save, "config": config_to_dict(self.config),
                "id_file": os.path.join(t.save, "wandb_run_id") if t.save else None}

    def _record_config(self) -> None:
        """``<save>/config.yaml`` is the config of the latest (re)start; ``<save>/configs/`` keeps every one."""
        save = self.config.train.save
        history = os.path.join(save, "configs")
        os.makedirs(history, exist_ok=True)
        name, n = f"step_{self.step:07d}", 1
        while os.path.exists(os.path.join(history, f"{name}.yaml")):
            name, n = f"step_{self.step:07d}-{n}", n + 1
        dump_config(self.config, os.path.join(history, f"{name}.yaml"))
        dump_config(self.config, os.path.join(save, "config.yaml"))

    # -- data -----------------------------------------------------------------------------------
    def _sampler(self, data: PreferenceDataset, shuffle_seed: int, paired: bool | None = None):
        c = self.config
        common = dict(micro_batch_size=c.train.micro_batch_size,
                      data_parallel_rank=parallel_state.get_data_parallel_rank(),
                      data_parallel_size=self.dp, seed=shuffle_seed)
        if c.data.paired if paired is None else paired:
            return PairedSampler(**common, num_pairs=data.manifest["num_pairs"])
        return UnpairedSampler(**common, chosen=data.chosen_indices, rejected=data.rejected_indices)

    def microbatches(self, data, iterator, count) -> tuple[list[dict], np.ndarray]:
        """This rank's next ``count`` microbatches (on the host) and the lengths of their sequences."""
        c = self.config.data
        indices = list(itertools.islice(iterator, count))
        batches = collate_step(data, indices, c.max_length, packing=c.packing, pack_multiple=c.pack_multiple,
                               sequence_multiple=self.config.parallel.sequence_multiple,
                               mismatched=self.config.loss.uses_mismatched)
        flat = np.concatenate([np.asarray(i) for i in indices])
        return batches, np.minimum(data.tokens.sequence_lengths[flat], c.max_length).astype(np.int64)

    def _throughput(self, lengths: np.ndarray, elapsed: float) -> dict[str, float]:
        """Real tokens/s over all ranks, model TFLOP/s per GPU and (on a known GPU) MFU (models/flops.py)."""
        c = self.config
        counts = torch.tensor([float(lengths.sum()), float((lengths ** 2).sum())], dtype=torch.float64,
                              device=current_device())
        dist.all_reduce(counts)
        model_parallel = c.parallel.model_parallel_size  # TP x PP x CP
        tokens, squares = (counts / model_parallel).tolist()  # each model-parallel rank counted the same
        flops = step_flops(c.model, tokens, squares, reference_forward=self.reference is not None)
        out = {"tokens_per_s": tokens / elapsed, "tflops": flops / elapsed / dist.get_world_size() / 1e12}
        if self.peak_tflops:
            out["mfu"] = out["tflops"] / self.peak_tflops
        return out

    # -- one step -------------------------------------------------------------------------------
    def forward_backward_step(self, batches: list[dict]) -> list[dict]:
        """This rank's gradients for one step over ``batches`` (its microbatches, on the host), reduced
        over the data-parallel ranks (every contrast scope and reference); returns the reports."""
        return gradients(self.model, self.optimizer, batches, self.config.loss, reference=self.reference,
                         paired=self.config.data.paired, experts=self.experts)

    def train_step(self, batches: list[dict]) -> tuple[list[dict], float | None]:
        """:meth:`forward_backward_step`, then the optimizer and the schedule; the reports and the
        gradient norm."""
        return train_step(self.model, self.optimizer, batches, self.config.loss, scheduler=self.scheduler,
                          reference=self.reference, paired=self.config.data.paired, experts=self.experts)

    # -- loop -----------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Run to ``total_steps``; returns the last evaluation's metrics (empty without validation)."""
        c = self.config
        last_eval = self._finish_pending()
        if 0 < self.total_steps <= self.step:
            # A finished run started again: nothing to train, evaluate, save or log a second time
            # (but what a stop or a crash after its last checkpoint left undone, done above).
            if not last_eval:
                _log(f"the run in {c.train.save} already finished at step {self.step} of {self.total_steps}; "
                     "nothing to do")
            return last_eval
        iterator = iter(self.sampler)
        times = []
        self.stops.install()
        while self.step < self.total_steps:
            start = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            lr_used = self.optimizer.param_groups[0]["lr"]
            batches, lengths = self.microbatches(self.train_data, iterator, self.num_microbatches)
            reports, grad_norm = self.train_step(batches)
            self.step += 1
            self.sampler.consumed_samples += self.samples_per_step
            metrics = reduce_reports(reports)
            self.history.append(dict(metrics, step=self.step, lr=lr_used, grad_norm=grad_norm))
            elapsed = time.perf_counter() - start
            times.append(elapsed)
            lr = lr_used
            speed = self._throughput(lengths, elapsed)
            if torch.cuda.is_available():  # the most any rank held during the step (the plan's "total")
                peak = torch.tensor(float(torch.cuda.max_memory_allocated()), device=current_device())
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)
                speed["memory_peak_gib"] = peak.item() / 2**30
            if self.step % c.train.log_interval == 0 or self.step == self.total_steps:
                recent = times[-c.train.log_interval:]
                avg = sum(recent) / len(recent)
                line = format_line(self.step, self.total_steps, metrics, lr, grad_norm, speed["tokens_per_s"], elapsed,
                                   avg * (self.total_steps - self.step), paired=c.data.paired, tflops=speed["tflops"],
                                   mfu=speed.get("mfu"))
                peak = speed.get("memory_peak_gib")
                _log(line + (f" | peak memory {peak:.2f} GiB" if peak is not None else ""))
            self.scalars.add("train", dict(metrics, lr=lr, grad_norm=grad_norm, step_time=elapsed, **speed), self.step)
            if self.experts is not None:
                self.scalars.add("moe", self.experts.read(), self.step)
            stop = self.stops.poll(current_device())
            if stop:
                self._stop(stop)
            # The checkpoint first: a failing evaluation must not cost the step it follows.
            if c.train.save and c.train.save_interval and self.step % c.train.save_interval == 0:
                self.save()
            if self.valid_data is not None and c.train.eval_interval and self.step % c.train.eval_interval == 0:
                last_eval = self.evaluate()
            if c.train.exit_interval and self.step % c.train.exit_interval == 0 and self.step < self.total_steps:
                if c.train.save and not (c.train.save_interval and self.step % c.train.save_interval == 0):
                    self.save()
                _log(f"exit_interval: stopping at step {self.step}; run again to resume")
                return last_eval
        if c.train.save and self.step > 0:
            if not (c.train.save_interval and self.step % c.train.save_interval == 0):
                self.save()
            if c.train.export:
                self.export()
        if self.valid_data is not None and self._evaluated_at != self.step:
            last_eval = self.evaluate()
        return last_eval

    def _finish_pending(self) -> dict[str, float]:
        """What the checkpoint this run resumed from left undone at its step (a stop or a crash came
        between the save and them): the export of a finished run, the evaluation of its step."""
        last_eval = {}
        if "export" in self._pending and self.config.train.export and self.step >= self.total_steps:
            self.export()
        if "eval" in self._pending and self.valid_data is not None:
            last_eval = self.evaluate()
        return last_eval

    def _owed(self) -> list[str]:
        """What this step still owes once its checkpoint is written (recorded in the checkpoint)."""
        c = self.config
        final = self.step >= self.total_steps
        owed = ["export"] if final and c.train.export else []
        eval_step = bool(c.train.eval_interval) and self.step % c.train.eval_interval == 0
        if self.valid_data is not None and (final or eval_step):
            owed.append("eval")
        return owed

    def _done(self, what: str) -> None:
        """``what`` of the newest checkpoint's step is done: a resume from it must not do it again."""
        if self._checkpoint and self._checkpoint[1] == self.step and what in self._pending:
            self._pending.remove(what)
            if dist.get_rank() == 0:
                mark_done(self._checkpoint[0], what)

    def export(self) -> None:
        """The weights of this step as a converted checkpoint, ``<save>/export`` (with adapters: merged
        into their weights, and the adapters alone as a PEFT folder, ``<save>/adapter``)."""
        c = self.config
        export = os.path.join(c.train.save, "export")
        save_converted(self.module, export, c.model, c.train.load)
        _log(f"exported the final weights to {export}" + (" (the adapters merged)" if c.lora.enabled else ""))
        if c.lora.enabled:
            adapter = os.path.join(c.train.save, "adapter")
            save_peft_adapter(self.module, adapter, c.model, c.lora, c.train.load)
            _log(f"exported the adapters to {adapter} (peft.PeftModel.from_pretrained on the Hugging Face "
                 f"model of {c.train.load})")
        self._done("export")

    def _eval_sampler(self):
        return self._sampler(self.valid_data, shuffle_seed=0, paired=self.valid_data.paired)

    def _eval_microbatches(self, sampler) -> int:
        """How many microbatches per rank one evaluation runs: the whole held-out set (whole
        microbatches on every data-parallel rank), or ``train.eval_iters`` steps of it.

        Raises:
            ValueError: the held-out set does not fill one microbatch on every rank.
        """
        c = self.config
        chunk = c.train.micro_batch_size * self.dp
        available = sampler.samples_per_epoch() // chunk
        if available == 0:
            kind = "pairs" if self.valid_data.paired else "chosen and rejected items"
            size = (self.valid_data.manifest["num_pairs"] if self.valid_data.paired else
                    f"{len(self.valid_data.chosen_indices)} + {len(self.valid_data.rejected_indices)}")
            raise InputError(f"{self.valid_data.prefix} holds {size} {kind}, fewer than one microbatch on every "
                             f"data-parallel rank (train.micro_batch_size {c.train.micro_batch_size} x DP {self.dp} "
                             f"= {chunk}), the least an evaluation needs: use a larger held-out set, a smaller "
                             "train.micro_batch_size, or leave data.valid_data_prefix out")
        if c.train.eval_iters:
            available = min(available, c.train.eval_iters * self.num_microbatches)
        return available

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss, reward accuracy and margin over the held-out set (or ``eval_iters`` steps of it).

        Steps of ``num_microbatches`` microbatches per rank, as in training; a held-out set that
        does not fill a whole global batch ends with a shorter step (with ``global_batch``
        contrast, that step's matrix is smaller).
        """
        c = self.config
        sampler = self._eval_sampler()
        total = self._eval_microbatches(sampler)
        iterator = iter(sampler)
        for chunk in self.model:
            chunk.eval()
        reports = []
        for start in range(0, total, self.num_microbatches):
            batches, _ = self.microbatches(self.valid_data, iterator, min(self.num_microbatches, total - start))
            reports += forward_backward(self.model, batches, c.loss,
                                        reference=self.reference, forward_only=True, paired=self.valid_data.paired)
        for chunk in self.model:
            chunk.train()
        metrics = reduce_reports(reports)
        self._evaluated_at = self.step
        self._done("eval")
        scores = accuracy_text(metrics, self.valid_data.paired)
        if self.valid_data.paired and not c.data.paired:  # the training line's measure too
            scores += f" | {accuracy_text(metrics, False)}"
        samples = f"{total * c.train.micro_batch_size * self.dp} {'pairs' if self.valid_data.paired else 'items'}"
        _log(f"eval at step {self.step}: loss {metrics['loss']:.4f} | {scores} | "
             f"margin {metrics['reward_margin']:+.4f} | {samples}")
        self.scalars.add("eval", metrics, self.step)
        return metrics

    def _stop(self, signal_name: str):
        """Save (with ``train.save``) and raise :class:`Preempted`: a clean stop on every rank."""
        where = "no checkpoint (train.save is not set)"
        if self.config.train.save:
            where = f"checkpoint {self.save()}"
        _log(f"received {signal_name}: stopped after step {self.step} with {where}; exiting with code "
             f"{Preempted.exit_code}. Run the same command to resume.")
        raise Preempted(signal_name)

    def save(self) -> str:
        """Write a checkpoint of this step; returns its path."""
        owed = self._owed()
        path = save_training_checkpoint(
            self.config.train.save, self.step, self.module, self.optimizer, self.scheduler,
            {"consumed_samples": self.sampler.consumed_samples, "config": config_to_dict(self.config),
             "pending": owed},
            self.config.train.keep_last, self.config.train.load)
        self._checkpoint, self._pending = (path, self.step), list(owed)
        _log(f"saved {path}")
        return path

    def close(self, *, keep_process_group: bool = False) -> None:
        """Release the signal handlers, the logs and the save directory, and tear down the parallel
        state; ``keep_process_group`` keeps torch.distributed up for another run in this process."""
        self.stops.uninstall()
        self.scalars.close()
        if self.lock is not None and dist.get_rank() == 0:
            self.lock.release()
        if keep_process_group:
            parallel_state.destroy_model_parallel()
        else:
            parallel.destroy()
