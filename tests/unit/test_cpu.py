"""megatron-core on CPU through megatron_rpo.cpu: TP, the 1F1B pipeline schedule, DDP + optimizer.

Each check compares a multi-rank run on gloo processes with one process holding the whole
model and batch.
"""

import os

import pytest
import torch

from megatron_rpo import cpu
from megatron_rpo.config import ParallelConfig
from tests.multiprocess import RankFailure, run_ranks
from tests.unit.megatron_helpers import fill_by_name, global_name

VOCAB, SEQ, LAYERS = 128, 16, 4


def _tiny_gpt(tp=1, pp=1):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32,
        pipeline_dtype=torch.float32, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        # The full weights are drawn on the CPU and then split, so every TP layout holds the same model.
        use_cpu_initialization=True,
    )
    return GPTModel(
        config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=VOCAB, max_sequence_length=SEQ,
        position_embedding_type="rope", share_embeddings_and_output_weights=False,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
    )


def _batches(n, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, SEQ), generator=g) for _ in range(n)]


def _forward(model, tokens):
    positions = torch.arange(SEQ).expand_as(tokens)
    return model(tokens, positions, None, labels=torch.roll(tokens, -1, dims=1))  # [b, s] per-token loss


def _tp_forward_backward(tp):
    from megatron.core import parallel_state as ps

    from megatron_rpo import parallel

    parallel.initialize(ParallelConfig(tensor_model_parallel_size=tp))
    model = _tiny_gpt(tp=tp)
    (tokens,) = _batches(1, 3)
    losses = _forward(model, tokens)
    losses.sum().backward()
    norm = model.decoder.final_layernorm.weight  # replicated over TP ranks
    return {
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "losses": losses.detach(),
        "norm_grad": norm.grad.clone(),
        "weight_device": model.output_layer.weight.device.type,
    }


def test_gpt_forward_backward_tp2_matches_one_process():
    (single,) = run_ranks(_tp_forward_backward, 1, 1)
    ranks = run_ranks(_tp_forward_backward, 2, 2)
    assert [r["tp_rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["weight_device"] == "cpu"
        torch.testing.assert_close(r["losses"], single["losses"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["norm_grad"], single["norm_grad"], rtol=1e-4, atol=1e-6)


def _pipeline(pp, num_microbatches):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rpo import parallel

    parallel.initialize(ParallelConfig(pipeline_model_parallel_size=pp))
    model = _tiny_gpt(pp=pp)
    fill_by_name(model, VOCAB)
    data = iter(_batches(num_microbatches, 2))

    def loss_func(per_token):
        loss = per_token.float().mean()
        return loss, {"loss": loss.detach()}

    def forward_step(data_iterator, model):
        return _forward(model, next(data_iterator)), loss_func

    schedule = get_forward_backward_func()
    reports = schedule(
        forward_step_func=forward_step, data_iterator=data, model=[model], num_microbatches=num_microbatches,
        seq_length=SEQ, micro_batch_size=2, forward_only=False,
    )
    grads = {global_name(model, n): p.grad.clone() for n, p in model.named_parameters()}
    return {
        "schedule": schedule.__name__,
        "last_stage": ps.is_pipeline_last_stage(),
        "losses": [r["loss"] for r in reports],
        "grads": grads,
    }


def test_1f1b_schedule_pp2_matches_one_process():
    (single,) = run_ranks(_pipeline, 1, 1, 4)
    stages = run_ranks(_pipeline, 2, 2, 4)
    assert stages[0]["schedule"] == "forward_backward_pipelining_without_interleaving"
    assert [s["last_stage"] for s in stages] == [False, True]
    assert stages[0]["losses"] == []
    torch.testing.assert_close(torch.stack(stages[1]["losses"]), torch.stack(single["losses"]), rtol=1e-5, atol=0)
    merged = {**stages[0]["grads"], **stages[1]["grads"]}
    assert merged.keys() == single["grads"].keys()
    for name, grad in single["grads"].items():
        torch.testing.assert_close(merged[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _ddp_step(dp, distributed_optimizer):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rpo import parallel

    parallel.initialize(ParallelConfig())
    model = _tiny_gpt()
    fill_by_name(model, VOCAB)
    initial = torch.cat([p.detach().flatten() for p in model.parameters()])
    model = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer),
        model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, bf16=False, clip_grad=1.0,
                        use_distributed_optimizer=distributed_optimizer),
        [model],
    )
    # The global batch: 4 microbatches of 2 sequences, dealt round-robin over data-parallel ranks.
    rank = ps.get_data_parallel_rank()
    mine = _batches(4, 2)[rank::dp]

    def forward_step(data_iterator, model):
        per_token = _forward(model, next(data_iterator))
        return per_token, lambda out: (out.mean(), {})

    model.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(mine), model=[model], num_microbatches=len(mine),
        seq_length=SEQ, micro_batch_size=2, forward_only=False,
    )
    finalize_model_grads([model])
    updated, grad_norm, _ = optimizer.step()
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {"updated": updated, "grad_norm": grad_norm, "params": params, "initial": initial, "world": dist.get_world_size()}


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_ddp_optimizer_step_dp2_matches_one_process(distributed_optimizer):
    (single,) = run_ranks(_ddp_step, 1, 1, distributed_optimizer)
    ranks = run_ranks(_ddp_step, 2, 2, distributed_optimizer)
    assert all(r["updated"] for r in ranks + [single])
    # Identical on both ranks, bit for bit, and equal to the single process on the whole batch.
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    assert ranks[0]["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-5)
    torch.testing.assert_close(ranks[0]["params"], single["params"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(ranks[0]["params"], ranks[0]["initial"])


def _dies(rank_to_die):
    import torch.distributed as dist

    if dist.get_rank() == rank_to_die:
        os._exit(3)
    dist.all_reduce(torch.ones(1))  # would wait for the dead rank forever without the harness
    return "unreachable"


def _raises():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()


def _hangs():
    import threading

    import torch.distributed as dist

    if dist.get_rank() == 1:
        threading.Event().wait()  # never set: a rank stuck outside any collective
    dist.barrier()


def test_a_dead_rank_fails_the_test_instead_of_hanging():
    # Either the harness sees rank 1 gone, or gloo tells rank 0 that its peer vanished.
    with pytest.raises(RankFailure, match=r"rank\(s\) \[1\] exited without a result|rank 0 failed:(?s:.*)Connection"):
        run_ranks(_dies, 2, 1, timeout=100)


def test_a_stuck_rank_is_killed_at_the_timeout():
    with pytest.raises(RankFailure, match=r"rank\(s\) \[0, 1\] did not finish within 5 s"):
        run_ranks(_hangs, 2, timeout=5)


def test_a_raising_rank_reports_its_traceback():
    with pytest.raises(RankFailure, match=r"(?s)^rank 1 failed:.*ValueError: boom on rank 1"):
        run_ranks(_raises, 2, timeout=100)


def _cuda_arguments_land_on_cpu() -> bool:
    assert cpu.activate() and cpu.is_active()
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda:0").device.type == "cpu"
    assert torch.tensor([1.0], device=torch.device("cuda"), pin_memory=True).device.type == "cpu"
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    torch.cuda.synchronize()
    return True


def test_cuda_device_arguments_land_on_cpu():
    """In a rank of its own: the shim is process-wide, and the pytest process stays without it."""
    if torch.cuda.is_available():
        pytest.skip("the CPU shim is inactive where CUDA exists")
    assert run_ranks(_cuda_arguments_land_on_cpu, 1) == [True]


class _AllocatesOnCudaInBackward(torch.autograd.Function):
    # megatron's tensor-parallel linear layers allocate buffers on "cuda" in their backward.
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2 + torch.zeros(grad.shape, device=torch.cuda.current_device())


def _backward_allocating_on_cuda() -> list[float]:
    cpu.activate()
    x = torch.ones(3, requires_grad=True)
    _AllocatesOnCudaInBackward.apply(x).sum().backward()
    return x.grad.tolist()


def test_custom_function_backward_allocating_on_cuda_runs_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("the CPU shim is inactive where CUDA exists")
    assert run_ranks(_backward_allocating_on_cuda, 1) == [[2.0, 2.0, 2.0]]
