import itertools
import json

import numpy as np
import pytest
import torch

from megatron_rpo.data.dataset import PairedSampler, PreferenceDataset, UnpairedSampler, collate, collate_step
from megatron_rpo.data.embeddings import precompute_prompt_embeddings
from megatron_rpo.data.preprocess import preprocess
from megatron_rpo.data.reference_logps import write_reference_logps
from megatron_rpo.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def dataset_prefix(tmp_path_factory, hh_slice, sp_tokenizer):
    prefix = str(tmp_path_factory.mktemp("ds") / "hh")
    preprocess([hh_slice], "hh", sp_tokenizer, prefix, max_prompt_length=64, max_length=128, progress=False)
    precompute_prompt_embeddings(prefix, progress=False)
    return prefix


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_paired_sampler_is_deterministic_sharded_and_resumable():
    def sampler(rank, consumed=0, seed=7):
        return PairedSampler(micro_batch_size=3, data_parallel_rank=rank, data_parallel_size=2, seed=seed,
                             consumed_samples=consumed, num_pairs=40)

    a, b = _take(sampler(0), 12), _take(sampler(0), 12)
    assert a == b and a != _take(sampler(0, seed=8), 12)
    # Each microbatch: chosen sequences (even) then their rejected partners (odd).
    for mb in a:
        assert [i % 2 for i in mb] == [0, 0, 0, 1, 1, 1] and [i + 1 for i in mb[:3]] == mb[3:]
    # Ranks take disjoint halves of each global microbatch; one epoch covers 36 of the 40 pairs once.
    r0, r1 = _take(sampler(0), 6), _take(sampler(1), 6)
    pairs = [i // 2 for mb in r0 + r1 for i in mb[:3]]
    assert len(pairs) == len(set(pairs)) == 36
    # Resuming after 4 global microbatches (24 pairs) continues exactly where the full run was.
    assert _take(sampler(1, consumed=24), 8) == _take(sampler(1), 12)[4:]
    # The next epoch is shuffled differently and resumes across the boundary too.
    assert _take(sampler(0), 12)[6:] != r0
    assert _take(sampler(0, consumed=36), 3) == _take(sampler(0), 9)[6:]


def test_unpaired_sampler_puts_both_kinds_in_every_microbatch():
    chosen, rejected = np.arange(0, 60, 2), np.arange(1, 41, 2)  # 30 chosen, 20 rejected
    s = UnpairedSampler(micro_batch_size=5, data_parallel_rank=0, data_parallel_size=1, seed=1, chosen=chosen,
                        rejected=rejected)
    batches = _take(s, 6)
    for mb in batches:
        kinds = [i % 2 == 0 for i in mb]
        assert kinds == [True, True, True, False, False]  # 3:2 like the data
    seen = [i for mb in batches for i in mb]
    assert len(seen) == len(set(seen))
    with pytest.raises(ValueError, match="micro_batch_size must be >= 2, got 1"):
        UnpairedSampler(micro_batch_size=1, data_parallel_rank=0, data_parallel_size=1, seed=1, chosen=chosen,
                        rejected=rejected)
    with pytest.raises(ValueError, match="got 30 chosen and 0 rejected"):
        UnpairedSampler(micro_batch_size=2, data_parallel_rank=0, data_parallel_size=1, seed=1, chosen=chosen,
                        rejected=rejected[:0])


def test_collate_follows_the_batch_contract(dataset_prefix, sp_tokenizer):
    ds = PreferenceDataset(dataset_prefix, embeddings=True)
    tok = load_tokenizer(sp_tokenizer)
    (indices,) = _take(PairedSampler(micro_batch_size=2, data_parallel_rank=0, data_parallel_size=1, seed=0,
                                     num_pairs=ds.manifest["num_pairs"]), 1)
    batch = collate(ds, indices, seq_length=128, pad_id=tok.eos_id)
    assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (4, 128)
    assert batch["is_chosen"].tolist() == [True, True, False, False]
    assert batch["pair_id"][:2].tolist() == batch["pair_id"][2:].tolist()
    assert batch["prompt_embedding"].shape == (4, 384)
    assert (batch["prompt_embedding"][:2] == batch["prompt_embedding"][2:]).all()
    for b, index in enumerate(indices):
        ids = ds.tokens[index].tolist()
        plen = int(ds.meta["prompt_length"][index])
        scored = batch["labels"][b][batch["loss_mask"][b].bool()].tolist()
        assert scored == ids[plen:]  # exactly the response tokens, eos included
    assert "ref_logps" not in batch


@pytest.mark.parametrize("packed", [False, True])
def test_mismatched_pairs_are_each_prompt_with_the_previous_items_completion(dataset_prefix, packed):
    # KTO's reference point: item k's prompt, then item k-1's response, scored on that response only.
    ds = PreferenceDataset(dataset_prefix, embeddings=True)
    (indices,) = _take(UnpairedSampler(micro_batch_size=3, data_parallel_rank=0, data_parallel_size=1, seed=0,
                                       chosen=ds.chosen_indices, rejected=ds.rejected_indices), 1)
    (batch,) = collate_step(ds, [indices], 128, packing=packed, pack_multiple=8, mismatched=True)
    assert batch["is_mismatched"].tolist() == [False] * 3 + [True] * 3
    assert batch["is_chosen"][3:].tolist() == [False] * 3 and batch["pair_id"][3:].tolist() == [-1] * 3
    meta = ds.meta[indices]
    assert (batch["prompt_embedding"][3:] == batch["prompt_embedding"][:3]).all()  # each item's own prompt
    owner = batch["sequence_index"][0] if packed else torch.arange(6)[:, None].expand(6, 128)
    tokens = batch["tokens"].reshape(-1)
    labels, mask = batch["labels"].reshape(-1), batch["loss_mask"].reshape(-1).bool()
    for k in range(3):
        j = (k - 1) % 3
        prompt = ds.tokens[indices[k]][: int(meta["prompt_length"][k])].tolist()
        response = ds.tokens[indices[j]][int(meta["prompt_length"][j]):].tolist()
        mine = owner.reshape(-1) == 3 + k
        assert tokens[mine].tolist()[: len(prompt) + len(response)] == prompt + response
        assert labels[mine & mask].tolist() == response
    with pytest.raises(ValueError, match="do not cover mismatched pairs"):
        ds.ref_logps = np.zeros(len(ds), np.float32)
        collate(ds, indices, 128, mismatched=True)


def test_reference_logps_are_aligned_and_checked(dataset_prefix, tmp_path):
    ds = PreferenceDataset(dataset_prefix)
    values = -np.arange(len(ds), dtype=np.float32)
    write_reference_logps(dataset_prefix, values, checkpoint="ckpt")
    ds = PreferenceDataset(dataset_prefix, embeddings=True, reference_logps=True)
    batch = collate(ds, [4, 9, 5, 8], seq_length=128)
    assert batch["ref_logps"].tolist() == [-4.0, -9.0, -5.0, -8.0]
    write_reference_logps(dataset_prefix, values[:-1], checkpoint="ckpt")
    with pytest.raises(ValueError, match=r"holds \(479,\) values, the dataset has 480 sequences"):
        PreferenceDataset(dataset_prefix, reference_logps=True)


def test_missing_embeddings_are_a_clear_error(tmp_path, sp_tokenizer):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    preprocess([str(src)], "pairs", sp_tokenizer, str(tmp_path / "d"), progress=False)
    with pytest.raises(ValueError, match=r"d.emb.manifest.json not found"):
        PreferenceDataset(str(tmp_path / "d"), embeddings=True)


def test_missing_reference_logps_name_the_tool_and_the_online_reference(tmp_path, sp_tokenizer):
    # Issue 31 item 8: the message asked whether the prefix was a dataset written by our tools.
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    preprocess([str(src)], "pairs", sp_tokenizer, str(tmp_path / "d"), progress=False)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'd'} has no precomputed reference log-probs .*: run "
                                         rf"tools/precompute_reference_logps.py --load CHECKPOINT --data-prefix "
                                         rf"{tmp_path / 'd'}, or train with loss.reference=online"):
        PreferenceDataset(str(tmp_path / "d"), reference_logps=True)
