"""Packed microbatches against padded ones: the same log-probs, loss, rewards and gradients.

The packed form puts a microbatch's sequences back to back in one row (megatron's ``thd``
layout). Everything per sequence must equal the padded form's, computed independently one
sequence per row, for every parallel layout and contrast scope; and no sequence may see another.
"""

import pytest
import torch

from megatron_rpo.data.packing import packed_length
from tests.multiprocess import run_ranks
from tests.unit.megatron_helpers import SEQ, VOCAB, fill_by_name, make_batch, tiny_config
from tests.unit.training.test_step import _assert_same_gradients, _concat, _train_grads

PROMPTS = [4, 6, 3, 4, 6, 3]
RESPONSES = [8, 5, 11, 10, 3, 6]
LENGTH = packed_length([p + r for p, r in zip(PROMPTS, RESPONSES)], 8)  # 69 tokens -> 72: one pad segment


def _padded(seed):
    return make_batch(PROMPTS, RESPONSES, SEQ, VOCAB, seed=seed)


def _packed(seed):
    return make_batch(PROMPTS, RESPONSES, SEQ, VOCAB, seed=seed, packed_length=LENGTH)


def test_packed_fields_hold_the_padded_sequences():
    padded, packed = _padded(0), _packed(0)
    assert packed["tokens"].shape == (1, LENGTH) and packed["cu_seqlens"][-1] == LENGTH
    bounds = packed["cu_seqlens"]
    for b, (start, end) in enumerate(zip(bounds[:-2], bounds[1:-1])):
        n = PROMPTS[b] + RESPONSES[b]
        assert end - start == n
        assert packed["tokens"][0, start:end].tolist() == padded["tokens"][b, :n].tolist()
        assert packed["position_ids"][0, start:end].tolist() == list(range(n))
        assert packed["loss_mask"][0, start:end].tolist() == padded["loss_mask"][b, :n].tolist()
        assert (packed["sequence_index"][0, start:end] == b).all()
    assert (packed["sequence_index"][0, bounds[-2]:] == len(PROMPTS)).all()  # the padding segment
    assert packed["loss_mask"][0, bounds[-2]:].sum() == 0
    assert packed["max_seqlen"] == max(p + r for p, r in zip(PROMPTS, RESPONSES))


def _logps(tp, batches):
    from megatron.core import parallel_state as ps

    from megatron_rpo import parallel
    from megatron_rpo.models import model_provider
    from megatron_rpo.training.step import sequence_logps

    config = tiny_config(tp=tp)
    parallel.initialize(config.parallel)
    model = model_provider(config)
    fill_by_name(model, VOCAB)
    out = sequence_logps(model, batches)
    return out if ps.get_tensor_model_parallel_rank() == 0 else None


@pytest.mark.parametrize("tp", [1, 2])
def test_packed_log_probs_equal_padded_and_never_cross_a_boundary(tp):
    # Sequence 2 gets other tokens; in the packed row it sits between sequences 1 and 3, which
    # would see it if attention crossed a boundary.
    changed = _packed(0)
    start, end = changed["cu_seqlens"][2], changed["cu_seqlens"][3]
    changed["tokens"][0, start:end] = (changed["tokens"][0, start:end] + 7) % (VOCAB - 1) + 1
    changed["labels"] = torch.roll(changed["tokens"], -1, dims=1)
    (padded, packed, other) = run_ranks(_logps, 1, 1, [_padded(0), _packed(0), changed])[0]
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-5)  # log-probs
    assert packed[1].tolist() == padded[1].tolist()  # response lengths
    keep = [b for b in range(len(PROMPTS)) if b != 2]
    assert other[0][keep].tolist() == packed[0][keep].tolist()  # bitwise: nobody saw sequence 2
    assert other[0][2] != packed[0][2]
    if tp > 1:
        ranks = run_ranks(_logps, tp, tp, [_packed(0)], timeout=240)
        torch.testing.assert_close(ranks[0][0][0], padded[0], rtol=1e-5, atol=1e-5)


RPO = dict(loss_type="rpo", weighting="embedding")


@pytest.mark.parametrize("world,tp,pp,sp,scope", [
    (2, 1, 1, False, "data_parallel"),   # DP=2
    (2, 2, 1, True, "data_parallel"),    # TP=2 with sequence parallelism
    (2, 1, 2, False, "data_parallel"),   # PP=2
    (2, 1, 1, False, "global_batch"),    # gradient caching over DP=2 x 2 microbatches
], ids=["dp2", "tp2-sp", "pp2", "global-batch"])
def test_packed_gradients_equal_padded_one_process(world, tp, pp, sp, scope):
    dp = world // (tp * pp)
    seeds = [[60 + 2 * r, 61 + 2 * r] for r in range(dp)]
    packed = [[_packed(s) for s in mine] for mine in seeds]
    padded = [[_padded(s) for s in mine] for mine in seeds]
    if scope == "global_batch":
        single_batches = [[_concat([mb for mbs in padded for mb in mbs])]]
    else:
        single_batches = [[_concat([mbs[i] for mbs in padded]) for i in range(2)]]
    (single,) = run_ranks(_train_grads, 1, 1, 1, RPO, single_batches, timeout=300)
    loss = dict(RPO, contrast_scope=scope)
    ranks = run_ranks(_train_grads, world, tp, pp, loss, packed, sp=sp, timeout=300)
    reports = _assert_same_gradients(ranks, single)
    want = single["reports"]
    for key in ("loss", "chosen_reward", "rejected_reward", "accuracy", "matrix_rows"):
        torch.testing.assert_close(sum(r[key] for r in reports) / len(reports),
                                   sum(r[key] for r in want) / len(want), rtol=1e-5, atol=1e-6, msg=key)


def _every_loss(batches_by_form):
    from megatron_rpo import parallel
    from megatron_rpo.config import LossConfig
    from megatron_rpo.models import model_provider
    from megatron_rpo.training.step import forward_backward

    config = tiny_config()
    parallel.initialize(config.parallel)
    model = model_provider(config)
    fill_by_name(model, VOCAB)
    out = {}
    for loss_type, extra in [("rpo", {}), ("dpo", {}), ("ipo", {}), ("simpo", dict(beta=2.0)),
                             ("simpo_rpo", dict(beta=2.0, weighting="uniform")), ("sft", {})]:
        loss = LossConfig(loss_type=loss_type, **extra)
        for form, batches in batches_by_form.items():
            out[loss_type, form] = forward_backward(model, batches, loss, forward_only=True)
    return out


def test_every_loss_is_the_same_packed_and_padded():
    out = run_ranks(_every_loss, 1, {"padded": [_padded(70), _padded(71)], "packed": [_packed(70), _packed(71)]})[0]
    for loss_type in ("rpo", "dpo", "ipo", "simpo", "simpo_rpo", "sft"):
        for got, want in zip(out[loss_type, "packed"], out[loss_type, "padded"], strict=True):
            assert want["loss"] > 0
            for key in ("loss", "chosen_reward", "rejected_reward", "reward_margin"):
                torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=f"{loss_type} {key}")
