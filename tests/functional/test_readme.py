"""The README's blocks as written, and those of docs/ and bench/README.md: the config example runs,
the real-model steps run, the split command splits, and every tool option they show exists."""

import glob
import os
import re
import shutil
import subprocess
import sys

from tests.workspace import REPO

GUIDES = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md"))),
          os.path.join(REPO, "bench", "README.md")]
README = "\n".join(open(path).read() for path in GUIDES)


def _blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_the_config_example_runs_as_written(tmp_path):
    (yaml_block,) = [b for b in _blocks("yaml") if b.startswith("# configs/my_run.yaml")]
    (python_block,) = [b for b in _blocks("python") if "configs/my_run.yaml" in b]
    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copy(os.path.join(REPO, "configs", "mistral7b_hh_rpo_paired.yaml"), configs)
    (configs / "my_run.yaml").write_text(yaml_block)
    subprocess.run([sys.executable, "-c", python_block], cwd=tmp_path, check=True)
    written = (tmp_path / "run" / "config.yaml").read_text()
    assert "tau: 0.75" in written and "paired: false" in written and "beta: 0.2" in written


def test_every_tool_option_the_readme_shows_exists():
    commands = []
    for block in _blocks("bash"):
        text = block.replace("\\\n", " ")
        commands += [line for line in text.splitlines()
                     if "tools/" in line or "megatron_rpo.train" in line or "megatron_rpo.evaluate" in line]
    assert len(commands) >= 6
    for command in commands:
        script = re.search(r"(tools/\w+\.py|megatron_rpo\.train|megatron_rpo\.evaluate)", command).group(1)
        argv = [sys.executable] + ([script] if script.endswith(".py") else ["-m", script]) + ["--help"]
        usage = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=True).stdout
        for flag in re.findall(r"(?<=\s)--[a-z][a-z-]+", command[command.index(script):]):  # the tool's own
            assert flag in usage, f"{script} has no {flag} (README: {command.strip()})"


def test_the_real_model_steps_run_as_written_on_a_tiny_mistral(tmp_path, hh_slice, sp_tokenizer):
    """"Using it on a real model", verbatim but for the model (a tiny random Mistral under the same
    name), 2 CPU processes instead of 8 GPUs, and --device cpu."""
    import gzip

    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from megatron_rpo.data.tokenizer import load_tokenizer

    section = README.split("## Using it on a real model", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    torch.manual_seed(0)
    vocab = load_tokenizer(sp_tokenizer).vocab_size
    MistralForCausalLM(MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                     sliding_window=None)).save_pretrained(tmp_path / "Mistral-7B-v0.1")
    shutil.copy(sp_tokenizer, tmp_path / "Mistral-7B-v0.1" / "tokenizer.model")
    (tmp_path / "hh-rlhf").mkdir()
    lines = open(hh_slice).read()
    for split in ("train", "test"):
        with gzip.open(tmp_path / "hh-rlhf" / f"{split}.jsonl.gz", "wt") as f:
            f.write(lines)
    for folder in ("tools", "configs"):
        os.symlink(os.path.join(REPO, folder), tmp_path / folder)
    script = re.sub(r"(?m)^(\s*)python ", rf"\1{sys.executable} ", block)
    script = (script.replace("--nproc-per-node 8", "--nproc-per-node 2").replace("--device cuda", "--device cpu")
              .replace("torchrun ", f"{sys.executable} -m torch.distributed.run --standalone "))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert (tmp_path / "runs" / "mistral7b_hh_rpo_paired" / "latest").exists()
    assert (tmp_path / "mistral7b-rpo" / "config.json").exists()


def test_the_split_command_holds_out_the_same_rows_every_time(tmp_path, hh_slice):
    (block,) = [b for b in _blocks("bash") if "shuf " in b]
    block = block.replace("1000", "40").replace("1001", "41")
    shutil.copy(hh_slice, tmp_path / "pairs.jsonl")
    splits = []
    for _ in range(2):
        subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, check=True)
        splits.append(((tmp_path / "test.jsonl").read_text(), (tmp_path / "train.jsonl").read_text()))
    test, train = splits[0]
    assert splits[1] == splits[0]
    rows = open(hh_slice).read().splitlines()
    assert len(test.splitlines()) == 40 and sorted(test.splitlines() + train.splitlines()) == sorted(rows)
    assert test.splitlines() != rows[:40]  # shuffled


def test_the_test_command_installs_only_when_the_package_declaration_changes():
    venv = sys.prefix
    if not os.path.exists(os.path.join(venv, ".megatron_rpo_installed")):
        import pytest

        pytest.skip("this environment was not set up by scripts/env.sh")
    result = subprocess.run(["bash", "-c", ". scripts/env.sh"], cwd=REPO, capture_output=True, text=True, check=True,
                            env=dict(os.environ, MEGATRON_RPO_VENV=venv))
    assert "[setup]" not in result.stdout + result.stderr  # no virtualenv, torch or package install
