"""Low-rank adapters on megatron's parallel linears (megatron_rpo/models/lora.py): the same loss and
adapter gradients at TP 2 (with and without SP), PP 2 and TP 2 x PP 2 as one process; an adapted
layer against its float64 formula and against its merged weight; the base back, exactly, with the
adapters switched off."""

import json

import pytest
import torch

from tests.multiprocess import Spawns, run_ranks
from tests.unit.megatron_helpers import SEQ, VOCAB, fill_by_name, full_grads, make_batch, tiny_config

PROMPTS = [4, 6, 3, 4, 6, 3]
RESPONSES = [8, 5, 11, 10, 3, 6]
LAYOUTS = [(2, 1, False), (2, 1, True), (1, 2, False), (2, 2, True)]


def _microbatches():
    return [make_batch(PROMPTS, RESPONSES, SEQ, VOCAB, seed=30 + i) for i in range(2)]


def _step(tp, pp, sp, microbatches):
    from megatron.core import parallel_state as ps

    from megatron_rpo import parallel
    from megatron_rpo.models import model_provider
    from megatron_rpo.config import LoRAConfig
    from megatron_rpo.models.lora import apply_lora
    from megatron_rpo.training.step import forward_backward

    config = tiny_config(tp=tp, pp=pp, sp=sp, loss_type="rpo", weighting="embedding")
    parallel.initialize(config.parallel)
    try:
        model = model_provider(config)
        adapted = apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
        fill_by_name(model, VOCAB)  # the adapters too, by name: B is not zero, so they act
        reports = forward_backward(model, microbatches, config.loss)
        grads = full_grads(model, VOCAB)
        return {"adapted": adapted, "reports": reports if ps.is_pipeline_last_stage() else None,
                "grads": grads if ps.get_tensor_model_parallel_rank() == 0 else None}
    finally:
        ps.destroy_model_parallel()


@pytest.fixture(scope="module")
def runs() -> Spawns:
    return Spawns(lambda layout: run_ranks(_step, layout[0] * layout[1], *layout, _microbatches(), timeout=600))


@pytest.mark.parametrize("tp,pp,sp", LAYOUTS)
def test_adapter_gradients_and_loss_equal_one_process(runs, tp, pp, sp):
    (single,) = runs[1, 1, False]
    ranks = runs[tp, pp, sp]
    merged = {}
    for r in ranks:
        merged.update(r["grads"] or {})
    want = single["grads"]
    assert merged.keys() == want.keys() and all(".lora_" in n for n in want)  # the base is frozen
    assert len(want) == 2 * 4 * 4  # A and B on 4 linears of 4 layers
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in want.values()))
    assert norm > 0
    for name, g in want.items():
        assert (merged[name] - g).norm() <= 1e-5 * norm, name
    (last,) = [r["reports"] for r in ranks if r["reports"] is not None][:1]
    for got, expected in zip(last, single["reports"]):
        torch.testing.assert_close(got["loss"], expected["loss"], rtol=1e-5, atol=1e-6)


def _layers():
    from megatron_rpo import parallel
    from megatron_rpo.models import model_provider
    from megatron_rpo.config import LoRAConfig
    from megatron_rpo.models.lora import adapters_disabled, apply_lora, merged_delta

    config = tiny_config(loss_type="rpo")
    parallel.initialize(config.parallel)
    model = model_provider(config)
    fill_by_name(model, VOCAB)
    tokens = make_batch(PROMPTS, RESPONSES, SEQ, VOCAB, seed=3)["tokens"]
    position = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        base = model(tokens, position, None).clone()
        apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
        fresh = model(tokens, position, None).clone()  # B starts at zero
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        adapted = model(tokens, position, None).clone()
        with adapters_disabled(model):
            off = model(tokens, position, None).clone()
        # One layer against its float64 formula: W x + (alpha / r) B A x.
        layer = model.decoder.layers[0].mlp.linear_fc2
        x = torch.randn(5, 1, layer.weight.shape[1], generator=torch.Generator().manual_seed(1))
        y, _ = layer(x)
        w, a, b = (t.double() for t in (layer.weight, layer.lora_A, layer.lora_B))
        want = x.double() @ w.T + 2.0 * (x.double() @ a.T) @ b.T
        formula = (y.double() - want).abs().max().item()
        # Merged: the adapters folded into the base weights give the adapted model's output.
        for module in model.modules():
            if hasattr(module, "lora_A"):
                module.weight.add_(merged_delta(module))
        with adapters_disabled(model):
            merged = model(tokens, position, None).clone()
    return {"base": base, "fresh": fresh, "adapted": adapted, "off": off, "merged": merged, "formula": formula}


def test_adapters_off_give_the_base_and_merged_weights_give_the_adapters():
    (out,) = run_ranks(_layers, 1, timeout=300)
    assert torch.equal(out["fresh"], out["base"])          # B = 0: the adapted model starts as its base
    assert torch.equal(out["off"], out["base"])            # switched off: the base, exactly (the reference)
    assert (out["adapted"] - out["base"]).abs().max() > 1e-3
    torch.testing.assert_close(out["merged"], out["adapted"], rtol=1e-4, atol=1e-4)
    assert out["formula"] < 1e-5


# -- against peft: the exported adapter folder on the Hugging Face model --------------------------

PEFT_VOCAB = 100
PEFT_SIZES = dict(vocab_size=PEFT_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
# (family, TP, PP, EP, ETP, SP): the dense model at TP 1, TP 2 + SP and PP 2; the mixtures of experts
# (attention and every expert adapted) at EP 2, TP 2 + SP x EP 2 (ETP 2: the experts split too) and
# TP 2 + SP x EP 2 at ETP 1
PEFT_LAYOUTS = [("llama", 1, 1, 1, None, False), ("llama", 2, 1, 1, None, True), ("llama", 1, 2, 1, None, False),
                ("qwen3_moe", 1, 1, 2, None, False), ("mixtral", 2, 1, 2, None, True), ("qwen3_moe", 2, 1, 2, 1, True)]


def _peft_run(ckpt, tp, pp, ep, etp, sp, tokens, adapter_dir, merged_dir):
    """This layout's logits with adapters filled by name (B not 0), its PEFT folder and its merged export."""
    import zlib

    from megatron.core import parallel_state as ps

    from megatron_rpo import parallel
    from megatron_rpo.config import Config, DataConfig, LoRAConfig, ParallelConfig
    from megatron_rpo.convert import ConvertedCheckpoint, load_converted
    from megatron_rpo.convert.peft import save_peft_adapter
    from megatron_rpo.convert.save import save_converted
    from megatron_rpo.models import model_provider
    from tests.unit.megatron_helpers import full_shape, global_name, layout_logits, shard

    lora = LoRAConfig(rank=4, alpha=8.0)
    model_config = ConvertedCheckpoint(ckpt).model_config
    config = Config(model=model_config, lora=lora, data=DataConfig(max_prompt_length=16, max_length=32),
                    parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                            expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                                            sequence_parallel=sp))
    parallel.initialize(config.parallel)
    try:
        model = model_provider(config)
        load_converted(model, ckpt)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_" in name:
                    g = torch.Generator().manual_seed(zlib.crc32(global_name(model, name).encode()))
                    p.copy_(shard(torch.randn(full_shape(p), generator=g) * 0.1, p))
        model.eval()
        logits = layout_logits(model, tokens, PEFT_VOCAB)
        save_peft_adapter(model, adapter_dir, model_config, lora, ckpt)
        save_converted(model, merged_dir, model_config, ckpt)
        return logits
    finally:
        ps.destroy_model_parallel()


@pytest.fixture(scope="module")
def converted_families(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_rpo.convert import convert_hf_to_megatron
    from tests.workspace import hf_family_model

    out = {}
    for family in sorted({layout[0] for layout in PEFT_LAYOUTS}):
        root = tmp_path_factory.mktemp(family)
        torch.manual_seed(0)
        model = (LlamaForCausalLM(LlamaConfig(**PEFT_SIZES, rope_theta=500000.0)) if family == "llama"
                 else hf_family_model(family, **PEFT_SIZES))
        model.save_pretrained(root / "hf")
        convert_hf_to_megatron(str(root / "hf"), str(root / "megatron"), progress=False)
        out[family] = root
    return out


@pytest.mark.parametrize("family,tp,pp,ep,etp,sp", PEFT_LAYOUTS)
def test_the_exported_adapters_give_peft_our_logits_and_the_merged_export_too(converted_families, tmp_path,
                                                                              family, tp, pp, ep, etp, sp):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_rpo.convert import convert_megatron_to_hf

    root = converted_families[family]
    tokens = torch.randint(0, PEFT_VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    ranks = run_ranks(_peft_run, tp * pp * ep, str(root / "megatron"), tp, pp, ep, etp, sp, tokens,
                      str(tmp_path / "adapter"), str(tmp_path / "merged"), timeout=600)
    ours = next(r for r in ranks if r is not None)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(root / "hf", torch_dtype=torch.float32).eval()
        plain = base(tokens).logits
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        theirs = adapted(tokens).logits
    # every tensor of the folder is one peft loaded (a name it did not know would be left at its init)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(adapted)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    experts = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_parameters"]
    assert experts == (["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if ep > 1 else None)
    assert (ours - plain).abs().max() > 1e-2  # the adapters act
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    convert_megatron_to_hf(str(tmp_path / "merged"), str(tmp_path / "merged_hf"), progress=False)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged_hf", torch_dtype=torch.float32).eval()
        torch.testing.assert_close(merged(tokens).logits, theirs, rtol=1e-4, atol=1e-4)
