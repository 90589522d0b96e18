"""One contrast matrix across data-parallel ranks and microbatches (DESIGN 3).

The defining checks: after megatron DDP's gradient averaging, a DP=2 or DP=4 run has the
gradient of one process running the concatenated batch; ``global_batch`` over several
microbatches equals one microbatch holding the whole batch; both compose with TP and PP.
"""

import pytest
import torch

from tests.multiprocess import Spawns, run_ranks
from tests.unit.megatron_helpers import SEQ, VOCAB, fill_by_name, full_grads, make_batch, tiny_config

PROMPTS = [4, 6, 3, 4, 6, 3]
RESPONSES = [8, 5, 11, 10, 3, 6]


def _paired(seed):
    return make_batch(PROMPTS, RESPONSES, SEQ, VOCAB, seed=seed)


def _unpaired(seed, is_chosen):
    batch = make_batch(PROMPTS, RESPONSES, SEQ, VOCAB, seed=seed, paired=False)
    batch["is_chosen"] = torch.tensor(is_chosen)
    return batch


def _concat(microbatches):
    """One microbatch holding the rows of all, in order (sides keep their order when split)."""
    return {k: torch.cat([mb[k] for mb in microbatches]) for k in microbatches[0]}


def _train_grads(tp, pp, loss, per_rank, sp=False, paired=True):
    """Gradients after forward_backward + DDP's finalize; per_rank[dp_rank] are that rank's microbatches."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_rpo import parallel
    from megatron_rpo.models import model_provider
    from megatron_rpo.training.step import forward_backward

    config = tiny_config(tp=tp, pp=pp, sp=sp, **loss)
    parallel.initialize(config.parallel)
    try:
        module = model_provider(config)
        fill_by_name(module, VOCAB)
        model = DistributedDataParallel(module.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                        module)
        model.zero_grad_buffer()
        microbatches = per_rank[ps.get_data_parallel_rank()]
        reports = forward_backward(model, microbatches, config.loss, paired=paired)
        finalize_model_grads([model])
        grads = full_grads(module, VOCAB, finalized=True)
        lead = ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0
        return {"grads": grads if lead else None,
                "reports": reports if lead and ps.is_pipeline_last_stage() else None}
    finally:
        ps.destroy_model_parallel()  # the process group stays for the next case


def _assert_same_gradients(ranks, single):
    merged = {}
    for r in ranks:
        merged.update(r["grads"] or {})
    want = single["grads"]
    assert merged.keys() == want.keys()
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in want.values()))
    assert norm > 0
    for name, g in want.items():
        assert (merged[name] - g).norm() <= 1e-5 * norm, name
    (reports,) = [r["reports"] for r in ranks if r["reports"] is not None]
    return reports


RPO = dict(loss_type="rpo", weighting="embedding")
DP_LOSSES = [(2, RPO), (2, dict(loss_type="rpo", weighting="diagonal", alpha=0.6)),
             (4, dict(loss_type="rpo", weighting="uniform", row_normalization="mean"))]
COMPOSE = [(1, 1, "global_batch"), (2, 1, "data_parallel"), (1, 2, "global_batch")]


def _cases() -> dict:
    """name -> (world, tp, pp, loss, per-rank microbatches, paired): every run the tests below compare."""
    cases = {}
    for i, (world, loss) in enumerate(DP_LOSSES):
        per_rank = [[_paired(10 + r)] for r in range(world)]
        cases[f"dp{i}"] = (world, 1, 1, loss, per_rank, True)
        cases[f"dp{i}_single"] = (1, 1, 1, loss, [[_concat([mbs[0] for mbs in per_rank])]], True)
    unpaired = [[_unpaired(20, [True] * 6)],  # rank 0: no rejected item
                [_unpaired(21, [False, False, True, False, False, False])]]
    cases["unpaired"] = (2, 1, 1, dict(RPO, tau=0.75), unpaired, False)
    cases["unpaired_single"] = (1, 1, 1, dict(RPO, tau=0.75), [[_concat([p[0] for p in unpaired])]], False)
    cases["local"] = (2, 1, 1, dict(RPO, contrast_scope="local"), [[_paired(30 + r)] for r in range(2)], True)
    microbatches = [_paired(40 + i) for i in range(4)]
    cases["big"] = (1, 1, 1, RPO, [[_concat(microbatches)]], True)
    cases["cached"] = (1, 1, 1, dict(RPO, contrast_scope="global_batch"), [microbatches], True)
    for tp, pp, scope in COMPOSE:
        per_rank = [[_paired(50 + 2 * r), _paired(51 + 2 * r)] for r in range(2)]
        if scope == "global_batch":
            # The whole global batch is one matrix: one microbatch with every rank's rows.
            single_batches = [[_concat([mb for mbs in per_rank for mb in mbs])]]
        else:
            # Microbatch i's matrix spans microbatch i of every rank.
            single_batches = [[_concat([mbs[i] for mbs in per_rank]) for i in range(2)]]
        cases[f"compose_{tp}_{pp}_{scope}"] = (2 * tp * pp, tp, pp, dict(RPO, contrast_scope=scope), per_rank, True)
        cases[f"compose_{tp}_{pp}_{scope}_single"] = (1, 1, 1, RPO, single_batches, True)
    return cases


CASES = _cases()


def _one(tp, pp, loss, per_rank, paired) -> dict:
    return _train_grads(tp, pp, loss, per_rank, paired=paired)


@pytest.fixture(scope="module")
def runs() -> Spawns:
    """name -> every rank's result, one spawn per case."""
    return Spawns(lambda name: run_ranks(_one, CASES[name][0], *CASES[name][1:], timeout=600))


@pytest.mark.parametrize("case", range(len(DP_LOSSES)))
def test_data_parallel_gradient_equals_one_process_on_the_concatenated_batch(runs, case):
    (single,) = runs[f"dp{case}_single"]
    reports = _assert_same_gradients(runs[f"dp{case}"], single)
    assert reports[0]["matrix_rows"].item() == 3 * DP_LOSSES[case][0]
    torch.testing.assert_close(reports[0]["loss"], single["reports"][0]["loss"])


def test_unpaired_ranks_without_chosen_or_rejected_items_get_the_exact_global_gradient(runs):
    (single,) = runs["unpaired_single"]
    reports = _assert_same_gradients(runs["unpaired"], single)
    assert (reports[0]["matrix_rows"].item(), reports[0]["matrix_cols"].item()) == (7, 5)


def test_local_scope_builds_one_matrix_per_rank(runs):
    (reports,) = [r["reports"] for r in runs["local"] if r["reports"] is not None]
    assert reports[0]["matrix_rows"].item() == 3


def test_global_batch_over_four_microbatches_equals_one_big_microbatch(runs):
    (big,), cached = runs["big"], runs["cached"]
    reports = _assert_same_gradients(cached, big)
    assert reports[0]["matrix_rows"].item() == 12
    torch.testing.assert_close(reports[0]["loss"], big["reports"][0]["loss"])


@pytest.mark.parametrize("tp,pp,scope", COMPOSE)
def test_data_parallel_and_global_batch_compose_with_tp_and_pp(runs, tp, pp, scope):
    (single,) = runs[f"compose_{tp}_{pp}_{scope}_single"]
    _assert_same_gradients(runs[f"compose_{tp}_{pp}_{scope}"], single)
