"""Run a function on several gloo processes from a test, failing (never hanging) when one dies.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` fresh processes that rendezvous
through a file store, calls ``fn(*args)`` on each rank and returns the per-rank results in
rank order. A rank that raises, exits or outlives ``timeout`` makes the whole call raise
:class:`RankFailure` at once, with the failing rank's traceback; the other ranks are killed.

Start-up is paid once per test session: on CPU the processes are forked from a forkserver that
has imported torch, megatron-core and the package (:data:`PRELOAD`), so a 2-rank call costs well
under a second before ``fn`` runs instead of 5-25 s of imports per process. Each call still gets
fresh processes, with the caller's environment and working directory. With CUDA (the GPU tier)
they are spawned: a process forked after CUDA was touched cannot use it.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import queue
import tempfile
import time
import traceback

import torch

__all__ = ["PRELOAD", "TIER_VARIABLE", "RankFailure", "Spawns", "run_ranks"]

TIER_VARIABLE = "MEGATRON_RPO_TEST_TIER"
"""The running test's tier (tests/conftest.py sets it); :func:`run_ranks` refuses to run in a ``unit`` test."""

PRELOAD = ["torch", "megatron_rpo.training.trainer", "megatron_rpo.training.reference", "megatron_rpo.convert",
           "tests.workspace"]
"""What the forkserver imports once, before it forks every rank of every test."""


class RankFailure(RuntimeError):
    """A rank raised, died or timed out."""


def _context():
    if torch.cuda.is_available():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts: the first call of the session
    return ctx


class _Output:
    """The caller's stdout and stderr, handed to a rank as file descriptors: a rank forked by the
    forkserver would otherwise write where the forkserver's went (capfd, a log) when it started."""

    def __reduce__(self):
        from multiprocessing import reduction

        return _Output._open, (reduction.DupFd(1), reduction.DupFd(2))

    @staticmethod
    def _open(out, err):
        return out.detach(), err.detach()


def _worker(fn, rank, world_size, store_path, results, env, cwd, output, args, kwargs):
    # A forked rank inherits the forkserver's environment, directory and output, from when it
    # started: take the caller's.
    os.environ.clear()
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    os.chdir(cwd)
    if isinstance(output, tuple):
        for fd, target in zip(output, (1, 2)):
            if fd != target:  # spawn hands a rank the caller's descriptors as they are
                os.dup2(fd, target)
                os.close(fd)
    torch.set_num_threads(1)  # 2-4 ranks share 2 cores
    from megatron_rpo import parallel

    try:
        parallel.connect(init_method=f"file://{store_path}", rank=rank, world_size=world_size, timeout_minutes=2)
        value = fn(*args, **kwargs)
        # Bytes, not tensors: torch's queue would pass tensors as shared-memory handles that
        # vanish when this process exits before the parent reads them.
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue(), time.time()))
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        # Reported before the process group goes down, whose teardown makes the peers fail too.
        results.put((rank, False, traceback.format_exc(), time.time()))
    finally:
        parallel.destroy()


def _failures(results, first: tuple) -> str:
    """The first failure and any that follow within a second, earliest first: the rank that
    raised leads, the peers that then lost their connection to it follow."""
    failures = [first]
    try:
        while True:
            rank, ok, value, when = results.get(timeout=1.0)
            if not ok:
                failures.append((when, rank, value))
    except queue.Empty:
        pass
    return "\n".join(f"rank {rank} failed:\n{tb}" for _, rank, tb in sorted(failures))


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0, **kwargs) -> list:
    """Call ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return their results by rank.

    ``fn`` must be importable (module level) and its result picklable. torch.distributed is
    initialised before ``fn`` runs (``fn`` sets up megatron's parallel state itself) and torn
    down after it.

    Raises:
        RankFailure: a rank raised (its traceback is in the message), exited without a
            result, or the ranks did not all finish within ``timeout`` seconds.
        RuntimeError: called from a test of the ``unit`` tier (:data:`TIER_VARIABLE`).
    """
    if os.environ.get(TIER_VARIABLE) == "unit":
        raise RuntimeError("run_ranks in a test of the unit tier: add its module to DIST in tests/conftest.py")
    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, daemon=True, args=(fn, rank, world_size, store, results, dict(os.environ),
                                                           os.getcwd(), _Output(), args, kwargs))
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        done: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(done) < world_size:
                try:
                    rank, ok, value, when = results.get(timeout=0.2)
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode is not None]
                    if dead:
                        # A result may still be on its way from a rank that has just exited.
                        try:
                            rank, ok, value, when = results.get(timeout=2.0)
                        except queue.Empty:
                            codes = {r: procs[r].exitcode for r in dead}
                            raise RankFailure(f"rank(s) {dead} exited without a result (exit codes {codes})")
                    elif time.monotonic() > deadline:
                        missing = sorted(set(range(world_size)) - set(done))
                        raise RankFailure(f"rank(s) {missing} did not finish within {timeout:.0f} s")
                    else:
                        continue
                if not ok:
                    raise RankFailure(_failures(results, (when, rank, value)))
                done[rank] = torch.load(io.BytesIO(value), weights_only=False)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=10)
    return [done[r] for r in range(world_size)]


class Spawns(dict):
    """Each case's result, spawned the first time a test asks for it and kept for the others:
    one spawn per case, so a case that fails fails the tests that read it, not the module.

    ``spawn(key)`` runs the case (usually :func:`run_ranks`); a failure is kept too, and raised
    again to every test that asks for that case, without spawning it again."""

    def __init__(self, spawn):
        super().__init__()
        self._spawn = spawn
        self._failed: dict = {}

    def __missing__(self, key):
        if key in self._failed:
            raise self._failed[key]
        try:
            value = self._spawn(key)
        except Exception as e:
            self._failed[key] = e
            raise
        self[key] = value
        return value
