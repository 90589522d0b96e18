"""The supported megatron-core range and what differs across it (megatron_rpo/versions.py)."""

import importlib.metadata
import importlib.util
import os
import re

import pytest

from megatron_rpo import versions
from tests.workspace import REPO


def test_the_range_is_the_one_setup_py_declares():
    with open(os.path.join(REPO, "setup.py")) as f:
        declared = re.findall(r'"megatron-core([^"]*)"', f.read())
    assert declared == [versions.SUPPORTED]


def test_the_installed_release_is_within_the_range():
    from packaging.specifiers import SpecifierSet

    assert versions.megatron_core_version() in SpecifierSet(versions.SUPPORTED)


@pytest.mark.parametrize("version, expected", [("0.16.1", (0, 16)), ("0.19.2", (0, 19)), ("0.20.0rc1", (0, 20)),
                                               ("1.0", (1, 0))])
def test_release_is_major_and_minor(version, expected):
    assert versions.release(version) == expected


def test_a_version_that_is_not_one_is_refused():
    with pytest.raises(ValueError, match="not a megatron-core version: 'nightly'"):
        versions.release("nightly")


def _installed(monkeypatch, version):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version if name == "megatron-core" else real(name))


@pytest.mark.parametrize("written_by, installed, refused", [
    ("0.19.2", "0.16.1", True),    # a newer release's layout (no common.pt)
    ("0.16.1", "0.19.2", False),   # older resumes on newer
    ("0.19.1", "0.19.2", False),
    ("0.19.2", "0.19.1", False),   # patch releases keep the layout
    (None, "0.16.1", False),       # written before versions were recorded: by 0.16.1
])
def test_a_checkpoint_of_a_newer_release_is_refused_naming_both(monkeypatch, written_by, installed, refused):
    _installed(monkeypatch, installed)
    problem = versions.refuse_newer_checkpoint("/runs/a/iter_0000002", written_by)
    if not refused:
        assert problem is None
        return
    assert problem.startswith(f"/runs/a/iter_0000002 was written by megatron-core {written_by}, and this is "
                              f"megatron-core {installed}: ")
    assert f"install megatron-core=={written_by}" in problem and "\n" not in problem


@pytest.mark.parametrize("installed, has_triton, said", [("0.19.2", False, True), ("0.18.2", False, True),
                                                        ("0.19.2", True, False), ("0.16.1", False, False)])
def test_a_missing_triton_is_one_line_naming_the_fix(monkeypatch, installed, has_triton, said):
    _installed(monkeypatch, installed)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (real("os") if has_triton else None) if name == "triton" else real(name, *a))
    message = versions.missing_triton()
    if not said:
        assert message is None
        return
    assert message == (f"megatron-core {installed} imports triton, which is not installed (the CPU build of torch "
                       "does not bring it; CUDA builds do): pip install --no-deps triton")
