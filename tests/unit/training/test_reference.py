"""Precomputed reference log-probs (the tool, under TP or DP) equal online ones computed in one process."""

import numpy as np
import pytest
import torch

from tests.multiprocess import run_ranks


@pytest.fixture(scope="module")
def setup(tmp_path_factory, hh_slice, sp_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_rpo.convert import convert_hf_to_megatron
    from megatron_rpo.data.preprocess import preprocess
    from megatron_rpo.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("ref")
    vocab = load_tokenizer(sp_tokenizer).vocab_size
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 initializer_range=0.1)).save_pretrained(root / "hf")
    convert_hf_to_megatron(str(root / "hf"), str(root / "ckpt"), progress=False)
    prefix = str(root / "hh")
    preprocess([hh_slice], "hh", sp_tokenizer, prefix, max_prompt_length=64, max_length=128, progress=False)
    return str(root / "ckpt"), prefix


def _tool(argv):
    from tests.workspace import load_script

    return load_script("tools/precompute_reference_logps.py", "reference_tool").main(argv)


def _online(ckpt, prefix, indices):
    from megatron_rpo import parallel
    from megatron_rpo.config import Config, DataConfig
    from megatron_rpo.data.dataset import PreferenceDataset, collate
    from megatron_rpo.models import model_provider
    from megatron_rpo.training.checkpointing import checkpoint_model_config, load_weights
    from megatron_rpo.training.step import sequence_logps

    config = Config(model=checkpoint_model_config(ckpt), data=DataConfig(max_prompt_length=64, max_length=128))
    parallel.initialize(config.parallel)
    model = model_provider(config)
    load_weights(model, ckpt)
    ds = PreferenceDataset(prefix)
    ((logps, _),) = sequence_logps(model, [collate(ds, indices, 128)])
    return logps


@pytest.mark.parametrize("tp,packing,chunk", [(1, True, None), (2, True, 50), (1, False, None)])
def test_precomputed_equal_online(setup, tp, packing, chunk):
    """The tool's values at TP 1 and TP 2, packed or padded, with log-probs in chunks of 50 tokens at
    TP 2, equal the unchunked online reference of one process."""
    from megatron_rpo.data.dataset import PreferenceDataset

    ckpt, prefix = setup
    argv = ["--load", ckpt, "--data-prefix", prefix, "--micro-batch-size", "7", "--tensor-model-parallel-size",
            str(tp), "--no-progress"] + ([] if packing else ["--no-packing"]) + (
                ["--logprob-chunk-tokens", str(chunk)] if chunk else [])
    results = run_ranks(_tool, 2, argv, timeout=300)
    assert results == [0, 0]
    ds = PreferenceDataset(prefix, reference_logps=True)
    assert ds.ref_logps.shape == (480,) and np.isfinite(ds.ref_logps).all() and (ds.ref_logps < 0).all()
    indices = [0, 1, 57, 200, 479]  # 479 sits in the last, topped-up microbatch
    (online,) = run_ranks(_online, 1, ckpt, prefix, indices)
    np.testing.assert_allclose(ds.ref_logps[indices], online.numpy(), rtol=1e-5)


def test_the_reference_tool_refuses_data_tokenised_for_another_checkpoint(workspace, hh_slice, tmp_path, capsys):
    """Issue 31 item 4: it wrote log-probs for such a dataset, which training refused after the
    GPU-hours were spent; now it refuses first, as training does, naming both tokenizers."""
    import json
    import shutil

    from megatron_rpo.data.preprocess import preprocess
    from megatron_rpo.data.tokenizer import train_sentencepiece
    from tests.workspace import load_script

    root = workspace["root"]
    ckpt = tmp_path / "ckpt"  # the workspace's checkpoint, carrying the tokenizer its data was tokenised with
    shutil.copytree(root / "ckpt", ckpt)
    tokenizer = json.loads((root / "train.manifest.json").read_text())["tokenizer"]["path"]
    shutil.copy(tokenizer, ckpt / "tokenizer" / "tokenizer.model")
    rows = [json.loads(line) for line in open(hh_slice)]
    other = train_sentencepiece([r["rejected"] for r in rows] + [r["chosen"][::-1] for r in rows],
                                str(tmp_path / "other"), vocab_size=workspace["vocab"])
    preprocess([str(root / "valid.jsonl")], "hh", other, str(tmp_path / "other_valid"), max_prompt_length=96,
               max_length=160, progress=False)
    tool = load_script("tools/precompute_reference_logps.py", "reference_tool_refusal")
    assert tool.main(["--load", str(ckpt), "--data-prefix", str(tmp_path / "other_valid"), "--no-progress"]) == 2
    assert f"{tmp_path / 'other_valid'} was tokenised with {other}, not with the tokenizer {ckpt} carries" in \
        capsys.readouterr().err
    assert not list(tmp_path.glob("other_valid.ref*"))


def _by_recipe_and_by_flags(ckpt: str, by_recipe: str, by_flags: str, recipe: str):
    from tests.workspace import reference_tool

    return (reference_tool(None, by_recipe, "--config", recipe, f"train.load={ckpt}"),
            reference_tool(ckpt, by_flags, "--tensor-model-parallel-size", "2", "--logprob-chunk-tokens", "40"))


def test_the_reference_tool_takes_the_recipe_s_layout(workspace, tmp_path):
    # Issue 32 item 3: one config surface; the tool's parallel flags are shorthands for the recipe's settings.
    import glob
    import shutil

    for name in ("recipe", "flags"):
        (tmp_path / name).mkdir()
        for f in glob.glob(str(workspace["root"] / "valid.*")):
            if ".ref." not in f and not f.endswith("valid.jsonl"):
                shutil.copy(f, tmp_path / name)
    recipe = tmp_path / "run.yaml"  # a run at TP 2 + SP, chunked log-probs, interleaved over PP 1 (forward: none)
    recipe.write_text("parallel:\n  tensor_model_parallel_size: 2\n  sequence_parallel: true\n"
                      "model:\n  logprob_chunk_tokens: 40\ndata:\n  packing: true\n")
    by_recipe, by_flags = run_ranks(_by_recipe_and_by_flags, 2, str(workspace["root"] / "ckpt"),
                                    str(tmp_path / "recipe" / "valid"), str(tmp_path / "flags" / "valid"),
                                    str(recipe), timeout=300)[0]
    assert by_recipe.shape == (64,) and np.isfinite(by_recipe).all()
    np.testing.assert_allclose(by_recipe, by_flags, rtol=1e-6, atol=1e-4)


def test_the_reference_tool_needs_a_checkpoint_named_and_checks_the_recipe_s_layout(workspace, tmp_path, capsys):
    from tests.workspace import load_script

    tool = load_script("tools/precompute_reference_logps.py", "reference_tool_unnamed")
    assert tool.main(["--data-prefix", str(tmp_path / "d"), "--no-progress"]) == 2
    assert "name the reference model: --load CHECKPOINT, or --config RECIPE" in capsys.readouterr().err
    recipe = tmp_path / "run.yaml"
    recipe.write_text("parallel:\n  tensor_model_parallel_size: 3\n")
    argv = ["--config", str(recipe), f"train.load={workspace['root'] / 'ckpt'}", "--data-prefix",
            str(workspace["root"] / "valid"), "--no-progress"]
    assert tool.main(argv) == 2  # the recipe's TP 3 does not divide the tiny model's 4 heads
    assert "is not divisible by parallel.tensor_model_parallel_size (3)" in capsys.readouterr().err
