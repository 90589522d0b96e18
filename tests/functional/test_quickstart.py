"""The quickstart, reduced to a few steps per stage (the full one is `bash scripts/quickstart.sh`)."""

import os
import subprocess
import sys

from tests.workspace import REPO


def test_quickstart_runs_end_to_end(tmp_path):
    work = tmp_path / "qs"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "quickstart.py"), "--workdir", str(work), "--sft-steps", "4",
         "--rpo-steps", "2"],
        capture_output=True, text=True, timeout=500, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "skipped line 41 (rejected" in out  # the held-out slice's pairs whose prompts differ
    assert "step 4/4" in out and "step 2/2" in out and "reply:" in out
    assert "likelihood accuracy after RPO" in out
    assert (work / "hf_rpo" / "config.json").exists()
    assert (work / "rpo" / "latest").read_text().strip() == "iter_0000002"
    # The run's picture, and how to draw it again; the evaluation-only passes say what they are.
    assert (work / "rpo" / "run.png").read_bytes().startswith(b"\x89PNG")
    assert f"python -m megatron_rpo.plot {work / 'rpo'}" in out
    assert "no training (train.train_iters=0): evaluation only" in out and "0 steps" not in out
    assert "likelihood evaluation of" in out

    # Did it work? The export's win rate against the held-out chosen responses, a local judge.
    from tests.workspace import tiny_reward_model

    judged = subprocess.run(
        [sys.executable, "-m", "megatron_rpo.evaluate", "--data", str(work / "valid.jsonl"), "--model",
         f"rpo={work / 'hf_rpo'}", "--judge", "reward-model", "--judge-path", tiny_reward_model(tmp_path / "rm"),
         "--max-new-tokens", "16", "--output", str(work / "eval"), "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert judged.returncode == 0, judged.stderr[-3000:]
    assert "| rpo | reference |" in judged.stdout and "40 held-out prompts" in judged.stdout


def _quickstart_module():
    from tests.workspace import load_script

    return load_script("examples/quickstart.py", "quickstart")


def test_quickstart_runs_one_process_per_gpu(monkeypatch, capsys):
    import pytest
    import torch

    choose = _quickstart_module().choose_nproc
    assert choose(None) == 2 and choose(3) == 3  # CPU: gloo processes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert choose(None) == 1  # NCCL cannot put two ranks on one GPU
    assert "1 GPU(s) visible; training with 1 process(es)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--nproc 2 needs 2 GPUs; this machine has 1"):
        choose(2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert choose(None) == 2


def test_the_quickstart_replaces_only_its_own_work_folder(tmp_path, capsys):
    import pytest

    prepare = _quickstart_module().prepare_workdir
    mine = tmp_path / "qs"
    prepare(str(mine))
    (mine / "rpo").mkdir()
    prepare(str(mine))  # a previous quickstart's: replaced, and said
    assert "replacing the previous run of the quickstart" in capsys.readouterr().out and not (mine / "rpo").exists()
    theirs = tmp_path / "important"
    theirs.mkdir()
    (theirs / "checkpoint").write_text("precious")
    with pytest.raises(SystemExit, match="exists and was not made by the quickstart"):
        prepare(str(theirs))
    assert (theirs / "checkpoint").read_text() == "precious"
