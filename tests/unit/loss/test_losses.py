import math

import pytest
import torch

from megatron_rpo.loss import dpo_loss, ipo_loss, rpo_loss, simpo_loss, simpo_rpo_loss
from tests.unit.loss import reference as ref


def _data(M, N, D=8, seed=0, dtype=torch.float64, paired=False):
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randn(M, generator=g, dtype=dtype) * 3
    rejected = torch.randn(N, generator=g, dtype=dtype) * 3
    ce = torch.randn(M, D, generator=g, dtype=dtype)
    re = ce.clone() if paired else torch.randn(N, D, generator=g, dtype=dtype)
    return chosen, rejected, ce, re


CASES = [
    # (M, N, paired, weighting, row_normalization)
    (5, 5, True, "embedding", "sum"),
    (5, 5, True, "embedding", "mean"),
    (5, 5, True, "uniform", "sum"),
    (5, 5, True, "uniform", "mean"),
    (5, 5, True, "diagonal", "sum"),
    (5, 5, True, "diagonal", "mean"),
    (1, 1, True, "diagonal", "sum"),
    (4, 7, False, "embedding", "sum"),
    (4, 7, False, "embedding", "mean"),
    (7, 3, False, "uniform", "sum"),
    (7, 3, False, "uniform", "mean"),
]


@pytest.mark.parametrize("M,N,paired,weighting,norm", CASES)
@pytest.mark.parametrize("beta,tau,alpha", [(0.1, 0.5, 0.8), (2.5, 0.75, 0.3)])
def test_rpo_matches_float64_transcription(M, N, paired, weighting, norm, beta, tau, alpha):
    c, r, ce, re = _data(M, N, paired=paired)
    got = rpo_loss(c, r, ce, re, beta=beta, weighting=weighting, tau=tau, alpha=alpha, row_normalization=norm)
    want = ref.rpo(c.tolist(), r.tolist(), ce.tolist(), re.tolist(), beta, weighting, tau, alpha, norm)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert got.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("M,N,paired,weighting,norm", CASES)
def test_simpo_rpo_matches_float64_transcription(M, N, paired, weighting, norm):
    c, r, ce, re = _data(M, N, paired=paired, seed=1)
    c, r = -c.abs() * 10, -r.abs() * 10  # log-probs are negative
    lc = torch.arange(1, M + 1, dtype=torch.long) + 3
    lr = torch.arange(1, N + 1, dtype=torch.long) * 2
    got = simpo_rpo_loss(c, r, lc, lr, ce, re, beta=2.0, gamma=0.5, weighting=weighting, row_normalization=norm)
    want = ref.simpo_rpo(c.tolist(), r.tolist(), lc.tolist(), lr.tolist(), ce.tolist(), re.tolist(),
                         2.0, 0.5, weighting, 0.5, 0.8, norm)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_float32_inputs_agree_with_float64_transcription():
    c, r, ce, re = _data(6, 6, paired=False, dtype=torch.float32)
    got = rpo_loss(c, r, ce, re)
    assert got.dtype == torch.float32
    want = ref.rpo(c.tolist(), r.tolist(), ce.tolist(), re.tolist(), 0.1, "embedding", 0.5, 0.8, "sum")
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_bf16_inputs_get_float32_weights_and_loss():
    c, r, ce, re = _data(8, 8, dtype=torch.bfloat16)
    got = rpo_loss(c, r, ce, re)
    assert got.dtype == torch.float32
    # Weights from the bf16-rounded embeddings, but computed in float32 (not in bf16).
    want = ref.rpo(c.float().tolist(), r.float().tolist(), ce.float().tolist(), re.float().tolist(),
                   0.1, "embedding", 0.5, 0.8, "sum")
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_dpo_ipo_simpo_match_float64_transcription():
    c, r, _, _ = _data(6, 6, seed=3)
    assert dpo_loss(c, r, beta=0.3).item() == pytest.approx(ref.dpo(c.tolist(), r.tolist(), 0.3), rel=1e-6)
    assert ipo_loss(c, r, beta=0.3).item() == pytest.approx(ref.ipo(c.tolist(), r.tolist(), 0.3), rel=1e-6)
    lp_c, lp_r = -c.abs() * 20, -r.abs() * 20
    lc, lr = torch.tensor([3, 5, 7, 9, 11, 2]), torch.tensor([4, 4, 4, 8, 8, 1])
    want = ref.simpo(lp_c.tolist(), lp_r.tolist(), lc.tolist(), lr.tolist(), 2.0, 0.5)
    assert simpo_loss(lp_c, lp_r, lc, lr, beta=2.0, gamma=0.5).item() == pytest.approx(want, rel=1e-6)


def test_dpo_is_the_diagonal_special_case():
    c, r, ce, re = _data(5, 5, paired=True, seed=4)
    beta = 0.7
    # Each pair alone is a 1 x 1 matrix whose single weight is 1, whatever the weighting.
    for weighting in ("embedding", "uniform", "diagonal"):
        per_pair = torch.stack([
            rpo_loss(c[i:i + 1], r[i:i + 1], ce[i:i + 1], re[i:i + 1], beta=beta, weighting=weighting)
            for i in range(5)
        ])
        assert per_pair.mean().item() == pytest.approx(dpo_loss(c, r, beta=beta).item(), rel=1e-12)
    # Diagonal weighting with alpha = 1: the off-diagonal cells are log 2 each.
    M = 5
    full = rpo_loss(c, r, beta=beta, weighting="diagonal", alpha=1.0).item()
    dpo_from_matrix = (full * M * M - (M * M - M) * math.log(2.0)) / M
    assert dpo_from_matrix == pytest.approx(dpo_loss(c, r, beta=beta).item(), rel=1e-9)


def test_simpo_is_simpo_rpo_on_single_pairs():
    lp_c, lp_r = torch.tensor([-10.0, -4.0], dtype=torch.float64), torch.tensor([-12.0, -3.0], dtype=torch.float64)
    lc, lr = torch.tensor([5, 2]), torch.tensor([6, 3])
    per_pair = torch.stack([
        simpo_rpo_loss(lp_c[i:i + 1], lp_r[i:i + 1], lc[i:i + 1], lr[i:i + 1], weighting="uniform")
        for i in range(2)
    ])
    assert per_pair.mean().item() == pytest.approx(simpo_loss(lp_c, lp_r, lc, lr).item(), rel=1e-12)


def test_policy_equals_reference_gives_log2():
    z = torch.zeros(4)
    ce = torch.randn(4, 8)
    for norm in ("sum", "mean"):
        assert rpo_loss(z, z, ce, ce, row_normalization=norm).item() == pytest.approx(math.log(2.0), rel=1e-6)


@pytest.mark.parametrize("weighting", ["embedding", "uniform", "diagonal"])
@pytest.mark.parametrize("norm", ["sum", "mean"])
def test_gradcheck(weighting, norm):
    c, r, ce, re = _data(4, 4, paired=weighting == "diagonal", seed=5)
    inputs = (c.requires_grad_(), r.requires_grad_(), ce.requires_grad_(), re.requires_grad_())

    def f(c, r, ce, re):
        return rpo_loss(c, r, ce, re, beta=0.5, weighting=weighting, row_normalization=norm)

    assert torch.autograd.gradcheck(f, inputs)


def test_gradcheck_simpo_rpo_and_baselines():
    c, r, ce, re = _data(3, 5, seed=6)
    lc, lr = torch.tensor([2, 3, 4]), torch.tensor([1, 2, 3, 4, 5])
    assert torch.autograd.gradcheck(
        lambda c, r, ce, re: simpo_rpo_loss(c, r, lc, lr, ce, re),
        (c.requires_grad_(), r.requires_grad_(), ce.requires_grad_(), re.requires_grad_()),
    )
    c2, r2 = c[:3].detach().requires_grad_(), r[:3].detach().requires_grad_()
    for fn in (dpo_loss, ipo_loss):
        assert torch.autograd.gradcheck(lambda a, b: fn(a, b, beta=0.4), (c2, r2))
    assert torch.autograd.gradcheck(lambda a, b: simpo_loss(a, b, lc, lr[:3]), (c2, r2))


@pytest.mark.parametrize("scale", [1e4, -1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logratios_give_finite_loss_and_grads(scale, dtype):
    c = torch.tensor([scale, -scale, scale, 0.0], dtype=dtype, requires_grad=True)
    r = torch.tensor([-scale, scale, scale, scale], dtype=dtype, requires_grad=True)
    ce = torch.randn(4, 8)
    losses = [
        rpo_loss(c, r, ce, ce),
        rpo_loss(c, r, weighting="uniform", row_normalization="mean"),
        dpo_loss(c, r),
        ipo_loss(c, r),
        simpo_rpo_loss(c, r, torch.ones(4), torch.full((4,), 3), ce, ce),
    ]
    total = sum(losses)
    total.backward()
    assert all(torch.isfinite(x) for x in losses)
    assert torch.isfinite(c.grad.float()).all() and torch.isfinite(r.grad.float()).all()


@pytest.mark.parametrize("M,N", [(0, 3), (3, 0), (0, 0)])
def test_empty_side_gives_zero_loss_and_zero_grads(M, N):
    c = torch.randn(M, requires_grad=True)
    r = torch.randn(N, requires_grad=True)
    ce, re = torch.randn(M, 8), torch.randn(N, 8)
    for loss in (
        rpo_loss(c, r, ce, re),
        rpo_loss(c, r, weighting="uniform"),
        simpo_rpo_loss(c, r, torch.ones(M), torch.ones(N), ce, re),
    ):
        assert loss.item() == 0.0 and not torch.isnan(loss)
        (gc, gr) = torch.autograd.grad(loss, (c, r), allow_unused=False)
        assert (gc == 0).all() and (gr == 0).all()
    if M == N:
        assert dpo_loss(c, r).item() == 0.0


def test_errors_name_shapes_and_values():
    c, r, ce, re = _data(3, 4)
    with pytest.raises(ValueError, match=r"chosen_prompt_emb must have shape \[3, D\].*\(4, 8\)"):
        rpo_loss(c, r, re, re)
    with pytest.raises(ValueError, match=r"differ in dimension: \(3, 8\) vs \(4, 5\)"):
        rpo_loss(c, r, ce, torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"chosen_logratios must be a 1-D tensor.*\(3, 1\)"):
        rpo_loss(c[:, None], r, ce, re)
    with pytest.raises(ValueError, match="needs chosen_prompt_emb"):
        rpo_loss(c, r)
    bad = ce.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"chosen_prompt_emb has NaN or inf values in rows \[1\]"):
        rpo_loss(c, r, bad, re)
    bad = re.clone()
    bad[2] = float("inf")
    with pytest.raises(ValueError, match=r"rejected_prompt_emb has NaN or inf values in rows \[2\]"):
        rpo_loss(c, r, ce, bad)
    bad = re.clone()
    bad[3] = 0
    with pytest.raises(ValueError, match=r"rejected_prompt_emb has zero-norm rows \[3\]"):
        rpo_loss(c, r, ce, bad)
    with pytest.raises(ValueError, match=r"needs paired data \(M == N\), got M=3, N=4"):
        rpo_loss(c, r, weighting="diagonal")
    with pytest.raises(ValueError, match="tau must be > 0, got 0"):
        rpo_loss(c, r, ce, re, tau=0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        rpo_loss(c, c, weighting="diagonal", alpha=1.5)
    with pytest.raises(ValueError, match="beta must be > 0, got -0.1"):
        rpo_loss(c, r, weighting="uniform", beta=-0.1)
    with pytest.raises(ValueError, match="weighting must be one of .* got 'cosine'"):
        rpo_loss(c, r, ce, re, weighting="cosine")
    with pytest.raises(ValueError, match="row_normalization must be one of .* got 'max'"):
        rpo_loss(c, r, ce, re, row_normalization="max")
    with pytest.raises(ValueError, match=r"dpo_loss needs paired data.*\(3,\) and \(4,\)"):
        dpo_loss(c, r)
    with pytest.raises(ValueError, match=r"response lengths must be > 0, got \[0\]"):
        simpo_loss(c, c, torch.tensor([1, 0, 2]), torch.ones(3))


# -- the paper's released code and TRL, where they differ from the equations (documented in docs/loss.md) --
@pytest.mark.parametrize("M", [1, 2, 5])
def test_released_diagonal_form_matches_its_float64_transcription(M):
    g = torch.Generator().manual_seed(M)
    c = torch.randn(M, generator=g, dtype=torch.float64) * 5
    r = torch.randn(M, generator=g, dtype=torch.float64) * 5
    got = rpo_loss(c, r, beta=0.1, weighting="diagonal", alpha=0.7, diagonal_form="released")
    assert got.item() == pytest.approx(ref.rpo_diagonal_released(c.tolist(), r.tolist(), 0.1, 0.7), rel=1e-12)
    if M == 1:  # one pair: DPO (the released code divides by M - 1 = 0 and returns NaN)
        assert got.item() == pytest.approx(ref.dpo(c.tolist(), r.tolist(), 0.1), rel=1e-12)


def test_released_diagonal_gradient_is_about_m_times_the_equations_at_the_start():
    for M in (2, 64):
        c = torch.zeros(M, dtype=torch.float64, requires_grad=True)
        r = torch.zeros(M, dtype=torch.float64)
        grads = []
        for form in ("equations", "released"):
            c.grad = None
            rpo_loss(c, r, beta=0.1, weighting="diagonal", alpha=0.8, diagonal_form=form).backward()
            grads.append(c.grad.norm().item())
        assert grads[1] / grads[0] == pytest.approx(M, rel=1e-9)


def test_released_diagonal_form_needs_diagonal_weights_summing_to_one():
    c = torch.zeros(2)
    with pytest.raises(ValueError, match='diagonal_form="released" is the diagonal weighting with rows summing to 1'):
        rpo_loss(c, c, weighting="uniform", diagonal_form="released")
    with pytest.raises(ValueError, match="row_normalization='mean'"):
        rpo_loss(c, c, weighting="diagonal", row_normalization="mean", diagonal_form="released")


def test_uniform_weights_mean_normalised_are_the_released_codes_weight_one():
    # The paper's text: w = 1/N (our row_normalization="sum"); its released code: w = 1 (our "mean").
    g = torch.Generator().manual_seed(7)
    c, r = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    got = rpo_loss(c, r, beta=0.3, weighting="uniform", row_normalization="mean")
    want = -sum(ref.log_sigmoid(0.3 * (a - b)) for a in c.tolist() for b in r.tolist()) / 24
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_length_normalised_ipo_is_trls():
    g = torch.Generator().manual_seed(8)
    c, r = torch.randn(5, generator=g, dtype=torch.float64) * 9, torch.randn(5, generator=g, dtype=torch.float64) * 9
    lc, lr = torch.tensor([3, 7, 1, 12, 5]), torch.tensor([4, 2, 9, 6, 5])
    got = ipo_loss(c, r, beta=0.1, chosen_lengths=lc, rejected_lengths=lr)
    want = ref.ipo_length_normalized(c.tolist(), r.tolist(), lc.tolist(), lr.tolist(), 0.1)
    assert got.item() == pytest.approx(want, rel=1e-12)
    assert ipo_loss(c, r, beta=0.1).item() == pytest.approx(ref.ipo(c.tolist(), r.tolist(), 0.1), rel=1e-12)
