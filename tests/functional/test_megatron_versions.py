"""Checkpoints across the two ends of the supported megatron-core range: one written by the older
release resumes on the newer equal to the uninterrupted run; one written by the newer is refused
by the older in one line, before any work.

Needs a second environment at the other end (``MEGATRON_RPO_OTHER_PYTHON``, its interpreter):
``scripts/test_megatron.sh`` sets it, so CI runs these; the README's test command alone skips them.
"""

import json
import os
import subprocess
import sys

import pytest

from megatron_rpo.versions import release
from tests.workspace import RECIPE, REPO, launch_env, overrides

OTHER = os.environ.get("MEGATRON_RPO_OTHER_PYTHON")
pytestmark = pytest.mark.skipif(not OTHER, reason="needs an environment at the other end of the megatron-core "
                                                  "range (MEGATRON_RPO_OTHER_PYTHON; scripts/test_megatron.sh)")
COMMON = ["train.train_iters=4", "train.save_interval=2", "train.eval_interval=2", "train.eval_iters=1"]
TIMING = {"step_time", "tokens_per_s", "tflops", "mfu", "memory_peak_gib"}


def _version(python: str) -> str:
    return subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('megatron-core'))"],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def ends() -> tuple:
    """``((python, version), (python, version))``: the older release's environment, then the newer's."""
    here, other = (sys.executable, _version(sys.executable)), (OTHER, _version(OTHER))
    older, newer = sorted([here, other], key=lambda end: release(end[1]))
    if release(older[1]) == release(newer[1]):
        pytest.skip(f"both environments have megatron-core {older[1]}")
    return older, newer


def _train(python: str, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "megatron_rpo.train", "--config", RECIPE, *argv], cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, timeout=600)


def _ok(run: subprocess.CompletedProcess) -> str:
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    return output


def test_an_older_release_checkpoint_resumes_on_the_newer_equal_to_the_uninterrupted_run(workspace, ends, tmp_path):
    from megatron_rpo.plot import read_scalars

    (old_python, old_version), (new_python, new_version) = ends
    _ok(_train(new_python, overrides(workspace, tmp_path / "full", *COMMON)))
    _ok(_train(old_python, overrides(workspace, tmp_path / "run", *COMMON, "train.exit_interval=2")))
    with open(tmp_path / "run" / "iter_0000002" / "training_state.json") as f:
        assert json.load(f)["megatron_core"] == old_version
    output = _ok(_train(new_python, overrides(workspace, tmp_path / "run", *COMMON)))
    assert f"resumed from {tmp_path / 'run' / 'iter_0000002'} at step 2" in output
    assert "GPTModel IS DEPRECATED" not in output

    expected, got = read_scalars(str(tmp_path / "full")), read_scalars(str(tmp_path / "run"))
    names = sorted(n for n in expected if n.split("/", 1)[1] not in TIMING)
    assert "train/loss" in names and "eval/loss" in names
    assert sorted(n for n in got if n.split("/", 1)[1] not in TIMING) == names
    for name in names:
        # Steps 1-2 under the older release, 3-4 under the newer, against all four under the newer:
        # the same on CPU, to float32's last bits.
        assert [s for s, _ in got[name]] == [s for s, _ in expected[name]], name
        assert [v for _, v in got[name]] == pytest.approx([v for _, v in expected[name]], rel=1e-6, abs=1e-7), name


def test_a_newer_release_checkpoint_is_refused_by_the_older_in_one_line(workspace, ends, tmp_path):
    (old_python, old_version), (new_python, new_version) = ends
    _ok(_train(new_python, overrides(workspace, tmp_path / "run", *COMMON, "train.exit_interval=2")))
    refused = _train(old_python, overrides(workspace, tmp_path / "run", *COMMON))
    output = refused.stdout + refused.stderr
    assert refused.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    line = (f"{tmp_path / 'run' / 'iter_0000002'} was written by megatron-core {new_version}, and this is "
            f"megatron-core {old_version}")
    assert [x for x in output.splitlines() if "megatron-core" in x] == [x for x in output.splitlines() if line in x]
    assert line in output
    assert not os.path.exists(tmp_path / "run" / "iter_0000004")
