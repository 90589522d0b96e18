"""HF <-> Megatron conversion on tiny random models built here (nothing downloaded): logits of the
converted model under every TP/PP/EP split equal transformers' logits; HF -> Megatron -> HF is exact.

Llama, Mistral and Qwen2, and (issue 20) Qwen3, Qwen3-MoE and Mixtral; the layouts of one world
size share one spawn (megatron's parallel state is laid out again per case).
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_rpo.convert import convert_hf_to_megatron, convert_megatron_to_hf
from tests.multiprocess import run_ranks
from tests.workspace import hf_family_model

VOCAB, LAYERS = 100, 4


DENSE = ["llama_gqa", "llama_tied", "mistral", "qwen2_bias", "llama31"]
FAMILIES = ["qwen3", "qwen3_moe", "qwen3_moe_norm", "mixtral"]  # issue 20 (tests/workspace.py:hf_family_model)
MOE = ["qwen3_moe", "qwen3_moe_norm", "mixtral"]
KINDS = DENSE + FAMILIES
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)


def _hf_model(kind: str):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    if kind in FAMILIES:
        model = hf_family_model(kind, **SIZES)
    elif kind == "llama_gqa":
        model = LlamaForCausalLM(LlamaConfig(**SIZES, rope_theta=500000.0))
    elif kind == "llama31":
        # Llama-3.1's RoPE scaling; with head_dim 16 and theta 5e5 most frequencies are rescaled.
        model = LlamaForCausalLM(LlamaConfig(**SIZES, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}))
    elif kind == "llama_tied":
        model = LlamaForCausalLM(LlamaConfig(**dict(SIZES, num_key_value_heads=4), tie_word_embeddings=True))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**SIZES, rope_theta=1e6, sliding_window=None))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=False))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Larger than the default init, so a wrong layout or routing shows in the logits.
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name
                    else 0.15 * torch.randn(p.shape, generator=g))
    return model.float().eval()


@pytest.fixture(scope="module")
def all_converted(tmp_path_factory):
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    out = {}
    for kind in KINDS:
        root = tmp_path_factory.mktemp(kind)
        model = _hf_model(kind)
        model.save_pretrained(root / "hf")
        meta = convert_hf_to_megatron(str(root / "hf"), str(root / "megatron"), progress=False)
        with torch.no_grad():
            logits = model(tokens).logits
        out[kind] = {"root": root, "meta": meta, "tokens": tokens, "logits": logits, "kind": kind}
    return out


@pytest.fixture(params=KINDS)
def converted(request, all_converted):
    return all_converted[request.param]


def _megatron_logits(ckpt_dir, tp, pp, ep, etp, sp, flip_pre_softmax, tokens):
    """This layout's logits of the converted checkpoint ([b, s, V] on the last stage's ranks, else None);
    ``flip_pre_softmax`` maps the router the other way."""
    import dataclasses

    from megatron.core import parallel_state as ps

    from megatron_rpo import parallel
    from megatron_rpo.config import Config, DataConfig, ParallelConfig
    from megatron_rpo.convert import ConvertedCheckpoint, load_converted
    from megatron_rpo.models import model_provider
    from tests.unit.megatron_helpers import layout_logits

    model_config = ConvertedCheckpoint(ckpt_dir).model_config
    if flip_pre_softmax:
        model_config = dataclasses.replace(model_config, moe_router_pre_softmax=not model_config.moe_router_pre_softmax)
    config = Config(model=model_config,
                    parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                            expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                                            sequence_parallel=sp),
                    data=DataConfig(max_prompt_length=16, max_length=32))
    parallel.initialize(config.parallel)
    try:
        model = model_provider(config)
        load_converted(model, ckpt_dir)
        model.eval()
        return layout_logits(model, tokens, VOCAB)
    finally:
        ps.destroy_model_parallel()  # the process group stays for the next case


def _each_layout(cases):
    return [_megatron_logits(*case) for case in cases]


def _case(kind, tp=1, pp=1, ep=1, etp=None, sp=None, flip=False):
    """(kind, TP, PP, EP, ETP, sequence parallel, flipped router); SP by default for the families at TP > 1."""
    return (kind, tp, pp, ep, etp, tp > 1 and kind in FAMILIES if sp is None else sp, flip)


# Each dense family runs TP 1 and TP 2 x PP 2 (Llama every split); Qwen3, Qwen3-MoE and Mixtral run
# TP 1, TP 2 + SP, PP 2, EP 2 and TP 2 x EP 2 (experts split inside, ETP 2, and whole, ETP 1); the
# router mapped the other way must not match. One spawn per world size.
LAYOUTS = {
    1: [_case(kind) for kind in KINDS],
    2: ([_case("llama_gqa", tp=2), _case("llama_gqa", pp=2)] + [_case(k, tp=2) for k in FAMILIES]
        + [_case(k, pp=2) for k in FAMILIES] + [_case(k, ep=2) for k in MOE]
        + [_case("qwen3_moe", flip=True), _case("qwen3_moe_norm", flip=True)]),
    4: ([_case(kind, tp=2, pp=2) for kind in DENSE]
        + [_case("qwen3_moe", tp=2, ep=2), _case("qwen3_moe", tp=2, ep=2, etp=1), _case("mixtral", tp=2, ep=2, etp=1)]),
}


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_converted_logits_equal_transformers(all_converted, world):
    cases = LAYOUTS[world]
    args = [(str(all_converted[c[0]]["root"] / "megatron"), *c[1:], all_converted[c[0]]["tokens"]) for c in cases]
    ranks = run_ranks(_each_layout, world, args, timeout=600)
    for case, outputs in zip(cases, zip(*ranks)):
        kind, pp, flipped = case[0], case[2], case[-1]
        got = [r for r in outputs if r is not None]
        assert len(got) == world // pp, case  # the last stage's ranks
        expected = all_converted[kind]["logits"]
        for logits in got:
            if flipped:
                # The other mapping routes with other weights: the logits move far beyond float noise.
                assert (logits - expected).abs().max() > 1e-2, case
            else:
                torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4, msg=str(case))


def _tensors(hf_dir):
    out = {}
    for name in os.listdir(hf_dir):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(hf_dir, name)))
    return out


def test_round_trip_is_bit_identical_and_loads_in_transformers(converted):
    from transformers import AutoModelForCausalLM

    root = converted["root"]
    convert_megatron_to_hf(str(root / "megatron"), str(root / "back"), progress=False)
    before, after = _tensors(root / "hf"), _tensors(root / "back")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert tensor.dtype == after[name].dtype and torch.equal(tensor, after[name]), name
    model = AutoModelForCausalLM.from_pretrained(root / "back").float().eval()
    with torch.no_grad():
        assert torch.equal(model(converted["tokens"]).logits, converted["logits"])


def test_metadata(all_converted):
    for kind in DENSE:
        m = all_converted[kind]["meta"]["model"]
        groups = 4 if kind == "llama_tied" else 2
        assert (m["num_layers"], m["hidden_size"], m["vocab_size"], m["num_query_groups"]) == (4, 64, VOCAB, groups)
        assert m["add_qkv_bias"] == (kind == "qwen2_bias")
        assert m["untie_embeddings_and_output_weights"] == (kind != "llama_tied")
        assert not m["qk_layernorm"] and m["num_moe_experts"] is None
    assert all_converted["llama_gqa"]["meta"]["model"]["rotary_base"] == 500000.0


def _small_hf(tmp_path):
    model = _hf_model("llama_gqa")
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_errors_name_the_problem_and_leave_nothing(tmp_path):
    hf = _small_hf(tmp_path)
    out = tmp_path / "out"
    weights = hf / "model.safetensors"
    original = load_file(weights)

    def fails(match, **kwargs):
        with pytest.raises(ValueError, match=match):
            convert_hf_to_megatron(str(hf), str(out), progress=False, **kwargs)
        assert not out.exists() and not list(tmp_path.glob("out.tmp*"))

    fails(r"num_attention_heads \(4\) is not divisible by parallel.tensor_model_parallel_size \(3\)",
          tensor_model_parallel_size=3)
    fails(r"--expert-model-parallel-size 2 splits experts, and .* \(LlamaForCausalLM\) is a dense model: leave it out",
          expert_model_parallel_size=2)
    missing = dict(original)
    del missing["model.layers.2.mlp.up_proj.weight"]
    save_file(missing, weights)
    fails(r"tensor 'model.layers.2.mlp.up_proj.weight' is missing")
    extra = dict(original, **{"model.layers.9.self_attn.q_proj.weight": torch.zeros(4)})
    save_file(extra, weights)
    fails(r"tensors not consumed by the conversion: \['model.layers.9.self_attn.q_proj.weight'\]")
    bad = dict(original, **{"model.layers.1.self_attn.o_proj.weight": torch.zeros(64, 32)})
    save_file(bad, weights)
    fails(r"decoder.layers.1.self_attention.linear_proj.weight \(from model.layers.1.self_attn.o_proj.weight\): "
          r"shape \(64, 32\), expected \(64, 64\)")
    save_file(original, weights)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(dict(config, architectures=["GPT2LMHeadModel"])))
    fails(r"unsupported architecture \['GPT2LMHeadModel'\]")
    (hf / "config.json").unlink()
    fails(r"not a Hugging Face model directory: no config.json")


def test_a_truncated_hugging_face_shard_is_named(tmp_path):
    # Issue 31 item 5: a shard cut short made conversion end in safetensors' own error, no file named.
    model = _hf_model("llama_gqa")
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].write_bytes(shards[1].read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"{shards[1]}: cannot read tensor '.*' \(SafetensorError: .*\); the "
                                         "file is truncated or corrupt, download or copy the file again"):
        convert_hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "out"), progress=False)
    assert not list(tmp_path.glob("out*"))


def test_what_a_killed_conversion_left_is_removed_by_the_next(tmp_path):
    # Issue 31 item 6: kill -9 during conversion left <output>.tmp-<id> (tens of GB at 70B) for ever.
    import subprocess

    from megatron_rpo.publish import staging_tag

    hf = _small_hf(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    tag = staging_tag().rsplit("-", 2)[0] + f"-{dead.pid}-0123abcd"  # this host, a process that is gone
    left = tmp_path / f"out{tag}"
    (left / "weights").mkdir(parents=True)
    (left / "weights" / "layer_00000.safetensors").write_bytes(b"half")
    alive = tmp_path / f"out{staging_tag()}"  # this process's: a run in progress, kept
    alive.mkdir()
    convert_hf_to_megatron(str(hf), str(tmp_path / "out"), progress=False)
    assert (tmp_path / "out" / "megatron_rpo_checkpoint.json").exists()
    assert not left.exists() and alive.exists()


def test_existing_output_is_refused(tmp_path):
    hf = _small_hf(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="exists and is not empty"):
        convert_hf_to_megatron(str(hf), str(tmp_path / "out"), progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def _load_into_model(ckpt_dir):
    from megatron_rpo import parallel
    from megatron_rpo.config import Config, DataConfig
    from megatron_rpo.convert import ConvertedCheckpoint, load_converted
    from megatron_rpo.models import model_provider

    config = Config(model=ConvertedCheckpoint(ckpt_dir).model_config, data=DataConfig(max_prompt_length=16,
                                                                                      max_length=32))
    parallel.initialize(config.parallel)
    try:
        load_converted(model_provider(config), ckpt_dir)
    except ValueError as e:
        return str(e)
    return None


def test_corrupt_checkpoints_are_named_value_errors(tmp_path):
    import shutil

    model = _hf_model("llama_gqa")
    model.save_pretrained(tmp_path / "hf")
    good = tmp_path / "good"
    convert_hf_to_megatron(str(tmp_path / "hf"), str(good), progress=False)

    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    layer = truncated / "weights" / "layer_00001.safetensors"
    layer.write_bytes(layer.read_bytes()[:100])
    (message,) = run_ranks(_load_into_model, 1, str(truncated))
    assert message and str(layer) in message and "truncated or corrupt" in message

    wider = tmp_path / "wider"
    shutil.copytree(good, wider)
    marker = wider / "megatron_rpo_checkpoint.json"
    meta = json.loads(marker.read_text())
    meta["model"].update(hidden_size=128, ffn_hidden_size=192)  # the tensors stay 64 wide
    marker.write_text(json.dumps(meta))
    (message,) = run_ranks(_load_into_model, 1, str(wider))
    assert message and "embedding.word_embeddings.weight' has shape (100, 64) but the model expects" in message
    assert "embedding.safetensors" in message


def test_a_tokenizer_that_does_not_fit_the_vocabulary_is_refused(tmp_path, sp_tokenizer):
    """Issue 19: a 3-token tokenizer was copied into a vocabulary-100 checkpoint without comment."""
    import shutil

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    hf = _small_hf(tmp_path)
    out = tmp_path / "out"
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1, "</s>": 2}, unk_token="a")),
                            eos_token="</s>").save_pretrained(hf)
    with pytest.raises(ValueError, match=rf"{hf}: the tokenizer has 3 tokens for a model vocabulary of {VOCAB} "):
        convert_hf_to_megatron(str(hf), str(out), progress=False)
    assert not out.exists()
    for name in os.listdir(hf):
        if name.startswith(("tokenizer", "special_tokens")):
            os.remove(hf / name)
    shutil.copy(sp_tokenizer, hf / "tokenizer.model")  # 800 sentencepiece tokens, 100 embedding rows
    with pytest.raises(ValueError, match=rf"tokenizer.model: the tokenizer has 800 tokens, more than the model's "
                                         rf"vocabulary \({VOCAB}"):
        convert_hf_to_megatron(str(hf), str(out), progress=False)
    assert not out.exists()


def test_family_metadata(all_converted):
    m = {kind: all_converted[kind]["meta"]["model"] for kind in FAMILIES}
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
    assert all_converted["mixtral"]["meta"]["architecture"] == "MixtralForCausalLM"


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
