"""The autograd all-gather: uneven (even empty) slices, and gradients that make DDP's average exact."""

import pytest
import torch

from tests.multiprocess import run_ranks
from tests.unit.loss import reference as ref

# Rank r's chosen and rejected counts: rank 1 holds no chosen item, rank 2 no rejected one.
COUNTS = [(3, 2), (0, 4), (2, 0)]


def _data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    m, n = COUNTS[rank]
    return (torch.randn(m, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64),
            torch.randn(m, 5, generator=g, dtype=torch.float64), torch.randn(n, 5, generator=g, dtype=torch.float64))


def _gathered_loss():
    import torch.distributed as dist

    from megatron_rpo.loss import rpo_loss
    from megatron_rpo.loss.distributed import all_gather_with_grad

    group = dist.new_group(list(range(dist.get_world_size())))
    c, r, ce, re = _data(dist.get_rank())
    c.requires_grad_()
    r.requires_grad_()
    gc, gr = all_gather_with_grad(c, group), all_gather_with_grad(r, group)
    gce, gre = all_gather_with_grad(ce, group), all_gather_with_grad(re, group)
    loss = rpo_loss(gc, gr, gce, gre, beta=0.7)
    loss.backward()
    return {"loss": loss.detach(), "grad_c": c.grad, "grad_r": r.grad}


def test_gather_gives_the_global_matrix_and_summed_gradients():
    world = len(COUNTS)
    ranks = run_ranks(_gathered_loss, world)
    parts = [_data(r) for r in range(world)]
    c, r, ce, re = (torch.cat([p[i] for p in parts]) for i in range(4))
    want = ref.rpo(c.tolist(), r.tolist(), ce.tolist(), re.tolist(), 0.7, "embedding", 0.5, 0.8, "sum")
    # The same global loss on every rank.
    for rank in ranks:
        assert rank["loss"].item() == pytest.approx(want, rel=1e-9)
    # Each rank's gradient is the global gradient of its slice times the number of ranks,
    # so an average over ranks (megatron DDP) is the global gradient.
    from megatron_rpo.loss import rpo_loss

    c.requires_grad_()
    r.requires_grad_()
    rpo_loss(c, r, ce, re, beta=0.7).backward()
    gc, gr = c.grad.split([m for m, _ in COUNTS]), r.grad.split([n for _, n in COUNTS])
    for i, rank in enumerate(ranks):
        torch.testing.assert_close(rank["grad_c"], world * gc[i], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rank["grad_r"], world * gr[i], rtol=1e-10, atol=1e-12)
