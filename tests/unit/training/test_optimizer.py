"""Megatron's optimizer as we build it: torch's fused AdamW where megatron falls back to torch."""

import copy

import pytest
import torch

from tests.multiprocess import run_ranks
from tests.unit.megatron_helpers import VOCAB, fill_by_name, tiny_config


def _one_step():
    import torch.optim.adam as torch_adam
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_rpo import parallel
    from megatron_rpo.config import OptimizerConfig
    from megatron_rpo.models import model_provider
    from megatron_rpo.training.optimizer import build_optimizer

    config = tiny_config()
    parallel.initialize(config.parallel)
    module = model_provider(config)
    fill_by_name(module, VOCAB)
    model = DistributedDataParallel(module.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module)
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=0.0)
    optimizer = build_optimizer(opt_config, [model], bf16=False)
    groups = optimizer.optimizer.param_groups
    # fp32: the optimizer steps the model's own parameters; megatron decides which ones decay.
    decay = {id(p): grp["weight_decay"] for grp in groups for p in grp["params"]}
    weight_decay = {n: decay[id(p)] for n, p in module.named_parameters()}
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    g = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(p.shape, generator=g) for n, p in module.named_parameters()}
    model.zero_grad_buffer()
    for n, p in module.named_parameters():
        p.main_grad.copy_(grads[n])
    calls = []
    fused = torch_adam._fused_adam
    torch_adam._fused_adam = lambda *a, **k: calls.append(1) or fused(*a, **k)
    try:
        optimizer.step()
    finally:
        torch_adam._fused_adam = fused
    after = {n: p.detach().clone() for n, p in module.named_parameters()}
    return {"fused": [grp["fused"] for grp in groups], "calls": len(calls), "before": before, "grads": grads,
            "after": after, "weight_decay": weight_decay}


def test_torch_fallback_runs_the_fused_adamw_and_steps_like_a_plain_one():
    (r,) = run_ranks(_one_step, 1)
    assert r["fused"] and all(r["fused"]) and r["calls"] > 0
    # The same step by a plain (single-tensor) AdamW on copies of the weights.
    params = {n: torch.nn.Parameter(copy.deepcopy(p)) for n, p in r["before"].items()}
    plain = torch.optim.AdamW([{"params": [p], "weight_decay": r["weight_decay"][n]} for n, p in params.items()],
                              lr=1e-2, foreach=False, fused=False)
    for n, p in params.items():
        p.grad = r["grads"][n]
    plain.step()
    for n, p in params.items():
        torch.testing.assert_close(r["after"][n], p.detach(), rtol=1e-6, atol=1e-7, msg=n)


def _first_lrs():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_rpo import parallel
    from megatron_rpo.config import OptimizerConfig
    from megatron_rpo.models import model_provider
    from megatron_rpo.training.optimizer import build_optimizer, build_scheduler

    config = tiny_config()
    parallel.initialize(config.parallel)
    module = model_provider(config)
    model = DistributedDataParallel(module.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module)
    opt = OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=0.0, lr_warmup_iters=4, lr_decay_style="linear")
    optimizer = build_optimizer(opt, [model], bf16=False)
    scheduler = build_scheduler(optimizer, opt, total_steps=8)
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])  # what the step about to run uses
        scheduler.step(increment=1)
    return lrs


def test_the_first_warmup_step_already_learns_and_the_last_reaches_min_lr():
    (lrs,) = run_ranks(_first_lrs, 1)
    want = [2.5e-4, 5e-4, 7.5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0]  # warm-up 1..4 of 4, linear decay to step 8
    assert lrs == [pytest.approx(w, abs=1e-12) for w in want]
