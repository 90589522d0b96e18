import math

import pytest
import torch

from megatron_rpo.loss import contrast_weights, preference_metrics


def test_paired_metrics():
    c = torch.tensor([1.0, 0.5, -1.0, 2.0])
    r = torch.tensor([0.0, 1.0, -2.0, 1.0])
    w = contrast_weights(None, None, 4, 4, weighting="diagonal", alpha=0.7)
    m = preference_metrics(c, r, w, paired=True)
    assert m["chosen_reward"].item() == pytest.approx(0.625)
    assert m["rejected_reward"].item() == pytest.approx(0.0)
    assert m["reward_margin"].item() == pytest.approx(0.625)
    assert m["accuracy"].item() == pytest.approx(0.75)
    assert m["diag_weight"].item() == pytest.approx(0.7)
    p = [0.7, 0.1, 0.1, 0.1]
    assert m["row_entropy"].item() == pytest.approx(-sum(x * math.log(x) for x in p), rel=1e-6)
    assert (m["matrix_rows"].item(), m["matrix_cols"].item()) == (4, 4)


def test_ties_count_half():
    m = preference_metrics(torch.zeros(4), torch.zeros(4), paired=True)
    assert m["accuracy"].item() == 0.5 and m["reward_auc"].item() == 0.5


def test_unpaired_and_empty_metrics_are_nan_not_errors():
    m = preference_metrics(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0, 3.0]), paired=False)
    assert math.isnan(m["accuracy"].item())
    assert m["reward_margin"].item() == pytest.approx(0.5)
    m = preference_metrics(torch.zeros(0), torch.tensor([1.0]), paired=False)
    assert math.isnan(m["chosen_reward"].item()) and m["matrix_rows"].item() == 0
    assert all(v.dtype == torch.float32 for v in m.values())


def test_unpaired_data_of_equal_sides_reports_the_reward_auc_not_a_diagonal():
    # 2 chosen and 2 rejected items of four unrelated prompts (seen: 2 ranks, "matrix 4x4").
    c = torch.tensor([1.0, -1.0])
    r = torch.tensor([0.0, 2.0])
    w = contrast_weights(None, None, 2, 2, weighting="uniform")
    m = preference_metrics(c, r, w, paired=False)
    assert math.isnan(m["accuracy"].item()) and math.isnan(m["diag_weight"].item())
    # cells: 1>0 yes, 1>2 no, -1>0 no, -1>2 no -> 1/4 (a diagonal "accuracy" would say 1/2)
    assert m["reward_auc"].item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="paired metrics need as many chosen as rejected rewards, got 2 and 3"):
        preference_metrics(c, torch.zeros(3), paired=True)


def test_the_console_line_says_which_accuracy_it_shows():
    from megatron_rpo.training.metrics_log import format_line

    m = {"loss": 0.6, "chosen_reward": 0.1, "rejected_reward": 0.0, "reward_margin": 0.1, "accuracy": float("nan"),
         "reward_auc": 0.625, "row_entropy": 1.0, "matrix_rows": 4, "matrix_cols": 4}
    assert "reward AUC 0.625" in format_line(1, 2, m, 1e-3, 1.0, 100.0, 0.1, 1.0, paired=False)
    assert "acc nan" in format_line(1, 2, m, 1e-3, 1.0, 100.0, 0.1, 1.0, paired=True)
