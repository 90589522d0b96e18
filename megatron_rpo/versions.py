"""The megatron-core releases we run on, and what differs between them (docs/versions.md).

Torch-free and megatron-free: it reads package metadata only, so it can speak before megatron-core
is imported (triton) and about a checkpoint before any model is built.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

__all__ = ["SUPPORTED", "megatron_core_version", "release", "missing_triton", "refuse_newer_checkpoint"]

SUPPORTED = ">=0.16.1,<0.20"
"""The megatron-core range setup.py declares; CI tests both ends (0.16.1 and 0.19.2)."""
TRITON_FROM = (0, 18)
"""megatron-core imports triton at module level from 0.18 (its MoE paged stash); torch's CPU build
does not bring it."""


def megatron_core_version() -> str | None:
    """The installed megatron-core's version, or None where it is not installed."""
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None


def release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string: "0.19.2" -> (0, 19). Patch releases keep the
    checkpoint layout; releases may not."""
    parts = version.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        raise ValueError(f"not a megatron-core version: {version!r}") from None


def missing_triton() -> str | None:
    """One line naming the fix where the installed megatron-core imports triton and nothing provides
    it (a CPU build of torch, or a fresh Python 3.12 environment); None otherwise."""
    version = megatron_core_version()
    if version is None or release(version) < TRITON_FROM or importlib.util.find_spec("triton") is not None:
        return None
    return (f"megatron-core {version} imports triton, which is not installed (the CPU build of torch does not bring "
            "it; CUDA builds do): pip install --no-deps triton")


def refuse_newer_checkpoint(path: str, written_by: str | None) -> str | None:
    """A sentence refusing the checkpoint ``path``, written by megatron-core ``written_by``, where
    the installed release is older (megatron-core 0.19 moved the checkpoint's shared state into
    its torch_dist files, which 0.16 cannot read); None where it can be read. A checkpoint that
    records no version was written before versions were recorded, by 0.16.1."""
    installed = megatron_core_version()
    if written_by is None or installed is None or release(written_by) <= release(installed):
        return None
    return (f"{path} was written by megatron-core {written_by}, and this is megatron-core {installed}: a checkpoint "
            f"resumes on the release that wrote it or a newer one; install megatron-core=={written_by} (or newer, "
            f"within {SUPPORTED}) to resume it")
