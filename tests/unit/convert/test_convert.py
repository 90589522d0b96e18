"""HF <-> Megatron conversion on tiny random models built here (nothing downloaded): logits of the
converted model under every TP/PP split equal transformers' logits; HF -> Megatron -> HF is exact."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_rpo.convert import convert_hf_to_megatron, convert_megatron_to_hf
from tests.multiprocess import run_ranks

VOCAB, LAYERS = 100, 4


def _hf_model(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    if kind == "llama_gqa":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=500000.0))
    elif kind == "llama31":
        # Llama-3.1's RoPE scaling; with head_dim 16 and theta 5e5 most frequencies are rescaled.
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}))
    elif kind == "llama_tied":
        model = LlamaForCausalLM(LlamaConfig(**dict(common, num_key_value_heads=4), tie_word_embeddings=True))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, rope_theta=1e6, sliding_window=None))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Larger than the default init, so a wrong layout shows in the logits.
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name else 0.15 * torch.randn(p.shape, generator=g))
    return model.float().eval()


KINDS = ["llama_gqa", "llama_tied", "mistral", "qwen2_bias", "llama31"]


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


def _megatron_logits(ckpt_dir, tp, pp, tokens):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_rpo import parallel
    from megatron_rpo.config import Config, DataConfig, ParallelConfig
    from megatron_rpo.convert import ConvertedCheckpoint, load_converted
    from megatron_rpo.models import model_provider

    config = Config(model=ConvertedCheckpoint(ckpt_dir).model_config,
                    parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                    data=DataConfig(max_prompt_length=16, max_length=32))
    parallel.initialize(config.parallel)
    try:
        model = model_provider(config)
        load_converted(model, ckpt_dir)
        if pp == 1:
            out = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
        else:
            from megatron.core.pipeline_parallel import get_forward_backward_func

            kept = []

            def step(it, m):
                out = m(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
                if ps.is_pipeline_last_stage():
                    kept.append(out.detach().clone())
                return out, lambda o: (o.sum() * 0.0, {})

            get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]), model=[model],
                                        num_microbatches=1, seq_length=tokens.shape[1],
                                        micro_batch_size=tokens.shape[0], forward_only=True)
            out = kept[0] if kept else None
        if not ps.is_pipeline_last_stage():
            return None
        group = ps.get_tensor_model_parallel_group()
        shards = [torch.empty_like(out) for _ in range(dist.get_world_size(group))]
        dist.all_gather(shards, out.contiguous(), group=group)
        return torch.cat(shards, dim=-1)[..., :VOCAB]  # [b, s, V_pad] -> the real vocabulary
    finally:
        ps.destroy_model_parallel()  # the process group stays for the next case


def _each_layout(cases):
    return [_megatron_logits(*case) for case in cases]


# Each family runs TP 1 and TP 2 x PP 2; Llama runs every split. One spawn per world size.
LAYOUTS = {1: [(kind, 1, 1) for kind in KINDS], 2: [("llama_gqa", 2, 1), ("llama_gqa", 1, 2)],
           4: [(kind, 2, 2) for kind in KINDS]}


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_converted_logits_equal_transformers(all_converted, world):
    cases = LAYOUTS[world]
    args = [(str(all_converted[kind]["root"] / "megatron"), tp, pp, all_converted[kind]["tokens"])
            for kind, tp, pp in cases]
    ranks = run_ranks(_each_layout, world, args, timeout=600)
    for (kind, tp, pp), outputs in zip(cases, zip(*ranks)):
        got = [r for r in outputs if r is not None]
        assert len(got) == tp * world // (tp * pp), (kind, tp, pp)  # the last stage's ranks of each replica
        for logits in got:
            torch.testing.assert_close(logits, all_converted[kind]["logits"], rtol=1e-4, atol=1e-4,
                                       msg=f"{kind} TP {tp} PP {pp}")


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


def test_metadata(converted):
    meta = converted["meta"]
    m = meta["model"]
    assert (m["num_layers"], m["hidden_size"], m["vocab_size"], m["num_query_groups"]) == (4, 64, VOCAB,
                                                                                         4 if converted["kind"] == "llama_tied" else 2)
    assert m["add_qkv_bias"] == (converted["kind"] == "qwen2_bias")
    assert m["untie_embeddings_and_output_weights"] == (converted["kind"] != "llama_tied")
    if converted["kind"] == "llama_gqa":
        assert m["rotary_base"] == 500000.0


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
