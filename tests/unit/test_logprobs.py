"""Per-sequence log-probs from vocab-parallel logits, checked against a float64 log_softmax."""

import pytest
import torch

from tests.multiprocess import run_ranks
from tests.unit.megatron_helpers import SEQ, VOCAB, fill_by_name, make_batch, tiny_config

PROMPTS, RESPONSES = [5, 3, 7, 5, 3, 7], [9, 12, 4, 6, 15, 2]


def _logps(tp, sp, batch):
    from megatron_rpo import parallel
    from megatron_rpo.logprobs import sequence_logprobs, token_logprobs
    from megatron_rpo.models import model_provider

    config = tiny_config(tp=tp, sp=sp)
    parallel.initialize(config.parallel)
    model = model_provider(config)
    fill_by_name(model, VOCAB)
    logits = model(batch["tokens"], batch["position_ids"], None)  # [b, s, V_pad / tp]
    kept = logits.detach().clone()
    logps, counts = sequence_logprobs(token_logprobs(logits, batch["labels"], VOCAB), batch["loss_mask"])
    return {"logps": logps, "counts": counts, "logits": kept, "shard": kept.shape[-1]}


def _float64_reference(logits, batch):
    """log_softmax over the real vocabulary of whole logits, summed over response positions."""
    logp = torch.log_softmax(logits[..., :VOCAB].double(), dim=-1)
    picked = logp.gather(-1, batch["labels"][..., None]).squeeze(-1)
    return (picked * batch["loss_mask"].double()).sum(dim=1)


@pytest.mark.parametrize("sp", [False, True])
def test_tp2_logprobs_equal_float64_log_softmax_of_one_process(sp):
    batch = make_batch(PROMPTS, RESPONSES, SEQ, VOCAB, seed=1)
    (single,) = run_ranks(_logps, 1, 1, False, batch)
    want = _float64_reference(single["logits"], batch)
    torch.testing.assert_close(single["logps"].double(), want, rtol=1e-6, atol=1e-5)
    assert single["counts"].tolist() == RESPONSES
    for rank in run_ranks(_logps, 2, 2, sp, batch):
        assert rank["shard"] == 56  # 100 rounded up to 8 x 2 = 112, split in two: never the whole vocabulary
        torch.testing.assert_close(rank["logps"].double(), want, rtol=1e-5, atol=1e-4)


def _padding_checks():
    from megatron_rpo import parallel
    from megatron_rpo.logprobs import sequence_logprobs, token_logprobs
    from megatron_rpo.models import model_provider

    config = tiny_config()
    parallel.initialize(config.parallel)
    model = model_provider(config)
    fill_by_name(model, VOCAB)

    def logps(b):
        out = model(b["tokens"], b["position_ids"], None)
        return sequence_logprobs(token_logprobs(out, b["labels"], VOCAB), b["loss_mask"])[0]

    batch = make_batch(PROMPTS, RESPONSES, SEQ, VOCAB, seed=2)
    base = logps(batch)
    # Other padding tokens after each sequence.
    noisy = {k: v.clone() for k, v in batch.items()}
    for b, n in enumerate(p + r for p, r in zip(PROMPTS, RESPONSES)):
        noisy["tokens"][b, n:] = torch.randint(1, VOCAB, (SEQ - n,))
    noisy["labels"] = torch.roll(noisy["tokens"], -1, dims=1)
    padded_tokens = logps(noisy)
    # Other labels at prompt positions: the prompt's own log-probs are not counted.
    relabelled = {k: v.clone() for k, v in batch.items()}
    relabelled["labels"][relabelled["loss_mask"] == 0] = 7
    prompt_labels = logps(relabelled)
    # Each sequence alone, unpadded, with a batch of one.
    alone = []
    for b, n in enumerate(p + r for p, r in zip(PROMPTS, RESPONSES)):
        one = {k: v[b : b + 1, :n] if v.dim() == 2 else v[b : b + 1] for k, v in batch.items()}
        one["labels"] = batch["labels"][b : b + 1, :n].clone()
        alone.append(logps(one)[0])
    return base, padded_tokens, prompt_labels, torch.stack(alone)


def test_prompt_and_padding_do_not_change_logprobs_and_lengths_mix():
    (result,) = run_ranks(_padding_checks, 1)
    base, padded_tokens, prompt_labels, alone = result
    torch.testing.assert_close(padded_tokens, base, rtol=1e-6, atol=1e-5)
    assert torch.equal(prompt_labels, base)
    torch.testing.assert_close(alone, base, rtol=1e-6, atol=1e-5)


def _logit_grads(tp, logits_full, labels, mask):
    from megatron.core import parallel_state as ps

    from megatron_rpo import parallel
    from megatron_rpo.config import ParallelConfig
    from megatron_rpo.logprobs import sequence_logprobs, token_logprobs

    parallel.initialize(ParallelConfig(tensor_model_parallel_size=tp))
    shard = logits_full.shape[-1] // tp
    rank = ps.get_tensor_model_parallel_rank()
    logits = logits_full[..., rank * shard:(rank + 1) * shard].clone().requires_grad_()
    logps, _ = sequence_logprobs(token_logprobs(logits, labels, VOCAB), mask)
    (logps * torch.arange(1.0, 1.0 + len(logps))).sum().backward()  # distinct weight per sequence
    return logits.grad


@pytest.mark.parametrize("tp", [1, 2])
def test_gradients_equal_float64_and_vanish_on_vocabulary_padding(tp):
    g = torch.Generator().manual_seed(3)
    padded = 104  # a multiple of 8 x TP above VOCAB = 100: four padding columns
    logits = torch.randn(3, 10, padded, generator=g) * 2.0
    logits[..., VOCAB:] = 30.0  # would swamp the softmax if the padding were not masked
    labels = torch.randint(0, VOCAB, (3, 10), generator=g)
    mask = (torch.rand(3, 10, generator=g) < 0.7).float()
    shards = run_ranks(_logit_grads, tp, tp, logits, labels, mask, timeout=120)
    got = torch.cat(shards, dim=-1)
    leaf = logits.double().requires_grad_()
    picked = torch.log_softmax(leaf[..., :VOCAB], dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    ((picked * mask.double()).sum(dim=1) * torch.arange(1.0, 4.0, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(got.double(), leaf.grad, rtol=1e-5, atol=1e-6)
    assert (got[..., VOCAB:] == 0).all()
