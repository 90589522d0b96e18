"""KTO against a float64 transcription of the paper's formula, and its reference point."""

import pytest
import torch

from megatron_rpo.config import LossConfig
from megatron_rpo.loss import kto_loss, kto_reference_point
from megatron_rpo.loss.objective import mismatched_from_batch, preference_loss, sides_from_batch
from tests.unit.loss import reference as ref


def _logratios(M, N, K, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64) * 3 + shift for n in (M, N, K)]


@pytest.mark.parametrize("M,N,K", [(4, 4, 8), (3, 7, 10), (1, 5, 6), (6, 1, 7)])
@pytest.mark.parametrize("beta,lambda_d,lambda_u", [(0.1, 1.0, 1.0), (2.0, 1.33, 0.75)])
@pytest.mark.parametrize("shift", [1.5, -1.5])  # the mismatched mean above 0, and clamped to 0
def test_kto_matches_float64_transcription(M, N, K, beta, lambda_d, lambda_u, shift):
    c, r, kl = _logratios(M, N, K, seed=M * 100 + N, shift=shift)
    want = ref.kto(c.tolist(), r.tolist(), kl.tolist(), beta, lambda_d, lambda_u)
    got = kto_loss(c, r, kl, beta=beta, desirable_weight=lambda_d, undesirable_weight=lambda_u)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-14)
    # float32 inputs compute in float32
    got32 = kto_loss(c.float(), r.float(), kl.float(), beta=beta, desirable_weight=lambda_d,
                     undesirable_weight=lambda_u)
    assert got32.dtype == torch.float32 and got32.item() == pytest.approx(want, rel=1e-5)


def test_reference_point_is_the_clamped_detached_mean():
    kl = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64, requires_grad=True)
    z0 = kto_reference_point(kl)
    assert z0.item() == pytest.approx(0.5) and not z0.requires_grad
    assert kto_reference_point(torch.tensor([-0.5, -2.0])).item() == 0.0
    assert kto_reference_point(torch.zeros(0)).item() == 0.0


def test_gradient_is_the_formulas_and_none_reaches_the_mismatched_pairs():
    c, r, kl = (t.requires_grad_() for t in _logratios(3, 4, 7, seed=5, shift=1.0))
    beta, ld, lu = 0.7, 1.2, 0.9
    kto_loss(c, r, kl, beta=beta, desirable_weight=ld, undesirable_weight=lu).backward()
    z0 = max(0.0, kl.detach().mean().item())
    n = 7
    for x, g in zip(c.tolist(), c.grad.tolist()):  # d/dr of -lambda_D sigmoid(beta (r - z0)) / n
        s = ref.sigmoid(beta * (x - z0))
        assert g == pytest.approx(-ld * beta * s * (1 - s) / n, rel=1e-10)
    for x, g in zip(r.tolist(), r.grad.tolist()):  # d/dr of -lambda_U sigmoid(beta (z0 - r)) / n
        s = ref.sigmoid(beta * (z0 - x))
        assert g == pytest.approx(lu * beta * s * (1 - s) / n, rel=1e-10)
    assert kl.grad is None


def test_kto_errors():
    c, r, kl = _logratios(2, 2, 4, seed=0)
    with pytest.raises(ValueError, match="KTO weights must be > 0"):
        kto_loss(c, r, kl, desirable_weight=0.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        kto_loss(c, r, kl, beta=0.0)
    with pytest.raises(ValueError, match="mismatched_logratios must be 1-D"):
        kto_loss(c, r, kl[None])
    empty = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    loss = kto_loss(empty, empty, kl)
    loss.backward()
    assert loss.item() == 0.0


def test_objective_splits_items_from_mismatched_pairs_and_reports_the_kl():
    # A microbatch of 3 items (2 desirable, 1 undesirable) and their 3 mismatched pairs.
    policy = torch.tensor([-3.0, -4.0, -5.0, -6.0, -2.0, -7.0], dtype=torch.float64)
    refs = torch.tensor([-3.5, -4.5, -4.0, -7.0, -2.5, -6.0], dtype=torch.float64)
    batch = {"is_chosen": torch.tensor([True, True, False, False, False, False]),
             "is_mismatched": torch.tensor([False, False, False, True, True, True]), "ref_logps": refs}
    lengths = torch.tensor([3, 4, 5, 6, 2, 7])
    chosen, rejected = sides_from_batch(batch, policy, lengths)
    mismatched = mismatched_from_batch(batch, policy, lengths)
    assert chosen.policy_logps.tolist() == [-3.0, -4.0] and rejected.policy_logps.tolist() == [-5.0]
    assert mismatched.logratios().tolist() == [1.0, 0.5, -1.0]
    config = LossConfig(loss_type="kto", beta=0.5, kto_desirable_weight=1.2, kto_undesirable_weight=0.8)
    loss, metrics = preference_loss(config, chosen, rejected, paired=False, mismatched=mismatched)
    assert loss.item() == pytest.approx(ref.kto([0.5, 0.5], [-1.0], [1.0, 0.5, -1.0], 0.5, 1.2, 0.8), rel=1e-12)
    assert metrics["kl"].item() == pytest.approx(0.5 / 3)
    assert metrics["chosen_reward"].item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="mismatched pairs"):
        preference_loss(config, chosen, rejected, paired=False)
