"""The memory levers change no gradient: activation recomputation (each of megatron's settings,
bitwise on CPU) and chunked log-probs (``model.logprob_chunk_tokens``, to float32 rounding: the
output layer's sums run in another order) against neither, on the same weights and microbatches,
under TP 2 + sequence parallel, TP 2 with tied embeddings, PP 2, gradient caching and a
mixture-of-experts model at EP 2. One 2-process spawn runs every case."""

import pytest
import torch

from megatron_rpo.config import load_config
from tests.multiprocess import run_ranks
from tests.unit.megatron_helpers import SEQ, VOCAB, fill_by_name, make_batch

BASE = {"num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4, "num_query_groups": 2,
        "vocab_size": VOCAB, "make_vocab_size_divisible_by": 8, "max_position_embeddings": 64}
MOE = dict(BASE, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_layer_freq=[0, 1, 1, 1],
           moe_aux_loss_coeff=0.01)
SETTINGS = {
    "full_uniform": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    "full_block": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2},
    "selective": {"recompute_granularity": "selective"},  # megatron's default: core_attn
    "selective_all": {"recompute_granularity": "selective", "recompute_modules": ["core_attn", "mlp"]},
    # 7 tokens divide neither the padded rows (6 x 24) nor a packed one
    "chunked": {"logprob_chunk_tokens": 7},
    "chunked_full": {"logprob_chunk_tokens": 7, "recompute_granularity": "full", "recompute_method": "uniform",
                     "recompute_num_layers": 1},
}
CHUNKED = ("chunked", "chunked_full")
# (name, model, parallel, loss, the settings compared with none)
CASES = [
    ("tp2_sp", BASE, {"tensor_model_parallel_size": 2, "sequence_parallel": True}, {}, list(SETTINGS)),
    ("tp2_tied", dict(BASE, untie_embeddings_and_output_weights=False), {"tensor_model_parallel_size": 2}, {},
     ["chunked"]),
    ("pp2", BASE, {"pipeline_model_parallel_size": 2}, {}, ["full_uniform", "selective_all", "chunked"]),
    ("global_batch", BASE, {"tensor_model_parallel_size": 2, "sequence_parallel": True},
     {"contrast_scope": "global_batch"}, ["full_block", "selective", "chunked"]),
    ("moe_ep2", MOE, {"expert_model_parallel_size": 2}, {},
     ["full_uniform", "moe", "chunked"]),
]
SETTINGS["moe"] = {"recompute_granularity": "selective", "recompute_modules": ["core_attn", "moe"]}


def _overrides(section: str, values: dict) -> list[str]:
    return [f"{section}.{k}={v}" for k, v in values.items()]


def _grads(model_keys: dict, parallel_keys: dict, loss_keys: dict, batches: list[dict]) -> dict:
    """This rank's gradients (local names) after one forward-backward and megatron's finalize."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_rpo import parallel
    from megatron_rpo.models import model_provider
    from megatron_rpo.training.step import forward_backward

    config = load_config(None, _overrides("model", model_keys) + _overrides("parallel", parallel_keys)
                         + _overrides("loss", loss_keys) + ["data.max_prompt_length=12", f"data.max_length={SEQ}"])
    parallel.initialize(config.parallel)
    try:
        module = model_provider(config)
        torch.manual_seed(0)
        fill_by_name(module, VOCAB)
        # Forward passes per kind of module: a recomputed part runs its forward again in backward.
        calls = {"core_attention": 0, "mlp": 0, "experts": 0, "output_layer": 0}

        def counter(kind):
            def hook(*_):
                calls[kind] += 1
            return hook

        for name, sub in module.named_modules():
            if name.endswith("core_attention"):
                sub.register_forward_hook(counter("core_attention"))
            elif name.endswith(".mlp"):
                sub.register_forward_hook(counter("mlp"))
            elif name.endswith(".mlp.experts"):
                sub.register_forward_hook(counter("experts"))
            elif name == "output_layer":
                sub.register_forward_hook(counter("output_layer"))
        model = DistributedDataParallel(module.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module)
        model.zero_grad_buffer()
        forward_backward(model, batches, config.loss)
        finalize_model_grads([model])
        return {"grads": {name: p.main_grad.detach().clone() for name, p in module.named_parameters()},
                "calls": calls, "last_stage": ps.is_pipeline_last_stage()}
    finally:
        ps.destroy_model_parallel()


def _all_cases(batches):
    out = {}
    for name, model, par, loss, settings in CASES:
        out[(name, None)] = _grads(model, par, loss, batches)
        for setting in settings:
            out[(name, setting)] = _grads(dict(model, **SETTINGS[setting]), par, loss, batches)
    return out


@pytest.fixture(scope="module")
def results():
    prompts, responses = [4, 6, 3, 4, 6, 3], [8, 5, 11, 10, 3, 6]
    batches = [make_batch(prompts, responses, SEQ, VOCAB, seed=s) for s in (0, 1)]
    return run_ranks(_all_cases, 2, batches, timeout=600)


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_recomputation_changes_no_gradient(results, case):
    (_, _, _, _, settings), = [c for c in CASES if c[0] == case]
    for rank in results:
        want, calls = rank[(case, None)]["grads"], rank[(case, None)]["calls"]
        assert want and any(g.abs().sum() > 0 for g in want.values())
        for setting in settings:
            got = rank[(case, setting)]["grads"]
            # the setting took effect: what it recomputes ran forward again
            again = rank[(case, setting)]["calls"]
            full = ("core_attention", "mlp") + (("experts",) if case == "moe_ep2" else ())
            recomputed = {"full_uniform": full, "full_block": ("core_attention", "mlp"),
                          "selective": ("core_attention",), "selective_all": ("core_attention", "mlp"),
                          "moe": ("core_attention", "experts"), "chunked": (), "chunked_full": full}[setting]
            for kind in recomputed:
                assert again[kind] > calls[kind], (case, setting, kind, again, calls)
            # chunked: the output layer's weight is used chunk by chunk, the layer never runs whole
            if rank[(case, None)]["last_stage"]:
                assert (again["output_layer"] == 0) == (setting in CHUNKED), (case, setting, again, calls)
            assert got.keys() == want.keys()
            for name, grad in want.items():
                if setting in CHUNKED:
                    torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6,
                                               msg=lambda m: f"{case} {setting} {name}: {m}")
                else:
                    assert torch.equal(got[name], grad), (case, setting, name, (got[name] - grad).abs().max())


@pytest.mark.parametrize("overrides,message", [
    (["model.recompute_granularity=full"], r"needs model.recompute_method \(uniform or block\) and "
                                           r"model.recompute_num_layers"),
    (["model.recompute_method=block"], r"model.recompute_method='block' only applies to "
                                       r"model.recompute_granularity='full', got None"),
    (["model.recompute_granularity=selective", "model.recompute_num_layers=2"], r"recompute_num_layers=2 only "
                                                                                r"applies to"),
    (["model.recompute_modules=[mlp]"], r"recompute_modules=\['mlp'\] only applies to .*'selective'"),
    (["model.recompute_granularity=selective", "model.recompute_modules=[attention]"],
     r"\['attention'\] is not among \['core_attn', 'layernorm', 'mlp', 'moe'\]"),
    (["model.recompute_granularity=selective", "model.recompute_modules=[moe]"], r"'moe' needs a mixture-of-experts"),
    (["model.num_layers=4", "parallel.pipeline_model_parallel_size=2", "model.recompute_granularity=full",
      "model.recompute_method=block", "model.recompute_num_layers=3"],
     r"recompute_num_layers \(3\) exceeds the layers of one pipeline stage \(2"),
])
def test_recompute_settings_are_checked_before_any_work(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_layernorm_recompute_without_transformer_engine_is_refused():
    from megatron_rpo.models import transformer_config

    c = load_config(None, ["model.recompute_granularity=selective", "model.recompute_modules=[layernorm]"])
    with pytest.raises(ValueError, match=r"'layernorm' needs transformer-engine"):
        transformer_config(c.model, c.parallel)


def test_without_recompute_keeps_the_architecture():
    """What the frozen reference is built with and what an export records."""
    model = load_config(None, _overrides("model", dict(BASE, **SETTINGS["full_block"])) + ["data.max_length=64",
                                                                                          "data.max_prompt_length=32"]).model
    plain = model.without_recompute()
    assert plain.recompute_granularity is None and plain.recompute_num_layers is None
    assert plain.hidden_size == model.hidden_size
