"""Every shipped recipe, run as users run it (issue 19): ``python -m megatron_rpo.launch`` (torchrun)
with 2 CPU processes and the recipe's own settings, only paths, lengths, batch and parallel sizes
shrunk to a tiny model. Each recipe trains, is stopped with SIGTERM (exit code 75, a checkpoint),
resumes with the same command, and finishes with evaluation and export; the TensorBoard scalars
of the resumed run, learning rate included, and its export equal those of an uninterrupted run.

A recipe added to configs/ gets this test by being there. The uninterrupted runs of all recipes
share one 2-process start-up (they are the independent computation; the interrupted runs are
what users launch).
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.equivalence import SIZE_KEYS, family_of, prepare_world, write_references
from tests.multiprocess import Spawns, run_ranks
from tests.workspace import RECIPE as TINY_RECIPE
from tests.workspace import REPO, Job, launch_env, train_each

RECIPES = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.yaml"))
                 if os.path.basename(p) != "tiny_cpu.yaml")
STEPS, INTERVAL = 8, 4
TIMING = ("step_time", "tokens_per_s", "tflops", "mfu")  # the machine's, not the run's


@pytest.fixture(scope="module")
def recipe_world(tmp_path_factory, workspace, sp_tokenizer):
    """A tiny checkpoint of every family with a copy of the workspace's datasets each
    (:func:`tests.equivalence.prepare_world`; the reference log-probs come with the uninterrupted runs)."""
    return prepare_world(tmp_path_factory.mktemp("recipes"), workspace, sp_tokenizer)


def recipe_overrides(recipe: str, world: dict, save) -> list[str]:
    """The recipe shrunk to the tiny world on 2 processes: paths, lengths, batch and parallel sizes."""
    from megatron_rpo.config import explicit_keys, load_config

    config = load_config(recipe)
    said = explicit_keys(config) or frozenset()
    tiny = load_config(TINY_RECIPE).model
    family = family_of(recipe)
    root = world["root"] / family
    out = [f"model.{k}={world['vocab'] if k == 'vocab_size' else getattr(tiny, k)}"
           for k in SIZE_KEYS if f"model.{k}" in said]
    p = config.parallel
    if p.expert_model_parallel_size > 1:  # EP 2 over DP 2 (the experts whole, as the recipe has them)
        out += ["parallel.expert_model_parallel_size=2", "parallel.tensor_model_parallel_size=1",
                "parallel.pipeline_model_parallel_size=1", "parallel.sequence_parallel=false"]
        dp = 2
    elif p.context_parallel_size > 1:  # CP 2, DP 1: every sequence cut in 4 chunks
        out += ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
                "parallel.context_parallel_size=2", "parallel.sequence_parallel=false"]
        dp = 1
    elif p.virtual_pipeline_model_parallel_size:  # PP 2 x VPP 2 (4 chunks of one layer), DP 1
        out += ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2",
                "parallel.virtual_pipeline_model_parallel_size=2", "parallel.sequence_parallel=false"]
        dp = 1
    elif p.tensor_model_parallel_size > 1:  # TP 2 (sequence parallel as the recipe has it), DP 1
        out += ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=1"]
        dp = 1
    elif p.pipeline_model_parallel_size > 1:  # PP 2, DP 1
        out += ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2",
                "parallel.sequence_parallel=false"]
        dp = 1
    else:
        dp = 2
    micro = min(config.train.micro_batch_size, 2)
    # more microbatches than pipeline stages, as the interleaved recipe runs (2 x PP 2)
    microbatches = 4 if p.virtual_pipeline_model_parallel_size else 2
    out += [f"train.micro_batch_size={micro}", f"train.global_batch_size={micro * dp * microbatches}",
            "data.max_length=160", f"train.load={world['checkpoints'][family]}",
            f"data.train_data_prefix={root / 'train'}",
            f"data.valid_data_prefix={root / 'valid'}", f"train.save={save}", f"train.train_iters={STEPS}",
            f"train.save_interval={INTERVAL}", f"train.eval_interval={INTERVAL}", "train.log_interval=1"]
    if "data.max_prompt_length" in said:
        out.append("data.max_prompt_length=96")
    return out


@pytest.fixture(scope="module")
def uninterrupted(recipe_world, tmp_path_factory) -> Spawns:
    """Recipe file name -> the save folder of its whole run, uninterrupted (each recipe spawned on its
    own when its test asks, so one failing recipe fails its own test only)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    run_ranks(write_references, 1, recipe_world, timeout=900)  # every GPU recipe uses a precomputed reference

    def run(name):
        recipe, save = os.path.join(REPO, "configs", name), root / name
        (result,) = run_ranks(train_each, 2, [(recipe, recipe_overrides(recipe, recipe_world, save))],
                              timeout=900)[0]
        assert "error" not in result, result["error"]
        return save

    return Spawns(run)


def _launch(recipe: str, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "megatron_rpo.launch", "--standalone", "--nproc-per-node=2", "-m",
            "megatron_rpo.train", "--config", recipe, *argv]


def _exports_equal(a, b) -> None:
    from megatron_rpo.convert.files import ConvertedCheckpoint

    x, y = ConvertedCheckpoint(str(a)), ConvertedCheckpoint(str(b))
    assert sorted(x.index) == sorted(y.index)
    for name in x.index:
        assert torch.equal(x.get(name), y.get(name)), name


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_recipe_stops_on_sigterm_resumes_and_equals_the_uninterrupted_run(recipe, recipe_world, uninterrupted,
                                                                          tmp_path):
    from megatron_rpo.plot import read_scalars

    save = tmp_path / "run"
    argv = recipe_overrides(recipe, recipe_world, save)
    job = Job(_launch(recipe, argv), launch_env())
    try:
        job.wait_for(rf"step 2/{STEPS}", timeout=240)
        os.kill(job.proc.pid, signal.SIGTERM)  # the launcher, as a scheduler does
        stopped = job.wait_for(r"received SIGTERM: stopped after step (\d+) with checkpoint", timeout=120)
        assert job.proc.wait(timeout=120) == 75, job.output()[-3000:]
    finally:
        job.kill()
    step = int(stopped.group(1))
    assert step < STEPS, "the stop came too late to test a resume"
    assert (save / "latest").read_text().strip() == f"iter_{step:07d}"
    assert "Traceback" not in job.output()

    resumed = subprocess.run(_launch(recipe, argv), cwd=REPO, env=launch_env(), capture_output=True, text=True,
                             timeout=600)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert f"resumed from {save / f'iter_{step:07d}'} at step {step}" in output
    assert "Warning" not in output, output[-3000:]  # nothing the user cannot act on

    expected, got = read_scalars(str(uninterrupted[os.path.basename(recipe)])), read_scalars(str(save))
    names = sorted(n for n in expected if n.split("/", 1)[1] not in TIMING)
    assert "train/lr" in names and "eval/loss" in names
    assert sorted(n for n in got if n.split("/", 1)[1] not in TIMING) == names
    for name in names:
        assert got[name] == expected[name], name  # bitwise on CPU, step by step
    assert [s for s, _ in got["eval/loss"]] == [INTERVAL, STEPS]
    _exports_equal(save / "export", uninterrupted[os.path.basename(recipe)] / "export")
    if os.path.isdir(uninterrupted[os.path.basename(recipe)] / "adapter"):  # a LoRA recipe's PEFT folder too
        _adapters_equal_and_load_in_peft(save, uninterrupted[os.path.basename(recipe)], tmp_path)


def _adapters_equal_and_load_in_peft(save, expected, tmp_path) -> None:
    """The resumed run's PEFT folder is the uninterrupted run's, bitwise; peft puts it on the Hugging
    Face base with the logits of the merged export through transformers."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_rpo.convert import convert_megatron_to_hf
    from megatron_rpo.convert.files import ConvertedCheckpoint

    a = load_file(save / "adapter" / "adapter_model.safetensors")
    b = load_file(expected / "adapter" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    base_hf = ConvertedCheckpoint(ConvertedCheckpoint(str(save / "export")).meta["source"]).meta["source"]
    convert_megatron_to_hf(str(save / "export"), str(tmp_path / "merged_hf"), progress=False)
    tokens = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32).eval()
        plain = base(tokens).logits
        adapted = PeftModel.from_pretrained(base, save / "adapter").eval()(tokens).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged_hf", dtype=torch.float32).eval()(tokens).logits
    assert (adapted - plain).abs().max() > 0  # training moved the adapters off zero
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
