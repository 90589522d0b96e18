"""The README's blocks as written: the config example runs, and every tool option it shows exists."""

import os
import re
import shutil
import subprocess
import sys

from tests.conftest import REPO

README = open(os.path.join(REPO, "README.md")).read()


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
        commands += [line for line in text.splitlines() if "tools/" in line or "megatron_rpo.train" in line]
    assert len(commands) >= 6
    for command in commands:
        script = re.search(r"(tools/\w+\.py|megatron_rpo\.train)", command).group(1)
        argv = [sys.executable, script, "--help"] if script.endswith(".py") else [sys.executable, "-m", script, "--help"]
        usage = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=True).stdout
        for flag in re.findall(r"(?<=\s)--[a-z][a-z-]+", command[command.index(script):]):  # the tool's own
            assert flag in usage, f"{script} has no {flag} (README: {command.strip()})"
