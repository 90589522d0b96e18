"""Qwen3, Qwen3-MoE and Mixtral (issue 20) on tiny random models built here: the converted model's
logits equal transformers' at TP 1, TP 2 (+ sequence parallel), PP 2, EP 2 and TP 2 x EP 2; the
router's pre-softmax mapping is the one that matches; HF -> Megatron -> HF is bit-identical.

The layouts of one world size share one spawn (megatron's parallel state is laid out again per case).
"""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_rpo.convert import convert_hf_to_megatron, convert_megatron_to_hf
from tests.multiprocess import run_ranks
from tests.workspace import hf_family_model

VOCAB, LAYERS = 100, 4
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
FAMILIES = ("qwen3", "qwen3_moe", "qwen3_moe_norm", "mixtral")
MOE = ("qwen3_moe", "qwen3_moe_norm", "mixtral")


def _randomised(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Larger than the default init, so a wrong layout or routing shows in the logits.
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name
                    else 0.15 * torch.randn(p.shape, generator=g))
    return model.float().eval()


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    out = {}
    for kind in FAMILIES:
        root = tmp_path_factory.mktemp(kind)
        model = _randomised(hf_family_model(kind, **SIZES))
        model.save_pretrained(root / "hf")
        meta = convert_hf_to_megatron(str(root / "hf"), str(root / "megatron"), progress=False)
        with torch.no_grad():
            logits = model(tokens).logits
        out[kind] = {"root": root, "meta": meta, "logits": logits}
    return {"tokens": tokens, "kinds": out}


def _logits(ckpt_dir, tp, pp, ep, etp, tokens, flip_pre_softmax=False):
    """This layout's logits of the converted checkpoint ([b, s, V] on the last stage's ranks, else None)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rpo import parallel
    from megatron_rpo.config import Config, DataConfig, ParallelConfig
    from megatron_rpo.convert import ConvertedCheckpoint, load_converted
    from megatron_rpo.models import model_provider

    model_config = ConvertedCheckpoint(ckpt_dir).model_config
    if flip_pre_softmax:
        model_config = dataclasses.replace(model_config, moe_router_pre_softmax=not model_config.moe_router_pre_softmax)
    config = Config(model=model_config,
                    parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                            expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                                            sequence_parallel=tp > 1),
                    data=DataConfig(max_prompt_length=16, max_length=32))
    parallel.initialize(config.parallel)
    try:
        model = model_provider(config)
        load_converted(model, ckpt_dir)
        model.eval()
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        kept = []

        def step(_, m):
            out = m(tokens, positions, None)
            if ps.is_pipeline_last_stage():
                kept.append(out.detach().clone())
            return out, lambda o: (o.sum() * 0.0, {})

        with torch.no_grad():
            get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]), model=[model],
                                        num_microbatches=1, seq_length=tokens.shape[1],
                                        micro_batch_size=tokens.shape[0], forward_only=True)
        if not ps.is_pipeline_last_stage():
            return None
        group = ps.get_tensor_model_parallel_group()
        shards = [torch.empty_like(kept[0]) for _ in range(dist.get_world_size(group))]
        dist.all_gather(shards, kept[0].contiguous(), group=group)
        return torch.cat(shards, dim=-1)[..., :VOCAB]  # [b, s, V_pad] -> the real vocabulary
    finally:
        ps.destroy_model_parallel()


def _each(cases):
    return [_logits(*case) for case in cases]


def _check(families, cases, results):
    for case, outputs in zip(cases, zip(*results)):
        kind, flipped = case[0], case[-1]
        expected = families["kinds"][kind]["logits"]
        got = [o for o in outputs if o is not None]
        assert got, case
        for logits in got:
            if flipped:
                # The other mapping routes with other weights: the logits move far beyond float noise.
                assert (logits - expected).abs().max() > 1e-2, case
            else:
                torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4, msg=str(case))


def test_logits_equal_transformers_at_tp1_tp2_pp2_ep2(families):
    """Two ranks: TP 1 (each rank alone), TP 2 + SP, PP 2, and EP 2 for the MoE families; the router
    mapped the other way (pre-softmax flipped) must not match."""
    layouts = [(1, 1, 1, None), (2, 1, 1, None), (1, 2, 1, None)]
    cases = [(kind, *layout) for kind in FAMILIES for layout in layouts]
    cases += [(kind, 1, 1, 2, None) for kind in MOE]
    flipped = [("qwen3_moe", 1, 1, 1, None, True), ("qwen3_moe_norm", 1, 1, 1, None, True)]
    cases = [c + (False,) for c in cases] + flipped
    args = [(str(families["kinds"][c[0]]["root"] / "megatron"), *c[1:5], families["tokens"], c[5]) for c in cases]
    _check(families, cases, run_ranks(_each, 2, args, timeout=600))


def test_logits_equal_transformers_at_tp2_x_ep2(families):
    """Four ranks: TP 2 x EP 2 with the experts split inside (ETP 2) and whole (ETP 1)."""
    cases = [("qwen3_moe", 2, 1, 2, None, False), ("qwen3_moe", 2, 1, 2, 1, False), ("mixtral", 2, 1, 2, 1, False)]
    args = [(str(families["kinds"][c[0]]["root"] / "megatron"), *c[1:5], families["tokens"], c[5]) for c in cases]
    _check(families, cases, run_ranks(_each, 4, args, timeout=600))


@pytest.mark.parametrize("kind", FAMILIES)
def test_round_trip_is_bit_identical_and_loads_in_transformers(families, kind):
    import os

    from transformers import AutoModelForCausalLM

    root = families["kinds"][kind]["root"]
    convert_megatron_to_hf(str(root / "megatron"), str(root / "back"), progress=False)

    def tensors(d):
        return {k: v for f in os.listdir(d) if f.endswith(".safetensors") for k, v in load_file(d / f).items()}

    before, after = tensors(root / "hf"), tensors(root / "back")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    model = AutoModelForCausalLM.from_pretrained(root / "back").float().eval()
    with torch.no_grad():
        assert torch.equal(model(families["tokens"]).logits, families["kinds"][kind]["logits"])


def test_metadata_maps_each_family(families):
    m = {kind: families["kinds"][kind]["meta"]["model"] for kind in FAMILIES}
    assert (m["qwen3"]["qk_layernorm"], m["qwen3"]["kv_channels"], m["qwen3"]["num_moe_experts"]) == (True, 24, None)
    assert not m["qwen3"]["untie_embeddings_and_output_weights"]
    q = m["qwen3_moe"]
    assert (q["num_moe_experts"], q["moe_router_topk"], q["moe_ffn_hidden_size"], q["moe_layer_freq"]) == (4, 2, 32,
                                                                                                         [1, 0, 1, 1])
    assert (q["kv_channels"], q["moe_aux_loss_coeff"]) == (None, 0.01)  # head_dim 16 = 64 / 4
    # norm_topk_prob false: softmax over all experts then top-k (megatron's pre-softmax); true: the other way
    assert q["moe_router_pre_softmax"] and not m["qwen3_moe_norm"]["moe_router_pre_softmax"]
    x = m["mixtral"]
    assert (x["moe_router_pre_softmax"], x["moe_layer_freq"], x["qk_layernorm"], x["moe_ffn_hidden_size"]) == (
        False, 1, False, 96)
    assert families["kinds"]["mixtral"]["meta"]["architecture"] == "MixtralForCausalLM"


def test_what_these_families_carry_and_we_do_not_is_refused_by_name():
    from megatron_rpo.convert.hf_config import model_config_from_hf

    def config(kind):
        hf = hf_family_model(kind, **SIZES)
        return dict(json.loads(hf.config.to_json_string()), architectures=[type(hf).__name__])

    cases = [
        (dict(config("qwen3_moe"), shared_expert_intermediate_size=64),
         r"shared experts \(shared_expert_intermediate_size=64\)"),
        (dict(config("mixtral"), router_jitter_noise=0.1), r"router_jitter_noise=0.1 is not supported"),
        (dict(config("mixtral"), sliding_window=4096), r"sliding_window=4096 is not supported"),
        (dict(config("qwen3"), use_sliding_window=True), r"use_sliding_window=true is not supported"),
        (dict(config("qwen3"), layer_types=["sliding_attention"] * LAYERS), r"layer_types \['sliding_attention'\]"),
        (dict(config("qwen3_moe"), num_experts_per_tok=1, norm_topk_prob=True), r"moe_router_topk=1 needs"),
        (dict(config("qwen3_moe"), rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"RoPE scaling 'yarn'"),
        ({**{k: v for k, v in config("qwen3_moe").items() if k not in ("num_experts", "num_local_experts")}},
         r"missing field 'num_experts'"),
    ]
    for cfg, match in cases:
        with pytest.raises(ValueError, match=match):
            model_config_from_hf(cfg, "x/config.json")
    cfg = dict(config("qwen3"), architectures=["OlmoeForCausalLM"])
    with pytest.raises(ValueError, match=r"unsupported architecture \['OlmoeForCausalLM'\]"):
        model_config_from_hf(cfg, "x/config.json")
