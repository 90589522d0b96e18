"""Context parallelism (issue 22) on the local spec: CP 2 against TP 2 (an independent layout of the
same model, itself checked against one process) on the same packed microbatches.

* every token's log-prob equals the uncut row's: no token sees a later position held by the other
  CP rank or another sequence, and RoPE uses the true positions (a wrong position or a leak
  changes a log-prob); changing a sequence's later tokens changes none of its earlier log-probs;
* per-sequence log-probs, the loss and every parameter's gradient are the same with the contrast
  matrix over the data-parallel batch and over the global batch (both passes of gradient caching);
* the same at TP 2 + sequence parallel x CP 2 against TP 2 + SP x PP 2 (4 processes);
* a mixture-of-experts model at CP 2 against TP 2 + SP, and at CP 2 x EP 2 (the expert-parallel
  ranks are the context-parallel ones) against EP 2 x DP 2 with each rank's own matrix.

One 2-process spawn runs the CP 2 cases, one 4-process spawn the TP 2 + SP ones.
"""

import pytest
import torch

from megatron_rpo.data.packing import context_parallel_indices, packed_length
from tests.multiprocess import run_ranks
from tests.unit.megatron_helpers import VOCAB, fill_by_name, full_grads, make_batch, tiny_config

PROMPTS = [4, 6, 3, 4, 6, 3]
RESPONSES = [8, 5, 11, 10, 3, 6]
CP = 2
def _batch(seed, multiple: int = 2 * CP):
    """A packed microbatch whose sequences are padded to multiples of ``multiple`` (2 x CP, x TP with SP)."""
    length = packed_length([p + r for p, r in zip(PROMPTS, RESPONSES)], 8, multiple)
    return make_batch(PROMPTS, RESPONSES, 32, VOCAB, seed=seed, packed_length=length, sequence_multiple=multiple)


def test_a_cp_rank_holds_chunks_r_and_2cp_minus_1_minus_r_of_every_segment():
    batch = _batch(0)
    bounds = batch["cu_seqlens"]
    assert all((b - a) % (2 * CP) == 0 for a, b in zip(bounds[:-1], bounds[1:]))
    parts = [context_parallel_indices(bounds, CP, r) for r in range(CP)]
    assert sorted(torch.cat(parts).tolist()) == list(range(batch["tokens"].shape[1]))  # every token once
    a, b = bounds[0], bounds[1]  # the first segment: 4 chunks of (b - a) / 4
    m = (b - a) // 4
    assert parts[0][:2 * m].tolist() == list(range(a, a + m)) + list(range(a + 3 * m, a + 4 * m))
    assert parts[1][:2 * m].tolist() == list(range(a + m, a + 3 * m))
    # the padding inside a segment belongs to no sequence and is never scored
    n = PROMPTS[0] + RESPONSES[0]
    assert (batch["sequence_index"][0, n:b] == len(PROMPTS)).all() and batch["loss_mask"][0, n:b].sum() == 0


def _token_logps(model, batch) -> torch.Tensor:
    """[T] log-probs of the whole row's labels; under CP each rank's part put back in its place."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_rpo.training.forward_step import context_parallel_batch, packed_seq_params

    mine = context_parallel_batch(batch)
    with torch.no_grad():
        local = model(mine["tokens"], mine["position_ids"], None, labels=mine["labels"],
                      packed_seq_params=packed_seq_params(mine, mine["tokens"].device))[0]
    if ps.get_context_parallel_world_size() == 1:
        return local
    group = ps.get_context_parallel_group()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    out = torch.empty(batch["tokens"].shape[1])
    for r, part in enumerate(parts):
        out[context_parallel_indices(batch["cu_seqlens"], len(parts), r)] = part
    return out


def _layout(parallel_keys: dict, batches: list[dict]) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_rpo import parallel
    from megatron_rpo.models import model_provider
    from megatron_rpo.training.step import forward_backward, sequence_logps

    out = {}
    for scope in ("data_parallel", "global_batch"):
        config = tiny_config(tp=parallel_keys.get("tp", 1), pp=parallel_keys.get("pp", 1),
                             sp=parallel_keys.get("sp", False), contrast_scope=scope)
        config.parallel.context_parallel_size = parallel_keys.get("cp", 1)
        parallel.initialize(config.parallel)
        try:
            module = model_provider(config)
            fill_by_name(module, VOCAB)
            if scope == "data_parallel" and config.parallel.pipeline_model_parallel_size == 1:
                out["tokens"] = _token_logps(module, batches[0])
                changed = dict(batches[0], tokens=batches[0]["tokens"].clone())
                a, b = batches[0]["cu_seqlens"][:2]
                changed["tokens"][0, a + 9:b] = (changed["tokens"][0, a + 9:b] + 1) % VOCAB  # seq 0's later tokens
                changed["labels"] = torch.roll(changed["tokens"], -1, dims=1)
                out["changed"] = _token_logps(module, changed)
            if scope == "data_parallel":
                logps = sequence_logps(module, batches)
                out["logps"] = None if logps is None else [lp for lp, _ in logps]
            model = DistributedDataParallel(module.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                            module)
            model.zero_grad_buffer()
            reports = forward_backward(model, batches, config.loss)
            finalize_model_grads([model])
            out[scope] = {"loss": [float(r["loss"]) for r in reports], "grads": full_grads(module, VOCAB, True)}
        finally:
            ps.destroy_model_parallel()
    return out


MOE = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.num_attention_heads=4",
       "model.num_query_groups=2", f"model.vocab_size={VOCAB}", "model.make_vocab_size_divisible_by=8",
       "model.max_position_embeddings=128", "model.num_moe_experts=4", "model.moe_router_topk=2",
       "model.moe_ffn_hidden_size=32", "model.moe_aux_loss_coeff=0.01", "data.max_prompt_length=12",
       "data.max_length=32", "train.micro_batch_size=3", "train.global_batch_size=3"]
MOE_LAYOUTS = {
    "tp2_sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "cp2": ["parallel.context_parallel_size=2"],
    "ep2": ["parallel.expert_model_parallel_size=2", "loss.contrast_scope=local"],  # DP 2, a matrix each
    "cp2_ep2": ["parallel.context_parallel_size=2", "parallel.expert_model_parallel_size=2"],
}


def _moe(batches) -> dict:
    """Per layout of a mixture-of-experts model: per-sequence log-probs, the loss and this rank's
    gradients (local expert names: the pairs compared hold the same experts on each rank)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_rpo import parallel
    from megatron_rpo.config import load_config
    from megatron_rpo.models import model_provider
    from megatron_rpo.training.step import forward_backward, sequence_logps

    out = {}
    for name, extra in MOE_LAYOUTS.items():
        config = load_config(None, MOE + extra)
        parallel.initialize(config.parallel)
        try:
            module = model_provider(config)
            fill_by_name(module, VOCAB)
            logps = [lp for lp, _ in sequence_logps(module, batches)]
            model = DistributedDataParallel(module.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                            module)
            model.zero_grad_buffer()
            reports = forward_backward(model, batches, config.loss)
            finalize_model_grads([model])
            out[name] = {"logps": logps, "loss": float(reports[0]["loss"]), "grads": full_grads(module, VOCAB, True)}
        finally:
            ps.destroy_model_parallel()
    return out


def _both(batches):
    return {"tp2": _layout({"tp": 2}, batches), "cp2": _layout({"cp": CP}, batches),
            "moe": _moe([_batch(2, 8)])}


def _both_with_sequence_parallel(batches):
    return {"tp2": _layout({"tp": 2, "sp": True, "pp": 2}, batches), "cp2": _layout({"tp": 2, "sp": True, "cp": CP},
                                                                                    batches)}


@pytest.fixture(scope="module")
def results():
    return run_ranks(_both, 2, [_batch(0), _batch(1)], timeout=600)


@pytest.fixture(scope="module")
def results_sp():
    """Per layout, per scope: the loss and the whole model's gradients (the union over pipeline
    stages); the log-probs of the last stage."""
    ranks = run_ranks(_both_with_sequence_parallel, 4, [_batch(0, 8), _batch(1, 8)], timeout=600)
    out = {}
    for layout in ("tp2", "cp2"):
        merged = {"logps": next(r[layout]["logps"] for r in ranks[::-1] if r[layout]["logps"] is not None)}
        for scope in ("data_parallel", "global_batch"):
            grads = {}
            for r in ranks:
                grads.update(r[layout][scope]["grads"])
            merged[scope] = {"loss": ranks[-1][layout][scope]["loss"], "grads": grads}
        out[layout] = merged
    return out


def test_every_token_log_prob_equals_the_uncut_row_and_later_tokens_change_no_earlier_one(results):
    for rank in results:
        torch.testing.assert_close(rank["cp2"]["tokens"], rank["tp2"]["tokens"], rtol=1e-5, atol=1e-5)
        a = _batch(0)["cu_seqlens"][0]
        # labels up to position a + 7 predict tokens up to a + 8: all before the change
        torch.testing.assert_close(rank["cp2"]["changed"][:a + 8], rank["cp2"]["tokens"][:a + 8], rtol=0, atol=0)
        assert not torch.equal(rank["cp2"]["changed"], rank["cp2"]["tokens"])
        torch.testing.assert_close(rank["cp2"]["changed"], rank["tp2"]["changed"], rtol=1e-5, atol=1e-5)


def _assert_same(cp: dict, tp: dict, scope: str) -> None:
    for got, want in zip(cp["logps"], tp["logps"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert cp[scope]["loss"] and cp[scope]["loss"] == pytest.approx(tp[scope]["loss"], abs=1e-6)
    assert cp[scope]["grads"].keys() == tp[scope]["grads"].keys() and len(tp[scope]["grads"]) > 20
    for name, grad in tp[scope]["grads"].items():
        torch.testing.assert_close(cp[scope]["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("scope", ["data_parallel", "global_batch"])
def test_sequence_logps_loss_and_gradients_equal_the_run_without_cp(results, scope):
    for rank in results:
        _assert_same(rank["cp2"], rank["tp2"], scope)


@pytest.mark.parametrize("scope", ["data_parallel", "global_batch"])
def test_with_tp2_and_sequence_parallelism_too(results_sp, scope):
    _assert_same(results_sp["cp2"], results_sp["tp2"], scope)


@pytest.mark.parametrize("cp,without", [("cp2", "tp2_sp"), ("cp2_ep2", "ep2")])
def test_mixture_of_experts_at_cp2_equals_the_run_without_cp(results, cp, without):
    for rank in results:
        got, want = rank["moe"][cp], rank["moe"][without]
        torch.testing.assert_close(got["logps"][0], want["logps"][0], rtol=1e-5, atol=1e-5)
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)
        assert got["grads"].keys() == want["grads"].keys() and any(".experts." in n for n in want["grads"])
        for name, grad in want["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
