import math

import pytest
import torch

from megatron_rpo.loss import contrast_weights, row_entropy
from tests.unit.loss import reference as ref


@pytest.mark.parametrize("weighting", ["embedding", "uniform", "diagonal"])
@pytest.mark.parametrize("norm", ["sum", "mean"])
def test_weights_match_transcription_and_rows_are_normalised(weighting, norm):
    g = torch.Generator().manual_seed(0)
    M = N = 6
    ce = torch.randn(M, 16, generator=g, dtype=torch.float64)
    re = torch.randn(N, 16, generator=g, dtype=torch.float64)
    w = contrast_weights(ce, re, M, N, weighting=weighting, tau=0.5, alpha=0.7, row_normalization=norm,
                         dtype=torch.float64)
    want = torch.tensor(ref.weights(ce.tolist(), re.tolist(), M, N, weighting, 0.5, 0.7, norm), dtype=torch.float64)
    torch.testing.assert_close(w, want, rtol=1e-12, atol=0)
    row_sum = 1.0 if norm == "sum" else float(N)
    torch.testing.assert_close(w.sum(dim=1), torch.full((M,), row_sum, dtype=torch.float64))


def test_similar_prompts_weigh_more():
    e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0]])
    w = contrast_weights(e[:1], e, 1, 3, tau=0.5)
    assert w[0, 0] > w[0, 1] > w[0, 2]


def test_paired_diagonal_cosine_is_one():
    e = torch.randn(4, 8, dtype=torch.float64)
    w = contrast_weights(e, e, 4, 4, tau=0.5, dtype=torch.float64)
    # The diagonal cell has exponent 0, the largest possible, so it is each row's maximum.
    assert torch.equal(w.argmax(dim=1), torch.arange(4))


def test_embeddings_are_normalised_inside():
    e = torch.randn(3, 8, dtype=torch.float64)
    w1 = contrast_weights(e, e, 3, 3, dtype=torch.float64)
    w2 = contrast_weights(e * 7.0, e * 0.01, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(w1, w2)


def test_bf16_embeddings_give_float32_weights():
    e = torch.randn(8, 32).to(torch.bfloat16)
    w = contrast_weights(e, e, 8, 8)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.sum(dim=1), torch.ones(8))


def test_row_entropy():
    uniform = contrast_weights(None, None, 3, 5, weighting="uniform")
    assert row_entropy(uniform).item() == pytest.approx(math.log(5))
    assert row_entropy(uniform * 5).item() == pytest.approx(math.log(5))
    one_hot = torch.eye(4)
    assert row_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    assert row_entropy(torch.zeros(0, 3)).item() == 0.0



@pytest.mark.parametrize("weighting", ["uniform", "diagonal"])
def test_weights_loss_and_metrics_stay_on_the_device_of_their_inputs(weighting):
    # The meta device stands in for a GPU: a weight made on the host would not mix with it.
    # (Embedding weights follow the embeddings; their input checks, like SimPO's length check,
    # read values, which meta tensors do not have.)
    from megatron_rpo.config import LossConfig
    from megatron_rpo.loss.objective import Sequences, preference_loss

    meta = torch.device("meta")
    assert contrast_weights(None, None, 3, 3, weighting=weighting, device=meta).device == meta

    def side():
        return Sequences(policy_logps=torch.empty(3, device=meta), lengths=torch.ones(3, device=meta),
                         ref_logps=torch.empty(3, device=meta))

    loss, metrics = preference_loss(LossConfig(weighting=weighting), side(), side(), paired=True)
    assert loss.device == meta and {v.device for v in metrics.values()} == {meta}
