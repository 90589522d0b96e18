"""One job per save directory: ``SAVE/.lock`` names the job that holds it.

Two jobs writing one directory corrupt each other's checkpoints, ``config.yaml`` and TensorBoard
events. The first job creates the lock file exclusively (host, pid, start time); a second one
is refused with the holder's name. A lock whose holder is gone -- the same host, a process id
that no longer runs (a ``kill -9``, a crash) -- is taken over. A holder on another host cannot
be checked from here; the message says which file to remove once that job is known to be gone.
"""

from __future__ import annotations

import datetime
import json
import os
import socket

from megatron_rpo.errors import InputError
from megatron_rpo.publish import process_alive

__all__ = ["SaveDirLock", "LOCK_FILE"]

LOCK_FILE = ".lock"


class SaveDirLock:
    """``acquire()`` on one rank before writing to the save directory; ``release()`` at the end."""

    def __init__(self, save_dir: str):
        self.path = os.path.join(save_dir, LOCK_FILE)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        self.held = False

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or unreadable: treat as held by someone unknown

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a dead holder's lock was taken over.

        Raises:
            ValueError: another live job holds it (named in the message).
        """
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        note = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile
                same_host = holder.get("host") == self.me["host"]
                if same_host and holder.get("pid") == self.me["pid"]:
                    self.held = True  # this process took it earlier (e.g. a second run in one process)
                    return None
                if same_host and isinstance(holder.get("pid"), int) and not process_alive(holder["pid"]):
                    note = (f"took over {self.path} from a job that is gone (pid {holder['pid']} on "
                            f"{holder['host']}, started {holder.get('started')})")
                    try:
                        os.remove(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
                       if holder else "a job whose lock file is unreadable")
                advice = ("" if same_host else
                          f"; if that job is gone (it runs on another host, which cannot be checked from here), "
                          f"remove {self.path}")
                raise InputError(f"{os.path.dirname(self.path)} is in use by another training job ({who}){advice}")
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            self.held = True
            return note
        raise InputError(f"could not take {self.path}: other jobs keep creating it")

    def release(self) -> None:
        if not self.held:
            return
        holder = self._holder()
        if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            os.remove(self.path)
        self.held = False
