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
