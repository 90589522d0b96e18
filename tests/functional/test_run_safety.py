"""Runs that cannot corrupt each other or their own record (issue 13, training runs).

Resuming with another config, two jobs on one save directory, a launcher killed outright,
preemption by SIGTERM, and a launch without torchrun. The signal tests start real processes and
are bounded in time: a run that ignores the signal or its dead launcher fails them, not hangs them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.multiprocess import RankFailure, run_ranks
from tests.workspace import RECIPE, REPO, Job, launch_env, overrides, train, train_each


def test_resume_refuses_a_changed_config_and_applies_it_only_when_allowed(workspace, tmp_path):
    save = tmp_path / "run"
    base = overrides(workspace, save, "train.train_iters=4", "train.export=false", "loss.weighting=uniform")
    changed = base + ["optimizer.lr=1e-2", "loss.beta=0.5", "train.global_batch_size=16"]
    first, refused, second, more = run_ranks(train_each, 1, [
        base + ["train.exit_interval=2"],
        changed,
        changed + ["train.allow_config_change=true"],
        # Settings that only decide how long a run goes or what it logs may change freely.
        changed + ["train.train_iters=5", "train.log_interval=2"],
    ], timeout=300)[0]
    assert [h["step"] for h in first["history"]] == [1, 2]
    assert re.search(r"differs from the one .*iter_0000002 was trained with \("
                     r"loss.beta: 0.1 -> 0.5; optimizer.lr: 0.0005 -> 0.01; "
                     r"train.global_batch_size: 8 -> 16\).*train.allow_config_change=true", refused["error"])
    assert [h["step"] for h in second["history"]] == [3, 4]  # the refused start changed nothing
    assert all(h["lr"] == 1e-2 for h in second["history"])  # applied for real, not only written down
    history = sorted(p.name for p in (save / "configs").iterdir())
    assert history == ["step_0000000.yaml", "step_0000002.yaml", "step_0000004.yaml"]  # none for the refusal
    assert yaml.safe_load((save / "configs" / "step_0000000.yaml").read_text())["optimizer"]["lr"] == 5e-4
    assert yaml.safe_load((save / "configs" / "step_0000002.yaml").read_text())["optimizer"]["lr"] == 1e-2
    assert yaml.safe_load((save / "config.yaml").read_text())["optimizer"]["lr"] == 1e-2
    assert [h["step"] for h in more["history"]] == [5]


def test_a_second_job_on_a_save_directory_in_use_is_refused(workspace, tmp_path):
    import json
    import socket

    save = tmp_path / "run"
    save.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (save / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                                "started": "2026-11-25T10:00:00+00:00"}))
        with pytest.raises(RankFailure, match=rf"in use by another training job \(pid {holder.pid} on "):
            run_ranks(train, 2, overrides(workspace, save, "train.train_iters=1"), timeout=300)
        assert sorted(p.name for p in save.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone now: the next job takes the directory over, and leaves it unlocked.
    (result,) = run_ranks(train_each, 1, [overrides(workspace, save, "train.train_iters=1", "train.export=false",
                                                    "loss.weighting=uniform")], timeout=300)[0]
    assert [h["step"] for h in result["history"]] == [1]


def _torchrun(args: list[str], launcher: str = "torch.distributed.run") -> list[str]:
    return [sys.executable, "-m", launcher, "--standalone", "--nproc-per-node=2", "-m",
            "megatron_rpo.train", "--config", RECIPE, *args]


def test_workers_exit_when_their_launcher_is_killed(workspace, tmp_path):
    import psutil

    save = tmp_path / "run"
    job = Job(_torchrun(overrides(workspace, save, "train.train_iters=400", "train.save_interval=5",
                                  "train.keep_last=100", "train.eval_iters=1", "loss.weighting=uniform")),
              launch_env())
    try:
        job.wait_for(r"step 6/400", timeout=240)
        workers = psutil.Process(job.proc.pid).children(recursive=True)
        assert len(workers) >= 2
        os.kill(job.proc.pid, signal.SIGKILL)  # the launcher only
        killed_at = time.time()
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"workers {[p.pid for p in alive]} outlived their launcher by 30 s"
        late = [p.name for p in save.iterdir() if p.name.startswith("iter_") and p.stat().st_mtime > killed_at + 1]
        assert len(late) <= 1, late  # at most the save that was under way when the launcher died
    finally:
        job.kill()


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_from_it(workspace, tmp_path):
    save = tmp_path / "run"
    argv = overrides(workspace, save, "train.train_iters=400", "train.eval_iters=1", "loss.weighting=uniform",
                     "train.export=false")
    job = Job(_torchrun(argv, "megatron_rpo.launch"), launch_env())
    try:
        job.wait_for(r"step 4/400", timeout=240)
        os.killpg(job.proc.pid, signal.SIGTERM)  # the launcher's process group, as Ctrl-C or a scheduler
        stopped = job.wait_for(r"received SIGTERM: stopped after step (\d+) with checkpoint .*exiting with code 75",
                               timeout=60)
        assert job.proc.wait(timeout=60) == 75  # the launcher's too: plain torchrun would exit with 1
    finally:
        job.kill()
    assert "failed (exitcode: 75)" not in job.output()  # torchrun's crash line, for a clean stop
    step = int(stopped.group(1))
    assert (save / "latest").read_text().strip() == f"iter_{step:07d}"
    assert "Traceback" not in job.output().split("received SIGTERM")[0]  # no traceback wall before the clean stop

    # Without a launcher (one process, so DP 1 instead of 2: weights and optimizer state reshard),
    # SIGTERM ends it the same way, with exit code 75.
    single = Job([sys.executable, "-m", "megatron_rpo.train", "--config", RECIPE, *argv], launch_env())
    try:
        single.wait_for(rf"resumed from .*iter_{step:07d} at step {step}", timeout=240)
        single.wait_for(rf"step {step + 2}/400", timeout=120)
        single.proc.send_signal(signal.SIGTERM)
        again = single.wait_for(r"received SIGTERM: stopped after step (\d+)", timeout=60)
        assert single.proc.wait(timeout=60) == 75
    finally:
        single.kill()
    assert "no launcher environment (RANK is unset): training in this one process" in single.output()
    assert "Traceback" not in single.output()
    assert (save / "latest").read_text().strip() == f"iter_{int(again.group(1)):07d}"


def test_a_bad_input_is_said_once_not_by_every_rank(workspace, tmp_path):
    argv = overrides(workspace, tmp_path / "run", f"data.valid_data_prefix={tmp_path / 'missing'}")
    result = subprocess.run(_torchrun(argv), cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if line.startswith("error: ") and "missing.manifest.json" in line]
    assert len(lines) == 1, output[-3000:]
    # torchrun's failure report quotes each rank's error file: the message, not our stack.
    assert re.search(r"traceback : error: .*missing.manifest.json not found", output), output[-3000:]
    assert not re.search(r"megatron_rpo/(train|training/|data/)\S*\.py", output), output[-3000:]


def test_inputs_that_do_not_belong_together_are_refused_before_any_work(workspace, tmp_path, hh_slice, capfd):
    """Issue 19, items 4-6 and 11: a held-out set too small for one microbatch, a dataset tokenised
    by another tokenizer of the same vocabulary size, reference log-probs of another checkpoint;
    and a held-out set smaller than a global batch is evaluated, after the checkpoint."""
    import json
    import shutil

    from megatron_rpo.convert.files import MARKER
    from megatron_rpo.data.preprocess import preprocess
    from megatron_rpo.data.reference_logps import write_reference_logps
    from megatron_rpo.data.tokenizer import load_tokenizer, train_sentencepiece

    root = workspace["root"]
    # A checkpoint that carries the tokenizer the workspace's data was tokenised with.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(root / "ckpt", ckpt)
    manifest = json.loads((root / "train.manifest.json").read_text())
    shutil.copy(manifest["tokenizer"]["path"], ckpt / "tokenizer" / "tokenizer.model")
    # Another sentencepiece model of the same vocabulary size, and the held-out rows tokenised with it.
    rows = [json.loads(line) for line in open(hh_slice)]
    other = train_sentencepiece([r["rejected"] for r in rows] + [r["chosen"][::-1] for r in rows],
                                str(tmp_path / "other"), vocab_size=workspace["vocab"])
    assert load_tokenizer(other).vocab_size == workspace["vocab"]
    preprocess([str(root / "valid.jsonl")], "hh", other, str(tmp_path / "other_valid"), max_prompt_length=96,
               max_length=160, progress=False)
    # Three held-out pairs (a microbatch is 4) and six (a global batch is 8).
    lines = open(root / "valid.jsonl").readlines()
    for name, count in (("tiny", 3), ("six", 6)):
        (tmp_path / f"{name}.jsonl").write_text("".join(lines[:count]))
        preprocess([str(tmp_path / f"{name}.jsonl")], "hh", manifest["tokenizer"]["path"], str(tmp_path / name),
                   max_prompt_length=96, max_length=160, progress=False)
    # Reference log-probs whose manifest names another checkpoint.
    for f in root.glob("train.*"):
        if f.name != "train.jsonl":
            shutil.copy(f, tmp_path / f.name)
    data = tmp_path / "train"
    count = json.loads((root / "train.manifest.json").read_text())["num_sequences"]
    write_reference_logps(str(data), [0.0] * count, checkpoint="checkpoints/tinyllama", checkpoint_id="0" * 32)
    meant = tmp_path / "tinyllama"
    shutil.copytree(root / "ckpt", meant)
    marker = json.loads((meant / MARKER).read_text())
    (meant / MARKER).write_text(json.dumps(dict(marker, checkpoint_id="0" * 32)))

    def case(name, *extra):
        return overrides(workspace, tmp_path / name, f"train.load={ckpt}", "loss.weighting=uniform",
                         "train.export=false", "train.train_iters=2", *extra)

    results = run_ranks(train_each, 1, [
        case("tiny", f"data.valid_data_prefix={tmp_path / 'tiny'}"),
        case("tokenizer", f"data.valid_data_prefix={tmp_path / 'other_valid'}"),
        case("reference", f"data.train_data_prefix={data}", "loss.reference=precomputed",
             "data.valid_data_prefix=null"),
        case("meant", f"data.train_data_prefix={data}", "loss.reference=precomputed", "data.valid_data_prefix=null",
             f"loss.reference_checkpoint={meant}", "train.train_iters=1"),
        case("six", f"data.valid_data_prefix={tmp_path / 'six'}", "train.save_interval=2", "train.eval_interval=2"),
        case("unpaired", "data.paired=false", "loss.tau=0.75", "train.micro_batch_size=2",
             "train.global_batch_size=4", "train.train_iters=1"),
    ], timeout=600)[0]
    tiny, tokenizer, reference, meant_run, six, unpaired = results
    assert tiny["error"] == (f"{tmp_path / 'tiny'} holds 3 pairs, fewer than one microbatch on every data-parallel "
                             "rank (train.micro_batch_size 4 x DP 1 = 4), the least an evaluation needs: use a larger "
                             "held-out set, a smaller train.micro_batch_size, or leave data.valid_data_prefix out")
    assert not (tmp_path / "tiny" / "latest").exists()
    assert tokenizer["error"].startswith(f"{tmp_path / 'other_valid'} was tokenised with {other}, not with the "
                                         f"tokenizer {ckpt} carries")
    assert reference["error"].startswith(f"{data}.ref.manifest.json: the reference log-probs were computed with "
                                         f"checkpoints/tinyllama, but train.load is {ckpt}: rerun ")
    assert "set loss.reference_checkpoint=checkpoints/tinyllama" in reference["error"]
    assert [h["step"] for h in meant_run["history"]] == [1]  # deliberately another model: allowed when said
    assert six["eval"]["matrix_rows"] == 4 and (tmp_path / "six" / "latest").read_text().strip() == "iter_0000002"
    out = capfd.readouterr().out
    assert "eval at step 2: " in out and "| 4 pairs" in out
    # An unpaired run evaluated on pairs shows the training line's measure next to the pairs' accuracy.
    assert unpaired["eval"]["reward_auc"] == unpaired["eval"]["reward_auc"]
    assert re.search(r"eval at step 1: loss \S+ \| acc \S+ \| reward AUC \S+ \| margin", out), out[-2000:]


def test_under_the_launcher_a_bad_input_is_one_line_and_exit_code_2(workspace, tmp_path):
    # Issue 31 item 8: after the one-line error, the launcher printed torchrun's 35-line failure report.
    argv = overrides(workspace, tmp_path / "run", f"data.valid_data_prefix={tmp_path / 'missing'}")
    result = subprocess.run(_torchrun(argv, "megatron_rpo.launch"), cwd=REPO, env=launch_env(), capture_output=True,
                            text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert len([line for line in output.splitlines() if line.startswith("error: ")]) == 1, output[-3000:]
    for noise in ("ChildFailedError", "Root Cause", "Traceback", "failed (exitcode"):
        assert noise not in output, output[-3000:]


def test_the_reference_tool_under_torchrun_says_a_bad_input_once_and_records_it(workspace, tmp_path):
    # Issue 31 item 8: every rank printed the error and torchrun's report showed "error_file: <N/A>".
    tool = os.path.join(REPO, "tools", "precompute_reference_logps.py")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", tool,
                             "--load", str(workspace["root"] / "ckpt"), "--data-prefix", str(tmp_path / "missing")],
                            cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert len([line for line in output.splitlines() if line.startswith("error: ")]) == 1, output[-3000:]
    assert re.search(r"traceback : error: .*missing.manifest.json not found", output), output[-3000:]
