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


def _output_cases(hidden, weight, labels, token_weights):
    """Log-probs and gradients of :func:`output_logprobs` for every (TP, SP, dtype, chunk) case on this
    rank; TP 1 runs on both ranks alike (data-parallel), TP 2 splits the vocabulary (and the
    sequence, with SP) as the model does."""
    from megatron.core import ModelParallelConfig
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from megatron_rpo import parallel
    from megatron_rpo.config import ParallelConfig
    from megatron_rpo.logprobs import output_logprobs

    out = {}
    for tp, sp in [(1, False), (2, False), (2, True)]:
        parallel.initialize(ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp))
        try:
            rank, shard = ps.get_tensor_model_parallel_rank(), weight.shape[0] // tp
            seq_shard = hidden.shape[0] // tp if sp else hidden.shape[0]
            for dtype in (torch.float64, torch.float32):
                config = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp, params_dtype=dtype,
                                             use_cpu_initialization=True)
                layer = ColumnParallelLinear(weight.shape[1], weight.shape[0], config=config, bias=False,
                                             init_method=torch.nn.init.zeros_, gather_output=False, skip_bias_add=True)
                for tied in (False, True):
                    for chunk in (None, 7, 1000):
                        with torch.no_grad():
                            layer.weight.copy_(weight[rank * shard:(rank + 1) * shard])
                        layer.weight.grad = None
                        # tied: the weight comes from elsewhere (the embedding), as GPTModel passes it
                        w = layer.weight.detach().clone().requires_grad_() if tied else None
                        h = hidden[rank * seq_shard:(rank + 1) * seq_shard] if sp else hidden
                        h = h.to(dtype, copy=True).requires_grad_()
                        logps = output_logprobs(layer, h, w, labels, VOCAB, chunk)
                        (logps * token_weights.to(dtype)).sum().backward()
                        with torch.no_grad():
                            no_grad = output_logprobs(layer, h, w, labels, VOCAB, chunk)
                        out[tp, sp, dtype, tied, chunk] = {
                            "logps": logps.detach(), "no_grad": no_grad, "hidden_grad": h.grad,
                            "weight_grad": (w if tied else layer.weight).grad, "rows": (rank * shard, shard),
                            "seq": (rank * seq_shard if sp else 0, seq_shard)}
        finally:
            ps.destroy_model_parallel()
    return out


def test_chunked_output_logprobs_and_gradients_equal_float64_of_whole_logits():
    """``logprob_chunk_tokens``: log-probs, and the gradients of the hidden states and the output
    weight (own or tied), equal a float64 log_softmax of the whole logits at TP 1, TP 2 and TP 2 +
    SP; chunks of 7 tokens do not divide the 2 x 12 tokens, 1000 is one chunk."""
    g = torch.Generator().manual_seed(4)
    seq, rows, hidden_size, padded = 12, 2, 16, 112  # VOCAB = 100 real rows of 112
    hidden = torch.randn(seq, rows, hidden_size, generator=g, dtype=torch.float64)
    weight = torch.randn(padded, hidden_size, generator=g, dtype=torch.float64) * 0.5
    weight[VOCAB:] = 3.0  # padding rows with large logits: must take no probability mass
    labels = torch.randint(0, VOCAB, (rows, seq), generator=g)
    token_weights = torch.randn(rows, seq, generator=g, dtype=torch.float64)
    # The independent computation: whole logits, float64, autograd.
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = torch.einsum("sbh,vh->bsv", h, w)[..., :VOCAB]
    want = torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    (want * token_weights).sum().backward()

    results = run_ranks(_output_cases, 2, hidden, weight, labels, token_weights, timeout=300)
    # megatron's vocab-parallel cross entropy computes in float32 whatever the logits' dtype; with
    # float64 logits only that rounding differs, so chunked and whole agree to float64's precision.
    to_float64 = dict(rtol=1e-5, atol=1e-6)
    to_whole = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}
    for rank in results:
        assert len(rank) == 3 * 2 * 2 * 3
        for (tp, sp, dtype, tied, chunk), got in rank.items():
            case = dict(tp=tp, sp=sp, dtype=dtype, tied=tied, chunk=chunk)
            tol = to_float64
            torch.testing.assert_close(got["logps"].double(), want.detach(), **tol, msg=lambda m: f"{case}: {m}")
            torch.testing.assert_close(got["no_grad"], got["logps"], rtol=0, atol=0)
            start, n = got["seq"]
            torch.testing.assert_close(got["hidden_grad"].double(), h.grad[start:start + n], **tol,
                                       msg=lambda m: f"{case} hidden grad: {m}")
            start, n = got["rows"]
            grad = got["weight_grad"].double()
            torch.testing.assert_close(grad, w.grad[start:start + n], **tol, msg=lambda m: f"{case} weight grad: {m}")
            assert (grad[max(0, VOCAB - start):] == 0).all()  # vocabulary padding rows get none
            # chunked equals unchunked, in the dtype
            whole = rank[tp, sp, dtype, tied, None]
            for key in ("logps", "hidden_grad", "weight_grad"):
                torch.testing.assert_close(got[key], whole[key], **to_whole[dtype], msg=lambda m: f"{case} {key}: {m}")
