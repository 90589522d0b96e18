"""Stopping a run cleanly: preemption signals, and a launcher that is gone.

* **Signals.** Slurm and Kubernetes send SIGTERM (``train.stop_signal``) some time before they
  kill; a person presses Ctrl-C (SIGINT). The handler only records the request. At the end of
  the step every rank learns whether any rank got one (one tiny all-reduce), so all of them
  stop at the same step, save, and exit with :data:`PREEMPTED_EXIT_CODE`.
* **Orphans.** Under torchrun the workers are children of the launcher. If the launcher is
  killed outright (``kill -9``) they are re-parented and would train on, and even publish new
  checkpoints, with nobody to collect them. Each step checks the parent; a worker whose launcher
  is gone exits at once without saving.
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

__all__ = ["StopRequests", "Preempted", "PREEMPTED_EXIT_CODE"]

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with a checkpoint saved; run again to resume
ORPHAN_EXIT_CODE = 70


class Preempted(Exception):
    """The run stopped on a signal after saving; carries the exit code for the entry point."""

    exit_code = PREEMPTED_EXIT_CODE


class StopRequests:
    """Install with :meth:`install`; :meth:`poll` at each step boundary; :meth:`uninstall` at the end."""

    def __init__(self, stop_signal: str = "SIGTERM"):
        self.signals = (getattr(signal, stop_signal), signal.SIGINT)
        self.received: int | None = None
        self._previous: dict = {}
        # torchrun sets TORCHELASTIC_RUN_ID in its workers: only then is the parent the launcher.
        self._launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None

    def install(self) -> None:
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._record)
            except ValueError:  # not the main thread (e.g. a test harness): no handler
                pass

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _record(self, signum, frame) -> None:
        self.received = signum

    def launcher_gone(self) -> bool:
        return self._launcher is not None and os.getppid() != self._launcher

    def poll(self, device: torch.device) -> str | None:
        """The name of the signal any rank received, or None; every rank must call it."""
        if self.launcher_gone():
            print(f"rank {dist.get_rank()}: the launcher (pid {self._launcher}) is gone; exiting without saving",
                  flush=True)
            os._exit(ORPHAN_EXIT_CODE)  # no cleanup that could publish or wait on peers
        flag = torch.tensor([self.received or 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
        return signal.Signals(signum).name if signum else None
