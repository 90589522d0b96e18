"""Publishing outputs whole: write aside under a staging name, then ``os.replace`` onto the final
name (atomic), and remove what a killed run left staged.

One staging-name scheme, ``FINAL.tmp-HOST-PID-XXXXXXXX``: the name carries the host and process
id of the run that writes it, so the next run on the same output from the same host removes what
a ``kill -9`` left (its process is gone) and leaves a live run's alone. Every writer of the
package publishes through here: the data tools (:class:`megatron_rpo.data.files.StagedOutputs`,
several files and their manifest), conversion (:class:`StagedDirectory`), the config a run
records and the small files of its checkpoints (:func:`write_text`), the save-directory lock
(:func:`process_alive`). Collective writers, whose ranks must agree on one name before any writes
(a training checkpoint, a run's export), stage under ``FINAL.tmp`` instead and clear it on their
next save of the same name.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import uuid

from megatron_rpo.errors import InputError

__all__ = ["staging_tag", "remove_stale", "process_alive", "write_text", "StagedDirectory"]

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())
_TAG = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def staging_tag() -> str:
    """The suffix this process stages an output under (``.tmp-HOST-PID-XXXXXXXX``), which
    :func:`remove_stale` recognises once this process is gone."""
    return f".tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (someone else's process counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(final: str) -> list[str]:
    """Delete what killed runs on this host left staged for ``final`` (files, or directories of a
    staged directory); returns the removed paths."""
    removed = []
    for path in glob.glob(glob.escape(final) + ".tmp-*"):
        tag = _TAG.search(path[len(final):])
        if tag and tag["host"] == _HOST and not process_alive(int(tag["pid"])):
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def write_text(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` at once: a reader sees the old file or the new one, never a part."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    remove_stale(path)
    tmp = path + staging_tag()
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class StagedDirectory:
    """Write a directory under a staging name; rename it into place on success only (what a failed
    run wrote is deleted; what a killed one left, by the next run on that output from this host)."""

    def __init__(self, final: str):
        self.final = os.path.abspath(final)
        if os.path.exists(self.final) and os.listdir(self.final):
            raise InputError(f"output directory {final} exists and is not empty; choose another or remove it")
        self.tmp = self.final + staging_tag()

    def __enter__(self) -> str:
        remove_stale(self.final)
        os.makedirs(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if os.path.isdir(self.final):
            os.rmdir(self.final)  # empty (checked on entry)
        os.replace(self.tmp, self.final)
