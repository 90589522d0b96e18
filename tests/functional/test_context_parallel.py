"""Context parallelism through the trainer and the reference tool (issue 22), on 2 gloo processes,
every case in one spawn:

* a CP 2 run (one microbatch of 8 pairs per step) logs the loss, rewards and gradient norm of the
  CP 1 run (DP 2: 4 pairs per rank, the contrast matrix over both), step by step, with the online
  reference and evaluation; a CP 2 run stopped after 2 steps resumes at CP 1 (its micro batch
  halved, a change it is told to allow) and ends there too;
* the reference tool's file at ``--context-parallel-size 2`` equals its file at 1.
"""

from __future__ import annotations

import glob
import shutil

import numpy as np
import pytest

from tests.multiprocess import Spawns, run_ranks
from tests.workspace import overrides, reference_tool, train_each

CP2 = ["parallel.context_parallel_size=2", "train.micro_batch_size=8"]


def _references(reference_cases):
    return [reference_tool(ckpt, prefix, "--micro-batch-size", "5", "--context-parallel-size", str(cp))
            for ckpt, prefix, cp in reference_cases]


@pytest.fixture(scope="module")
def results(workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("context_parallel")

    def argv(save, *extra):
        return overrides(workspace, root / save, "train.train_iters=4", "train.save_interval=2", "train.eval_iters=1",
                         *extra)

    runs = [argv("cp1"), argv("cp2", *CP2), argv("stopped", *CP2, "train.exit_interval=2"),
            # resumed at CP 1 with the same matrix: 4 pairs on each of 2 data-parallel ranks
            argv("stopped", "train.allow_config_change=true")]
    cases = []
    for cp in (1, 2):  # a copy of the held-out split per case: the tool writes PREFIX.ref beside it
        (root / f"ref_cp{cp}").mkdir()
        for f in glob.glob(str(workspace["root"] / "valid.*")):
            if ".ref." not in f and not f.endswith("valid.jsonl"):
                shutil.copy(f, root / f"ref_cp{cp}")
        cases.append((str(workspace["root"] / "ckpt"), str(root / f"ref_cp{cp}" / "valid"), cp))
    groups = {"training": (train_each, 2, runs), "reference": (_references, 2, cases)}
    return Spawns(lambda group: run_ranks(*groups[group], timeout=900)[0])  # each spawned when a test asks


KEYS = ("loss", "chosen_reward", "rejected_reward", "reward_margin", "grad_norm")


def test_a_cp2_run_logs_what_the_cp1_run_logs(results):
    cp1, cp2 = results["training"][:2]
    assert not [r["error"] for r in results["training"] if "error" in r]
    assert [h["step"] for h in cp2["history"]] == [1, 2, 3, 4]
    for a, b in zip(cp1["history"], cp2["history"]):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
    assert cp2["eval"]["loss"] == pytest.approx(cp1["eval"]["loss"], abs=1e-5)


def test_a_run_stopped_at_cp2_resumes_at_cp1_and_ends_where_the_uninterrupted_run_ends(results):
    cp1, _, stopped, resumed = results["training"]
    assert [h["step"] for h in stopped["history"]] == [1, 2] and [h["step"] for h in resumed["history"]] == [3, 4]
    for a, b in zip(cp1["history"], stopped["history"] + resumed["history"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)


def test_the_reference_tool_at_cp2_writes_the_cp1_file(results):
    cp1, cp2 = results["reference"]
    assert cp1.shape == cp2.shape and np.isfinite(cp1).all()
    np.testing.assert_allclose(cp2, cp1, rtol=1e-5, atol=1e-4)
