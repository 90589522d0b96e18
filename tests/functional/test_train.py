"""Short end-to-end training runs on 2 gloo processes: the trainer, resumption, export, errors."""

import json
import os

import pytest
import torch

from tests.conftest import REPO
from tests.multiprocess import RankFailure, run_ranks

RECIPE = os.path.join(REPO, "configs", "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, hh_slice, sp_tokenizer):
    """A converted tiny Llama matching configs/tiny_cpu.yaml, train/valid datasets and embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_rpo.config import load_config
    from megatron_rpo.convert import convert_hf_to_megatron
    from megatron_rpo.data.embeddings import precompute_prompt_embeddings
    from megatron_rpo.data.preprocess import preprocess
    from megatron_rpo.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("train")
    vocab = load_tokenizer(sp_tokenizer).vocab_size
    m = load_config(RECIPE).model
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                                 num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                                 num_key_value_heads=m.num_query_groups, max_position_embeddings=m.max_position_embeddings,
                                 rms_norm_eps=m.norm_epsilon)).save_pretrained(root / "hf")
    convert_hf_to_megatron(str(root / "hf"), str(root / "ckpt"), progress=False)
    with open(hh_slice) as f:
        lines = f.readlines()
    (root / "train.jsonl").write_text("".join(lines[:200]))
    (root / "valid.jsonl").write_text("".join(lines[200:232]))
    for split in ("train", "valid"):
        preprocess([str(root / f"{split}.jsonl")], "hh", sp_tokenizer, str(root / split), max_prompt_length=96,
                   max_length=160, progress=False)
        precompute_prompt_embeddings(str(root / split), progress=False)
    return {"root": root, "vocab": vocab}


def _overrides(ws, save, *extra):
    root = ws["root"]
    return [f"model.vocab_size={ws['vocab']}", f"train.load={root / 'ckpt'}",
            f"data.train_data_prefix={root / 'train'}", f"data.valid_data_prefix={root / 'valid'}",
            f"train.save={save}", "train.train_iters=6", "train.eval_iters=2", "train.keep_last=5", *extra]


def _train(overrides):
    from megatron_rpo.config import load_config
    from megatron_rpo.training.trainer import Trainer

    trainer = Trainer(load_config(RECIPE, overrides))
    try:
        evaluation = trainer.train()
        return {"history": trainer.history, "eval": evaluation}
    finally:
        trainer.scalars.close()


def test_resumed_run_matches_the_uninterrupted_one_bitwise(workspace, tmp_path):
    full = run_ranks(_train, 2, _overrides(workspace, tmp_path / "full", "train.save_interval=3"), timeout=600)[0]
    assert [h["step"] for h in full["history"]] == [1, 2, 3, 4, 5, 6]
    losses = [h["loss"] for h in full["history"]]
    assert all(l == l and l > 0 for l in losses)  # finite, positive
    assert full["history"][0]["matrix_rows"] == 8  # the matrix spans both ranks' 4 pairs

    part = _overrides(workspace, tmp_path / "resumed", "train.save_interval=3")
    first = run_ranks(_train, 2, part + ["train.exit_interval=3"], timeout=600)[0]
    assert [h["step"] for h in first["history"]] == [1, 2, 3]
    second = run_ranks(_train, 2, part, timeout=600)[0]
    assert [h["step"] for h in second["history"]] == [4, 5, 6]
    for a, b in zip(first["history"] + second["history"], full["history"]):
        for key in ("loss", "chosen_reward", "rejected_reward", "grad_norm", "lr"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    assert second["eval"] == full["eval"]

    save = tmp_path / "full"
    assert (save / "latest").read_text().strip() == "iter_0000006"
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("iter_")) == ["iter_0000003", "iter_0000006"]
    assert list((save / "tensorboard").glob("events.*"))
    assert (save / "config.yaml").exists()


def test_export_converts_to_hugging_face(workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_rpo.convert import convert_megatron_to_hf

    save = tmp_path / "run"
    run_ranks(_train, 2, _overrides(workspace, save, "train.train_iters=2", "loss.loss_type=sft"), timeout=600)
    convert_megatron_to_hf(str(save / "export"), str(tmp_path / "hf"), progress=False)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    start = AutoModelForCausalLM.from_pretrained(workspace["root"] / "hf").eval()
    tokens = torch.randint(0, workspace["vocab"], (1, 12))
    with torch.no_grad():
        a, b = trained(tokens).logits, start(tokens).logits
    assert torch.isfinite(a).all() and not torch.allclose(a, b)  # two SFT steps moved the weights


@pytest.mark.parametrize("extra,world,message", [
    (["parallel.pipeline_model_parallel_size=4"], 2, r"world size 2 is not divisible by .*pipeline_model_parallel_size \(4\)"),
    (["model.num_layers=2"], 1, r"does not fit the config: model.num_layers=2 but the checkpoint has 4"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], 1, r"global_batch_size \(6\) is not divisible"),
])
def test_bad_setups_fail_before_any_work(workspace, tmp_path, extra, world, message):
    with pytest.raises((RankFailure, ValueError), match=message):
        run_ranks(_train, world, _overrides(workspace, tmp_path / "bad", *extra), timeout=120)
    assert not (tmp_path / "bad").exists()


def test_datasets_with_different_tokenizers_are_refused(workspace, tmp_path, hh_slice):
    from megatron_rpo.data.preprocess import preprocess
    from megatron_rpo.data.tokenizer import train_sentencepiece

    other = train_sentencepiece([json.loads(line)["chosen"] for line in open(hh_slice)][:100],
                                str(tmp_path / "other"), vocab_size=600)
    preprocess([str(workspace["root"] / "valid.jsonl")], "hh", other, str(tmp_path / "valid"),
               max_prompt_length=96, max_length=160, progress=False)
    overrides = _overrides(workspace, tmp_path / "bad", f"data.valid_data_prefix={tmp_path / 'valid'}",
                           "loss.weighting=uniform")
    with pytest.raises(RankFailure, match="were tokenised with different tokenizers"):
        run_ranks(_train, 1, overrides, timeout=120)


def _crash_during_save(overrides):
    from megatron.core import parallel_state

    from megatron_rpo.config import load_config
    from megatron_rpo.training import checkpointing
    from megatron_rpo.training.trainer import Trainer

    trainer = Trainer(load_config(RECIPE, overrides))
    trainer.train()  # saves iter_0000002
    real_save = checkpointing.dist_checkpointing.save

    def dies_halfway(state, directory, **kwargs):
        with open(os.path.join(directory, "partial.distcp"), "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    checkpointing.dist_checkpointing.save = dies_halfway
    trainer.step = 3
    try:
        trainer.save()
    except OSError as e:
        crashed = str(e)
    finally:
        checkpointing.dist_checkpointing.save = real_save
        trainer.scalars.close()
        parallel_state.destroy_model_parallel()  # the process group stays for the next Trainer
    resumed = Trainer(load_config(RECIPE, overrides))  # must load the previous checkpoint
    resumed.scalars.close()
    return {"crashed": crashed, "resumed_step": resumed.step}


def test_a_crash_during_a_save_keeps_the_previous_checkpoint(workspace, tmp_path):
    save = tmp_path / "run"
    (result,) = run_ranks(_crash_during_save, 1, _overrides(workspace, save, "train.train_iters=2",
                                                           "train.export=false", "loss.weighting=uniform"),
                          timeout=300)
    assert result == {"crashed": "disk full", "resumed_step": 2}
    assert (save / "latest").read_text().strip() == "iter_0000002"
    assert (save / "iter_0000003.tmp" / "partial.distcp").exists() and not (save / "iter_0000003").exists()
