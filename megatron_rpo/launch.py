"""Launch: ``python -m megatron_rpo.launch [torchrun options] -m megatron_rpo.train --config FILE ...``.

torchrun itself (the same options, run in this process), except for what a scheduler needs on
preemption. Under plain torchrun a SIGTERM to the launcher (``kill``, Slurm, Kubernetes) or a
Ctrl-C makes torchrun pass the signal on, give the workers ``--shutdown-timeout`` seconds (30)
and exit with code 1 whatever they did: a job that saved its checkpoint and stopped cleanly
looks like a crash, a requeue-on-75 policy never fires, and a save longer than 30 s is killed
halfway. Here:

* SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 are passed on to every worker, and torchrun keeps
  watching them: the workers finish their step, save and exit with code 75
  (:data:`~megatron_rpo.training.interrupts.PREEMPTED_EXIT_CODE`);
* when a worker exited with 75 and every other one that failed was taken down by torchrun
  (a signal) after it, the launcher exits with 75 too, with one line instead of torchrun's
  failure report; any other failure is torchrun's, reported as torchrun reports it;
* when the workers stopped on a bad input they reported (exit code 2, one ``error:`` line from
  rank 0), the launcher exits with 2 without torchrun's failure report after it;
* torchrun's "failed (exitcode: N)" log line is left out for those two exits, which are no crash;
* a second Ctrl-C stops the workers at once, as torchrun would on the first.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

__all__ = ["main"]

FORWARDED = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")


class _QuietCleanExits(logging.Filter):
    """Drop torchrun's "failed (exitcode: N) local_rank: ..." line for a stop or a reported bad input."""

    def filter(self, record: logging.LogRecord) -> bool:
        from megatron_rpo.errors import INPUT_ERROR_EXIT_CODE
        from megatron_rpo.training.interrupts import PREEMPTED_EXIT_CODE

        return not (record.msg.startswith("failed (exitcode:") and record.args
                    and record.args[0] in (PREEMPTED_EXIT_CODE, INPUT_ERROR_EXIT_CODE))


class _Forwarder:
    """Pass stop signals on to the workers (each is a session leader under torchrun)."""

    def __init__(self):
        self.received: list[int] = []

    def install(self) -> None:
        for name in FORWARDED:
            signal.signal(getattr(signal, name), self._forward)

    def _forward(self, signum, frame) -> None:
        import psutil

        if signum == signal.SIGINT and signum in self.received:
            from torch.distributed.elastic.multiprocessing.api import _terminate_process_handler

            _terminate_process_handler(signum, frame)  # torchrun's own hard stop: raises in the agent
        self.received.append(signum)
        print(f"launch: received {signal.Signals(signum).name}; passing it on to the workers, which stop after "
              "their step with a checkpoint", file=sys.stderr, flush=True)
        for child in psutil.Process().children():
            try:
                os.killpg(child.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from megatron_rpo.errors import INPUT_ERROR_EXIT_CODE
    from megatron_rpo.training.interrupts import PREEMPTED_EXIT_CODE

    args = torchrun.parse_args(argv)
    if not hasattr(args, "signals_to_handle"):
        print("error: python -m megatron_rpo.launch needs torch >= 2.9 (torchrun's --signals-to-handle); "
              "use torchrun, whose exit code after a stop signal is 1", file=sys.stderr)
        return 2
    # torchrun keeps the signals it would otherwise turn into "kill the workers, exit 1" for
    # the rest; these come to the forwarder instead.
    kept = [s.strip() for s in args.signals_to_handle.split(",") if s.strip() and s.strip() not in FORWARDED]
    args.signals_to_handle = ",".join(kept) or "SIGQUIT"
    _Forwarder().install()
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_QuietCleanExits())
    try:
        torchrun.run(args)  # torchrun's own ``record`` wrapper would log the workers' error files again
    except ChildFailedError as e:
        codes = [failure.exitcode for failure in e.failures.values()]
        if INPUT_ERROR_EXIT_CODE in codes and all(code == INPUT_ERROR_EXIT_CODE or code < 0 for code in codes):
            return INPUT_ERROR_EXIT_CODE  # rank 0 said what is wrong, in one line
        # A worker exits with 75 only after the checkpoint is published on every rank (the save
        # ends in a barrier); torchrun then takes down the workers still closing, with a signal.
        if PREEMPTED_EXIT_CODE in codes and all(code == PREEMPTED_EXIT_CODE or code < 0 for code in codes):
            print(f"launch: the workers stopped on a signal with a checkpoint saved; exit code {PREEMPTED_EXIT_CODE} "
                  "(run the same command to resume)", file=sys.stderr, flush=True)
            return PREEMPTED_EXIT_CODE
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
