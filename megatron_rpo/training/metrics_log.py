"""Step metrics: gathered to every rank, printed one line per logging step on rank 0, and
written as TensorBoard scalars."""

from __future__ import annotations

import math
import os
import uuid

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_rpo.device import current_device

__all__ = ["METRICS", "TRL_NAMES", "scalar_name", "reduce_reports", "accuracy_text", "format_line", "Scalars",
           "require_wandb"]

METRICS = ("loss", "chosen_reward", "rejected_reward", "reward_margin", "accuracy", "reward_auc", "diag_weight",
           "row_entropy", "matrix_rows", "matrix_cols", "chosen_logps", "rejected_logps", "kl")
# Reported by some losses only (KTO's reference point): left out of a step's metrics where no loss reported it.
OPTIONAL_METRICS = ("kl",)

# The names TensorBoard and Weights & Biases get: TRL's for what users compare across tools, ours
# under contrast/ for the matrix; the rest (loss, lr, grad_norm, throughput) as they are.
TRL_NAMES = {"chosen_reward": "rewards/chosen", "rejected_reward": "rewards/rejected",
             "reward_margin": "rewards/margins", "accuracy": "rewards/accuracies",
             "chosen_logps": "logps/chosen", "rejected_logps": "logps/rejected"}
CONTRAST_METRICS = ("reward_auc", "diag_weight", "row_entropy", "matrix_rows", "matrix_cols")


def scalar_name(key: str) -> str:
    """The dashboard name of a metric (see :data:`TRL_NAMES`)."""
    if key in TRL_NAMES:
        return TRL_NAMES[key]
    return f"contrast/{key}" if key in CONTRAST_METRICS else key


def reduce_reports(reports: list[dict]) -> dict[str, float]:
    """Mean of each metric over this step's microbatches and data-parallel ranks, on every rank.

    Only the last pipeline stage has reports; its first tensor-parallel rank contributes.
    """
    values = torch.zeros(len(METRICS) + 1, dtype=torch.float64)
    source = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    if source and reports:
        # One device-to-host copy per report rather than one per metric.
        host = []
        for r in reports:
            keys = [k for k in METRICS if k in r]
            host.append(dict(zip(keys, torch.stack([torch.as_tensor(r[k]).detach().float().reshape(())
                                                    for k in keys]).tolist())))
        for i, key in enumerate(METRICS):
            column = [h[key] for h in host if key in h]
            values[i] = sum(column) / len(column) if column else float("nan")
        values[-1] = 1.0
    values = values.to(current_device())  # NCCL reduces device tensors only
    dist.all_reduce(values)  # only the data-parallel replicas of the last stage's TP rank 0 add in
    values = values.cpu()
    count = values[-1].item()
    return {key: values[i].item() / count for i, key in enumerate(METRICS)
            if key not in OPTIONAL_METRICS or not math.isnan(values[i].item())}


def _fmt(value: float, spec: str) -> str:
    return "nan" if math.isnan(value) else format(value, spec)


def accuracy_text(m: dict, paired: bool) -> str:
    """Paired data: the accuracy over each prompt's own pair; unpaired: the reward AUC over all cells."""
    return f"acc {_fmt(m['accuracy'], '.3f')}" if paired else f"reward AUC {_fmt(m['reward_auc'], '.3f')}"


def format_line(step: int, total: int, m: dict, lr: float, grad_norm: float | None, tokens_per_s: float,
                step_time: float, eta_s: float, *, paired: bool = True, tflops: float | None = None,
                mfu: float | None = None) -> str:
    eta = f"{int(eta_s // 3600)}h{int(eta_s % 3600 // 60):02d}m" if eta_s >= 3600 else \
        f"{int(eta_s // 60)}m{int(eta_s % 60):02d}s"
    # Matrix losses report their M x N contrast matrix; the others how many chosen / rejected sequences.
    rows, cols = int(m["matrix_rows"]), int(m["matrix_cols"])
    shape = f"matrix {rows}x{cols}" if not math.isnan(m["row_entropy"]) else f"sequences {rows}+{cols}"
    return (f"step {step}/{total} | loss {_fmt(m['loss'], '.4f')} | chosen {_fmt(m['chosen_reward'], '+.4f')} | "
            f"rejected {_fmt(m['rejected_reward'], '+.4f')} | margin {_fmt(m['reward_margin'], '+.4f')} | "
            f"{accuracy_text(m, paired)} | {shape} | "
            + (f"kl {m['kl']:.4f} | " if "kl" in m else "")  # KTO's reference point
            + f"lr {lr:.2e} | grad {_fmt(grad_norm if grad_norm is not None else float('nan'), '.3f')} | "
            f"{tokens_per_s:,.0f} tok/s | "
            + ("" if tflops is None else f"{tflops:.2f} TFLOP/s{'/GPU' if mfu is not None else ''} | ")
            + ("" if mfu is None else f"MFU {mfu:.1%} | ")
            + f"{step_time:.2f} s/step | ETA {eta}")


class Scalars:
    """TensorBoard scalars, and optionally Weights & Biases, on global rank 0 (no-op elsewhere).

    Both get the same names (:func:`scalar_name`) and values.

    Args:
        log_dir: the TensorBoard directory, or None.
        wandb: ``wandb.init`` settings (``project``, ``entity``, ``name``, ``mode``, ``dir``,
            ``config``) and ``id_file``, where the run id is kept so that a resumed run
            continues the same W&B run; None for no W&B.
    """

    def __init__(self, log_dir: str | None, wandb: dict | None = None):
        self.writer = None
        self.run = None
        if dist.get_rank() != 0:
            return
        if log_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir)
        if wandb:
            self.run = _wandb_run(**wandb)

    def add(self, prefix: str, values: dict[str, float], step: int) -> None:
        named = {f"{prefix}/{scalar_name(key)}": float(value) for key, value in values.items()
                 if value is not None and not math.isnan(value)}
        if self.writer is not None:
            for name, value in named.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        if self.run is not None:
            self.run.log(named, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.run is not None:
            self.run.finish()
            self.run = None


def require_wandb():
    """The ``wandb`` module, or a ValueError naming the extra that installs it."""
    try:
        import wandb
    except ImportError:
        raise ValueError("train.wandb_project needs Weights & Biases: pip install 'megatron_rpo[wandb]'") from None
    return wandb


def _wandb_run(id_file: str | None = None, **settings):
    wandb = require_wandb()
    run_id = None
    if id_file and os.path.exists(id_file):
        with open(id_file) as f:
            run_id = f.read().strip() or None
    if run_id is None:
        run_id = uuid.uuid4().hex[:12]  # W&B run ids: lowercase letters and digits
        if id_file:
            os.makedirs(os.path.dirname(id_file), exist_ok=True)
            with open(id_file, "w") as f:
                f.write(run_id + "\n")
    if settings.get("dir"):
        os.makedirs(settings["dir"], exist_ok=True)
    return wandb.init(id=run_id, resume="allow", **settings)
