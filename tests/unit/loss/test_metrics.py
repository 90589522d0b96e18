import math

import pytest
import torch

from megatron_rpo.loss import contrast_weights, preference_metrics


def test_paired_metrics():
    c = torch.tensor([1.0, 0.5, -1.0, 2.0])
    r = torch.tensor([0.0, 1.0, -2.0, 1.0])
    w = contrast_weights(None, None, 4, 4, weighting="diagonal", alpha=0.7)
    m = preference_metrics(c, r, w)
    assert m["chosen_reward"].item() == pytest.approx(0.625)
    assert m["rejected_reward"].item() == pytest.approx(0.0)
    assert m["reward_margin"].item() == pytest.approx(0.625)
    assert m["accuracy"].item() == pytest.approx(0.75)
    assert m["diag_weight"].item() == pytest.approx(0.7)
    p = [0.7, 0.1, 0.1, 0.1]
    assert m["row_entropy"].item() == pytest.approx(-sum(x * math.log(x) for x in p), rel=1e-6)
    assert (m["matrix_rows"].item(), m["matrix_cols"].item()) == (4, 4)


def test_ties_count_half():
    m = preference_metrics(torch.zeros(4), torch.zeros(4))
    assert m["accuracy"].item() == 0.5


def test_unpaired_and_empty_metrics_are_nan_not_errors():
    m = preference_metrics(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0, 3.0]))
    assert math.isnan(m["accuracy"].item())
    assert m["reward_margin"].item() == pytest.approx(0.5)
    m = preference_metrics(torch.zeros(0), torch.tensor([1.0]))
    assert math.isnan(m["chosen_reward"].item()) and m["matrix_rows"].item() == 0
    assert all(v.dtype == torch.float32 for v in m.values())
