"""PreferenceDataset, the paired and unpaired samplers, and collate into the batch contract.

Samplers are deterministic given their seed and the number of samples already consumed, so a
resumed run sees exactly the batches the uninterrupted run would have; each data-parallel rank
takes its own slice of every global batch. A sample is a pair (paired) or an item (unpaired).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_rpo.data.embeddings import load_prompt_embeddings
from megatron_rpo.data.files import read_manifest
from megatron_rpo.data import packing as layout
from megatron_rpo.data.preprocess import MANIFEST_KIND
from megatron_rpo.data.reference_logps import load_reference_logps
from megatron_rpo.errors import InputError

__all__ = ["PreferenceDataset", "PairedSampler", "UnpairedSampler", "collate", "collate_step"]


class PreferenceDataset:
    """A preprocessed dataset with, as asked, its prompt embeddings and reference log-probs.

    Args:
        data_prefix: the prefix given to the preprocessing tool.
        embeddings: load ``PREFIX.emb`` (needed by ``weighting: embedding``).
        reference_logps: load ``PREFIX.ref`` (needed by ``reference: precomputed``).
    """

    def __init__(self, data_prefix: str, *, embeddings: bool = False, reference_logps: bool = False):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = data_prefix
        self.manifest = read_manifest(data_prefix, MANIFEST_KIND)
        self.tokens = IndexedDataset(data_prefix)
        self.meta = np.load(f"{data_prefix}.meta.npy")
        if not len(self.tokens) == len(self.meta) == self.manifest["num_sequences"]:
            raise InputError(f"{data_prefix}: token, metadata and manifest counts disagree")
        self.embeddings = self.embedding_manifest = None
        if embeddings:
            self.embeddings, self.embedding_manifest = load_prompt_embeddings(data_prefix)
        self.ref_logps = load_reference_logps(data_prefix, len(self.meta)) if reference_logps else None

    @property
    def paired(self) -> bool:
        return bool(self.manifest["paired"])

    def __len__(self) -> int:
        return len(self.meta)

    @property
    def chosen_indices(self) -> np.ndarray:
        return np.flatnonzero(self.meta["is_chosen"])

    @property
    def rejected_indices(self) -> np.ndarray:
        return np.flatnonzero(~self.meta["is_chosen"])


@dataclass
class _Sampler:
    micro_batch_size: int
    """Samples (pairs or items) per microbatch per rank."""
    data_parallel_rank: int
    data_parallel_size: int
    seed: int
    consumed_samples: int = 0
    """Samples of all ranks consumed before this sampler starts (resume)."""

    @property
    def global_chunk(self) -> int:
        return self.micro_batch_size * self.data_parallel_size

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        raise NotImplementedError

    def samples_per_epoch(self) -> int:
        return len(self._epoch_order(0)) * self.micro_batch_size

    def __iter__(self):
        """This rank's microbatches (lists of sequence indices), from ``consumed_samples`` on, forever."""
        per_epoch = self.samples_per_epoch()
        if per_epoch == 0:
            raise InputError("the dataset is smaller than one global microbatch")
        consumed = self.consumed_samples
        while True:
            epoch, offset = divmod(consumed, per_epoch)
            order = self._epoch_order(epoch)
            start = offset // self.micro_batch_size + self.data_parallel_rank
            for i in range(start, len(order) - self.data_parallel_size + 1 + self.data_parallel_rank,
                           self.data_parallel_size):
                yield order[i]
            consumed = (epoch + 1) * per_epoch


@dataclass
class PairedSampler(_Sampler):
    """Microbatches of ``micro_batch_size`` pairs: their chosen sequences, then their rejected ones."""

    num_pairs: int = 0

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        g = np.random.default_rng([self.seed, epoch])
        pairs = g.permutation(self.num_pairs)
        n = len(pairs) // self.global_chunk * self.global_chunk  # whole global steps only
        out = []
        for k in range(0, n, self.micro_batch_size):
            chunk = pairs[k : k + self.micro_batch_size]
            out.append([int(2 * p) for p in chunk] + [int(2 * p + 1) for p in chunk])
        return out


@dataclass
class UnpairedSampler(_Sampler):
    """Microbatches of ``micro_batch_size`` items, each holding chosen and rejected items.

    Chosen and rejected items are shuffled separately (pairs of a paired dataset are split, as in
    the paper) and every microbatch takes the same number of each kind, in proportion to their
    counts in the dataset.
    """

    chosen: np.ndarray | None = None
    rejected: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.micro_batch_size < 2:
            raise InputError(f"unpaired microbatches need room for a chosen and a rejected item: "
                             f"micro_batch_size must be >= 2, got {self.micro_batch_size}")
        nc, nr = len(self.chosen), len(self.rejected)
        if nc == 0 or nr == 0:
            raise InputError(f"unpaired training needs chosen and rejected items, got {nc} chosen and {nr} rejected")
        self.per_chosen = min(self.micro_batch_size - 1, max(1, round(self.micro_batch_size * nc / (nc + nr))))
        self.per_rejected = self.micro_batch_size - self.per_chosen

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        g = np.random.default_rng([self.seed, epoch])
        chosen, rejected = g.permutation(self.chosen), g.permutation(self.rejected)
        count = min(len(chosen) // self.per_chosen, len(rejected) // self.per_rejected)
        count = count // self.data_parallel_size * self.data_parallel_size  # whole global steps only
        return [
            [int(i) for i in chosen[k * self.per_chosen : (k + 1) * self.per_chosen]]
            + [int(i) for i in rejected[k * self.per_rejected : (k + 1) * self.per_rejected]]
            for k in range(count)
        ]


def _previous(count: int) -> list[int]:
    """Mismatched pairs: item k's prompt with item k-1's completion (TRL's KTO pairs them so too)."""
    return [(k - 1) % count for k in range(count)]


def _sequences(dataset: PreferenceDataset, indices: list[int], seq_length: int,
               mismatched: bool) -> tuple[list[torch.Tensor], list[int]]:
    """The token ids (cut to ``seq_length``) and prompt lengths of a microbatch's sequences: the
    ``indices``' own, then, with ``mismatched``, one mismatched pair per index (:func:`_previous`)."""
    full = [torch.from_numpy(dataset.tokens[i].astype(np.int64)) for i in indices]
    prompts = [int(n) for n in dataset.meta[indices]["prompt_length"]]
    sequences = [t[:seq_length] for t in full]
    if mismatched:
        sequences += [torch.cat([full[k][: prompts[k]], full[j][prompts[j]:]])[:seq_length]
                      for k, j in enumerate(_previous(len(indices)))]
        prompts = prompts + prompts
    return sequences, prompts


def _lengths(dataset: PreferenceDataset, indices: list[int], seq_length: int, mismatched: bool) -> list[int]:
    """The lengths :func:`_sequences` gives, from the metadata alone."""
    total = dataset.tokens.sequence_lengths[indices].astype(np.int64)
    out = [min(int(n), seq_length) for n in total]
    if mismatched:
        prompts = dataset.meta[indices]["prompt_length"].astype(np.int64)
        out += [min(int(prompts[k] + total[j] - prompts[j]), seq_length)
                for k, j in enumerate(_previous(len(indices)))]
    return out


def collate(dataset: PreferenceDataset, indices: list[int], seq_length: int, pad_id: int = 0, *,
            packed_length: int | None = None, sequence_multiple: int = 1, mismatched: bool = False) -> dict:
    """The batch contract for ``indices`` (chosen sequences first for paired microbatches), on the host.

    Sequences are cut to ``seq_length`` tokens. Without ``packed_length`` every row is
    right-padded to ``seq_length``, so all microbatches have one shape, as pipeline stages need;
    with it the sequences are packed into one row of ``packed_length`` tokens
    (:mod:`megatron_rpo.data.packing`), each padded to a multiple of ``sequence_multiple``.
    ``mismatched`` (KTO's reference point) appends, for each index, its prompt with the previous
    index's completion, marked by ``is_mismatched`` (neither chosen nor of a pair).
    Use :func:`collate_step` for a step's microbatches.
    """
    sequences, prompt_lengths = _sequences(dataset, indices, seq_length, mismatched)
    meta = dataset.meta[indices]
    packed = packed_length is not None
    batch = layout.token_fields(sequences, prompt_lengths, packed=packed,
                                length=packed_length if packed else seq_length, pad_id=pad_id,
                                sequence_multiple=sequence_multiple)
    extra = len(indices) if mismatched else 0
    batch["is_chosen"] = torch.from_numpy(np.concatenate([meta["is_chosen"], np.zeros(extra, bool)]))
    batch["pair_id"] = torch.from_numpy(np.concatenate([meta["pair_id"], np.full(extra, -1, np.int64)]))
    if mismatched:
        batch["is_mismatched"] = torch.arange(2 * extra) >= extra
    if dataset.embeddings is not None:
        prompt_ids = np.concatenate([meta["prompt_id"]] * (2 if mismatched else 1))
        batch["prompt_embedding"] = torch.from_numpy(dataset.embeddings[prompt_ids])
    if dataset.ref_logps is not None:
        if mismatched:
            raise InputError(f"{dataset.prefix}: precomputed reference log-probs do not cover mismatched pairs")
        batch["ref_logps"] = torch.from_numpy(dataset.ref_logps[indices].copy())
    return batch


def collate_step(dataset: PreferenceDataset, microbatches: list[list[int]], seq_length: int, *,
                 packing: bool, pack_multiple: int = 64, sequence_multiple: int = 1,
                 mismatched: bool = False) -> list[dict]:
    """One step's microbatches (lists of sequence indices), all of one shape, on the host.

    Padded: [B, seq_length] rows. Packed: one row per microbatch, as long as the longest
    microbatch of the step needs, rounded up to ``pack_multiple`` (pipeline stages exchange one
    fixed shape per step; sequence parallelism needs a multiple of the tensor-parallel size),
    each sequence padded to a multiple of ``sequence_multiple`` (context parallelism's cut).
    ``mismatched``: see :func:`collate`.
    """
    if not packing:
        return [collate(dataset, indices, seq_length, mismatched=mismatched) for indices in microbatches]
    length = max(layout.packed_length(_lengths(dataset, indices, seq_length, mismatched), pack_multiple,
                                      sequence_multiple)
                 for indices in microbatches)
    return [collate(dataset, indices, seq_length, packed_length=length, sequence_multiple=sequence_multiple,
                    mismatched=mismatched)
            for indices in microbatches]
