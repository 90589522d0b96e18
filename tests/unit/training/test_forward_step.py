"""forward_step + loss_func through megatron's schedules: every TP/PP layout gives the same loss
and the same parameter gradients as one process holding the whole model.

One spawn per case (:class:`tests.multiprocess.Spawns`)."""

import math

import pytest
import torch

from tests.multiprocess import Spawns, run_ranks
from tests.unit.megatron_helpers import SEQ, VOCAB, fill_by_name, full_grads, make_batch, tiny_config

PROMPTS = [4, 6, 3, 4, 6, 3]
RESPONSES = [8, 5, 11, 10, 3, 6]


def _microbatches(n=2):
    return [make_batch(PROMPTS, RESPONSES, SEQ, VOCAB, seed=10 + i) for i in range(n)]


def _step(tp, pp, sp, loss, microbatches):
    from megatron.core import parallel_state as ps

    from megatron_rpo import parallel
    from megatron_rpo.models import model_provider
    from megatron_rpo.training.step import forward_backward

    config = tiny_config(tp=tp, pp=pp, sp=sp, **loss)
    parallel.initialize(config.parallel)
    try:
        model = model_provider(config)
        fill_by_name(model, VOCAB)
        reports = forward_backward(model, microbatches, config.loss)
        grads = full_grads(model, VOCAB)
        return {
            "reports": reports if ps.is_pipeline_last_stage() else None,
            "grads": grads if ps.get_tensor_model_parallel_rank() == 0 else None,
        }
    finally:
        ps.destroy_model_parallel()


def _compare(ranks, single):
    last = [r["reports"] for r in ranks if r["reports"] is not None]
    assert last, "no rank reported a loss"
    for reports in last:
        for got, want in zip(reports, single["reports"], strict=True):
            for key in ("loss", "chosen_reward", "rejected_reward", "accuracy"):
                torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    merged = {}
    for r in ranks:
        merged.update(r["grads"] or {})
    assert merged.keys() == single["grads"].keys()
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in single["grads"].values()))
    for name, want in single["grads"].items():
        # 1e-5 of the whole gradient's norm: fp32 sums in another order, nothing more.
        assert (merged[name] - want).norm() <= 1e-5 * norm, name


LOSSES = {
    "rpo": dict(loss_type="rpo", weighting="embedding"),
    "dpo": dict(loss_type="dpo"),
    "simpo_rpo": dict(loss_type="simpo_rpo", beta=2.0, weighting="uniform", row_normalization="mean"),
}
LAYOUTS = [(2, 1, False, "rpo"), (2, 1, True, "dpo"), (1, 2, False, "rpo"), (1, 2, False, "simpo_rpo"),
           (2, 2, True, "rpo")]
REFERENCE_LAYOUTS = [(1, 1), (2, 2)]


def _run(case: tuple):
    """``("step", tp, pp, sp, loss)`` or ``("reference", tp, pp)``: every rank's result."""
    if case[0] == "step":
        _, tp, pp, sp, loss = case
        return run_ranks(_step, tp * pp, tp, pp, sp, LOSSES[loss], _microbatches(), timeout=600)
    _, tp, pp = case
    return run_ranks(_policy_vs_reference, tp * pp, tp, pp, _microbatches(), timeout=600)


@pytest.fixture(scope="module")
def runs() -> Spawns:
    return Spawns(_run)


@pytest.mark.parametrize("tp,pp,sp,loss_name", LAYOUTS)
def test_loss_and_grads_match_one_process(runs, tp, pp, sp, loss_name):
    (single,) = runs["step", 1, 1, False, loss_name]
    assert single["reports"][0]["loss"] > 0
    _compare(runs["step", tp, pp, sp, loss_name], single)


def _policy_vs_reference(tp, pp, microbatches):
    from megatron.core import parallel_state as ps

    from megatron_rpo import parallel
    from megatron_rpo.models import model_provider
    from megatron_rpo.training.step import forward_backward, sequence_logps

    config = tiny_config(tp=tp, pp=pp, loss_type="rpo", reference="online")
    parallel.initialize(config.parallel)
    try:
        policy, reference = model_provider(config), model_provider(config)
        fill_by_name(policy, VOCAB)
        fill_by_name(reference, VOCAB)
        for mb in microbatches:
            del mb["ref_logps"]  # computed online
        reports = forward_backward(policy, microbatches, config.loss, reference=reference,
                                   forward_only=True)
        ref = sequence_logps(reference, microbatches)
        last = ps.is_pipeline_last_stage()
        return {"ref_logps": [logps for logps, _ in ref] if last else None,
                "reports": reports if last else None}
    finally:
        ps.destroy_model_parallel()


@pytest.mark.parametrize("tp,pp", REFERENCE_LAYOUTS)
def test_policy_equal_to_reference_gives_zero_logratios_and_log2(runs, tp, pp):
    last = [r for r in runs["reference", tp, pp] if r["reports"] is not None]
    assert len(last) == tp
    for r in last:
        assert all(lp.shape == (len(PROMPTS),) and torch.isfinite(lp).all() and (lp < 0).all() for lp in r["ref_logps"])
        for report in r["reports"]:
            assert report["chosen_reward"].item() == 0.0 and report["rejected_reward"].item() == 0.0
            assert report["loss"].item() == pytest.approx(math.log(2.0), abs=1e-7)


def test_missing_reference_logps_is_a_clear_error():
    from megatron_rpo.config import LossConfig
    from megatron_rpo.training.forward_step import preference_loss_func

    batch = make_batch(PROMPTS, RESPONSES, SEQ, VOCAB)
    del batch["ref_logps"]
    with pytest.raises(ValueError, match="needs reference log-probs \\(batch key 'ref_logps'\\)"):
        preference_loss_func(LossConfig(), None, True, batch, torch.zeros(len(PROMPTS), SEQ))
    # Reference-free losses do not need them.
    loss, report = preference_loss_func(LossConfig(loss_type="simpo", beta=2.0), None, True, batch,
                                        -torch.ones(len(PROMPTS), SEQ))
    # Every token log-prob is -1, so every length-normalised SimPO reward is -beta: all ties.
    assert torch.isfinite(loss) and report["accuracy"].item() == 0.5
