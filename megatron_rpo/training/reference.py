"""Reference log-probs for every sequence of a dataset, computed once (any TP/PP/DP layout).

The frozen model runs forward only through :func:`megatron_rpo.training.step.sequence_logps`,
the same path as training's online reference, over the dataset in order; microbatches are dealt
round-robin to data-parallel ranks; global rank 0 gathers and writes ``PREFIX.ref``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from megatron_rpo.convert.files import ConvertedCheckpoint
from megatron_rpo.data.dataset import PreferenceDataset, collate_step
from megatron_rpo.data.reference_logps import write_reference_logps
from megatron_rpo.training.step import sequence_logps

__all__ = ["compute_reference_logps"]


@torch.no_grad()
def compute_reference_logps(model, data_prefix: str, *, micro_batch_size: int = 8,
                            checkpoint: str | None = None, progress: bool = True, packing: bool = True,
                            pack_multiple: int = 64, sequence_multiple: int = 1) -> np.ndarray | None:
    """Compute and write ``PREFIX.ref``; returns the [num_sequences] array on global rank 0, else None.

    Args:
        model: the reference model (this rank's part), weights loaded, parallel state initialised.
        data_prefix: the preprocessed dataset.
        micro_batch_size: sequences per forward pass per data-parallel rank.
        checkpoint: recorded in the manifest.
        progress: show a progress bar on global rank 0.
        packing: pack each microbatch into one row (as training does by default) instead of
            padding every sequence to the dataset's ``max_length``; the values are the same.
        pack_multiple: packed rows are padded to a multiple of this many tokens.
        sequence_multiple: each packed sequence is padded to a multiple of this many tokens
            (:attr:`megatron_rpo.config.ParallelConfig.sequence_multiple`, for context parallelism).
    """
    dataset = PreferenceDataset(data_prefix)
    seq_length = dataset.manifest["max_length"]
    n = len(dataset)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    chunks = [list(range(k, min(k + micro_batch_size, n))) for k in range(0, n, micro_batch_size)]
    mine = chunks[dp_rank::dp_size]
    # Every rank runs the same number of passes; the last microbatch is topped up with sequence 0
    # so that every rank has work for each pass.
    rounds = -(-len(chunks) // dp_size)
    results: dict[int, float] = {}
    model.eval()
    bar = tqdm(total=n, unit=" seq", desc="reference log-probs", disable=not progress or dist.get_rank() != 0)
    for r in range(rounds):
        indices = mine[r] if r < len(mine) else []
        padded = indices + [0] * (micro_batch_size - len(indices))
        batches = collate_step(dataset, [padded], seq_length, packing=packing, pack_multiple=pack_multiple,
                               sequence_multiple=sequence_multiple)
        out = sequence_logps(model, batches)
        if out is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
            logps = out[0][0].tolist()
            results.update({i: logps[j] for j, i in enumerate(indices)})
        bar.update(micro_batch_size * dp_size)
    bar.close()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() != 0:
        return None
    merged = {}
    for part in gathered:
        merged.update(part)
    if len(merged) != n:
        raise RuntimeError(f"reference log-probs for {n - len(merged)} of {n} sequences are missing")
    logps = np.array([merged[i] for i in range(n)], dtype=np.float32)
    checkpoint_id = ConvertedCheckpoint(checkpoint).meta.get("checkpoint_id") if checkpoint else None
    write_reference_logps(data_prefix, logps, checkpoint=checkpoint, checkpoint_id=checkpoint_id)
    return logps
