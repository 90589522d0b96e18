"""One job per save directory (megatron_rpo.training.lock)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from megatron_rpo.training.lock import LOCK_FILE, SaveDirLock


def _write_lock(save, **holder):
    save.mkdir(parents=True, exist_ok=True)
    (save / LOCK_FILE).write_text(json.dumps(dict({"host": socket.gethostname(), "started": "2026-11-25T10:00:00"},
                                                  **holder)))


def test_a_live_holder_is_named_and_keeps_the_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, pid=holder.pid)
        with pytest.raises(ValueError, match=rf"in use by another training job \(pid {holder.pid} on "
                                             rf"{socket.gethostname()}, started 2026-11-25T10:00:00\)"):
            SaveDirLock(str(tmp_path)).acquire()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _write_lock(tmp_path, pid=gone.pid)
    lock = SaveDirLock(str(tmp_path))
    note = lock.acquire()
    assert note and f"pid {gone.pid}" in note and "is gone" in note
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_holder_on_another_host_is_refused_with_the_file_to_remove(tmp_path):
    _write_lock(tmp_path, host="node-17", pid=4242)
    with pytest.raises(ValueError, match=rf"pid 4242 on node-17.*remove {tmp_path / LOCK_FILE}"):
        SaveDirLock(str(tmp_path)).acquire()


def test_release_never_removes_someone_elses_lock(tmp_path):
    lock = SaveDirLock(str(tmp_path))
    assert lock.acquire() is None
    _write_lock(tmp_path, host="node-17", pid=4242)  # e.g. removed by hand and taken by another job
    lock.release()
    assert (tmp_path / LOCK_FILE).exists()
