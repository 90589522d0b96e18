"""Precomputed reference log-probs: one float32 per sequence of a preprocessed dataset.

Files ``PREFIX.ref.npy`` and ``PREFIX.ref.manifest.json`` (the reference checkpoint, the hash of
the dataset manifest). Computed by ``tools/precompute_reference_logps.py`` through the same
log-prob code path as training; training with ``loss.reference: precomputed`` reads them and
never builds the reference model.
"""

from __future__ import annotations

import os

import numpy as np

from megatron_rpo.data.files import StagedOutputs, manifest_path, read_manifest
from megatron_rpo.data.tokenizer import file_sha256
from megatron_rpo.errors import InputError

__all__ = ["REFERENCE_KIND", "reference_prefix", "write_reference_logps", "load_reference_logps"]

REFERENCE_KIND = "reference_logps"


def reference_prefix(data_prefix: str) -> str:
    return f"{data_prefix}.ref"


def write_reference_logps(data_prefix: str, logps: np.ndarray, *, checkpoint: str | None,
                          checkpoint_id: str | None = None) -> dict:
    """Write one float32 per sequence (staged, then renamed) and its manifest, which names the
    reference checkpoint by path and by the ``checkpoint_id`` its conversion gave it."""
    prefix = reference_prefix(data_prefix)
    with StagedOutputs() as staged:
        with open(staged.path(f"{prefix}.npy"), "wb") as f:
            np.save(f, np.asarray(logps, dtype=np.float32))
        manifest = {
            "kind": REFERENCE_KIND,
            "version": 1,
            "checkpoint": checkpoint,
            "checkpoint_id": checkpoint_id,
            "num_sequences": int(len(logps)),
            "dataset_manifest_sha256": file_sha256(manifest_path(data_prefix)),
            "files": [staged.describe(f"{prefix}.npy")],
        }
        staged.write_manifest(prefix, manifest)
    return manifest


def load_reference_logps(data_prefix: str, num_sequences: int) -> np.ndarray:
    """The [num_sequences] float32 reference log-probs of a dataset.

    Raises:
        ValueError: missing, for another version of the dataset, or of the wrong length.
    """
    prefix = reference_prefix(data_prefix)
    if not os.path.exists(manifest_path(prefix)):
        raise InputError(f"{data_prefix} has no precomputed reference log-probs ({manifest_path(prefix)} not found): "
                         f"run tools/precompute_reference_logps.py --load CHECKPOINT --data-prefix {data_prefix}, "
                         "or train with loss.reference=online")
    manifest = read_manifest(prefix, REFERENCE_KIND)
    if manifest["dataset_manifest_sha256"] != file_sha256(manifest_path(data_prefix)):
        raise InputError(
            f"{manifest_path(prefix)} was computed for another version of {data_prefix!r}; "
            "rerun tools/precompute_reference_logps.py"
        )
    logps = np.load(f"{prefix}.npy")
    if logps.shape != (num_sequences,):
        raise InputError(f"{prefix}.npy holds {logps.shape} values, the dataset has {num_sequences} sequences")
    return logps
