import os
import subprocess

import pytest

from megatron_rpo.publish import StagedDirectory, remove_stale, staging_tag, write_text


def _dead_tag() -> str:
    """A staging tag of this host whose process is gone."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    return staging_tag().rsplit("-", 2)[0] + f"-{dead.pid}-0123abcd"


def test_write_text_replaces_whole_and_a_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "latest"
    write_text(str(path), "iter_0000001\n")
    assert path.read_text() == "iter_0000001\n"

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        write_text(str(path), "iter_0000002\n")
    assert path.read_text() == "iter_0000001\n" and os.listdir(path.parent) == ["latest"]


def test_what_a_dead_process_staged_is_removed_and_a_live_ones_kept(tmp_path):
    final = tmp_path / "out"
    dead_file, dead_dir = tmp_path / f"out{_dead_tag()}", tmp_path / f"out{_dead_tag()}"
    dead_file.write_text("half")
    (dead_dir / "weights").mkdir(parents=True)
    live = tmp_path / f"out{staging_tag()}"
    live.write_text("in progress")
    other_host = tmp_path / "out.tmp-elsewhere-1-0123abcd"
    other_host.write_text("not ours to judge")
    assert sorted(remove_stale(str(final))) == sorted([str(dead_file), str(dead_dir)])
    assert live.exists() and other_host.exists()


def test_a_staged_directory_appears_whole_or_not_at_all(tmp_path):
    with pytest.raises(RuntimeError):
        with StagedDirectory(str(tmp_path / "out")) as tmp:
            open(os.path.join(tmp, "a"), "w").close()
            raise RuntimeError("failed halfway")
    assert os.listdir(tmp_path) == []
    with StagedDirectory(str(tmp_path / "out")) as tmp:
        open(os.path.join(tmp, "a"), "w").close()
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["a"]
    with pytest.raises(ValueError, match="exists and is not empty"):
        StagedDirectory(str(tmp_path / "out"))
