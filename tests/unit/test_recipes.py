"""Every recipe in configs/ loads, validates, and fits the world it is written for."""

import glob
import os

import pytest

from megatron_rpo.config import MODEL_TRAINING_CHOICES, config_to_dict, explicit_keys, load_config
from tests.workspace import REPO

RECIPES = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
WORLD = {"tiny_cpu.yaml": 2, "mistral7b_hh_rpo_paired.yaml": 8, "mistral7b_hh_rpo_unpaired.yaml": 8,
         "llama3_8b_rpo_tp2.yaml": 8, "llama2_70b_rpo_tp8_pp4.yaml": 64, "llama31_8b_instruct_rpo.yaml": 8,
         "qwen3_8b_rpo.yaml": 8, "qwen3_30b_a3b_rpo.yaml": 32, "mixtral_8x7b_rpo.yaml": 32,
         "llama31_8b_long_rpo.yaml": 8, "mistral7b_hh_kto.yaml": 8, "mistral7b_tldr_rpo.yaml": 8,
         "llama2_70b_rpo_lora_tp8.yaml": 8, "qwen3_30b_a3b_rpo_lora.yaml": 8}


def test_every_recipe_is_listed_here():
    assert {os.path.basename(r) for r in RECIPES} == set(WORLD)


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_loads_and_fits_its_world(path):
    config = load_config(path)
    dp = config.data_parallel_size(WORLD[os.path.basename(path)])
    assert dp >= 1


def test_paper_settings():
    paired = load_config(os.path.join(REPO, "configs", "mistral7b_hh_rpo_paired.yaml"))
    unpaired = load_config(os.path.join(REPO, "configs", "mistral7b_hh_rpo_unpaired.yaml"))
    tldr = load_config(os.path.join(REPO, "configs", "mistral7b_tldr_rpo.yaml"))
    for c in (paired, unpaired, tldr):
        assert (c.loss.beta, c.optimizer.optimizer, c.optimizer.lr, c.train.global_batch_size) == (0.1, "rmsprop", 5e-7, 64)
        assert (c.data.max_prompt_length, c.data.max_length, c.train.train_iters) == (256, 512, None)  # one epoch
    assert (paired.loss.tau, paired.data.paired) == (0.5, True)
    assert config_to_dict(tldr)["loss"] == config_to_dict(paired)["loss"] and tldr.data.paired
    assert (unpaired.loss.tau, unpaired.data.paired) == (0.75, False)
    # The unpaired recipe inherits everything else from the paired one.
    a, b = config_to_dict(paired), config_to_dict(unpaired)
    assert a["model"] == b["model"] and a["optimizer"] == b["optimizer"]


def test_llama31_recipe_takes_its_model_from_the_checkpoint():
    from megatron_rpo.config import explicit_keys

    config = load_config(os.path.join(REPO, "configs", "llama31_8b_instruct_rpo.yaml"))
    assert not any(key.startswith("model.") for key in explicit_keys(config))


# The published config.json of each family's model, the fields conversion reads.
HUB_CONFIGS = {
    "qwen3_8b_rpo.yaml": dict(
        architectures=["Qwen3ForCausalLM"], num_hidden_layers=36, hidden_size=4096, intermediate_size=12288,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False),
    "qwen3_30b_a3b_rpo.yaml": dict(
        architectures=["Qwen3MoeForCausalLM"], num_hidden_layers=48, hidden_size=2048, intermediate_size=6144,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        router_aux_loss_coef=0.001),
    "mixtral_8x7b_rpo.yaml": dict(
        architectures=["MixtralForCausalLM"], num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, num_local_experts=8,
        num_experts_per_tok=2, router_aux_loss_coef=0.02, sliding_window=None),
    "mistral7b_hh_rpo_paired.yaml": dict(
        architectures=["MistralForCausalLM"], num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None),
    "llama31_8b_instruct_rpo.yaml": dict(
        architectures=["LlamaForCausalLM"], num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)),
}
HUB_CONFIGS["mistral7b_hh_rpo_unpaired.yaml"] = HUB_CONFIGS["mistral7b_hh_rpo_paired.yaml"]
HUB_CONFIGS["mistral7b_hh_kto.yaml"] = HUB_CONFIGS["mistral7b_hh_rpo_paired.yaml"]
HUB_CONFIGS["mistral7b_tldr_rpo.yaml"] = HUB_CONFIGS["mistral7b_hh_rpo_paired.yaml"]
HUB_CONFIGS["llama31_8b_long_rpo.yaml"] = HUB_CONFIGS["llama31_8b_instruct_rpo.yaml"]
HUB_CONFIGS["qwen3_30b_a3b_rpo_lora.yaml"] = HUB_CONFIGS["qwen3_30b_a3b_rpo.yaml"]


def _with_hub_model(name: str):
    """The recipe with the model its checkpoint will carry (the published config.json's), as
    training completes it; a recipe that spells its model out as written."""
    import dataclasses

    from megatron_rpo.config import config_from_dict
    from megatron_rpo.convert.hf_config import model_config_from_hf

    config = load_config(os.path.join(REPO, "configs", name))
    if name not in HUB_CONFIGS:
        return config
    model, _ = model_config_from_hf(HUB_CONFIGS[name], name)
    raw = config_to_dict(config)
    explicit = explicit_keys(config)
    said = {k: v for k, v in raw["model"].items() if k in MODEL_TRAINING_CHOICES and f"model.{k}" in explicit}
    raw["model"] = dict(dataclasses.asdict(model), **said)
    return config_from_dict(raw, name)


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_family_recipes_fit_their_models_and_worlds(name):
    """The recipe's layout with the model its checkpoint will carry: experts divide over EP, heads
    and layers over TP and PP, the world factors (what the trainer checks once it reads the model)."""
    config = _with_hub_model(name)
    assert config.data_parallel_size(WORLD[name]) >= 1
    if config.model.num_moe_experts:
        assert config.model.num_moe_experts % config.parallel.expert_model_parallel_size == 0


@pytest.mark.parametrize("name", sorted(set(WORLD) - {"tiny_cpu.yaml"}))
def test_every_gpu_recipe_fits_80_gb_by_the_memory_plan(name):
    """What ``python -m megatron_rpo.plan --config configs/NAME --gpus WORLD`` answers, with the
    model the recipe's checkpoint will carry: each recipe fits the 80 GB GPUs it is written for."""
    from megatron_rpo.plan import describe, plan

    result = plan(_with_hub_model(name), WORLD[name], 80)
    assert result.fits, describe(result)


@pytest.mark.parametrize("path", [r for r in RECIPES if not r.endswith("tiny_cpu.yaml")], ids=os.path.basename)
def test_each_recipe_says_how_to_preprocess_for_it_and_launches_through_the_launcher(path):
    # Issue 31 item 7: the long-context recipe's data was preprocessed at the default lengths, which
    # training then refused; and plain torchrun loses the launcher's exit code 75 after a stop.
    import re

    text = open(path).read()
    flags = re.search(r"^# Preprocess with: --max-prompt-length (\d+) --max-length (\d+) ", text, flags=re.M)
    assert flags, f"{path}: no '# Preprocess with:' line"
    data = load_config(path).data
    assert int(flags[2]) == data.max_length and data.max_prompt_length in (None, int(flags[1]))
    assert not re.search(r"torchrun [^\n]*-m megatron_rpo\.train", text)


@pytest.mark.parametrize("name,low,high", [("llama2_70b_rpo_lora_tp8.yaml", 20, 28),
                                           ("qwen3_30b_a3b_rpo_lora.yaml", 26, 34)])
def test_the_lora_recipes_fit_one_node_with_room_to_spare(name, low, high):
    """Issue 35: 70B (and Qwen3-30B-A3B, its experts adapted too) with adapters on one node of
    8 x 80 GB, and by how much (each recipe's comment says it); full fine-tuning does not fit there."""
    import dataclasses

    from megatron_rpo.config import LoRAConfig
    from megatron_rpo.plan import plan

    config = _with_hub_model(name)
    result = plan(config, 8, 80)
    assert config.lora.enabled and config.loss.reference == "online" and result.fits
    worst = result.worst
    assert "reference weights" not in worst.parts and worst.parts["gradients"] < 2**30  # the adapters' only
    assert low * 2**30 < worst.total < high * 2**30  # the recipe's "about N GiB per GPU"
    assert not plan(dataclasses.replace(config, lora=LoRAConfig()), 8, 80).fits  # without adapters it does not fit
