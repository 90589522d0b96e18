"""The interleaved pipeline (``parallel.virtual_pipeline_model_parallel_size``, issue 21 item 3) on 2
gloo processes, every case in one spawn:

* one step's gradients at PP 2 x VPP 2 (4 chunks of one layer) equal PP 2's on the same
  microbatches, and, with the global-batch contrast, PP 1's (DP 2: the same global batch);
* a run stopped at PP 2 x VPP 2 (its evaluation tops up to a multiple of PP microbatches) resumes at
  PP 2 without VPP and ends where the uninterrupted run ends; both export the same model;
* the step time of PP 2 and PP 2 x VPP 2 at 8 microbatches (informative: gloo is not NCCL).
"""

from __future__ import annotations

import time

import pytest
import torch

from megatron_rpo.config import load_config
from tests.multiprocess import Spawns, run_ranks
from tests.workspace import RECIPE, overrides, step_gradients, train_each

PP2 = "parallel.pipeline_model_parallel_size=2"
VPP2 = "parallel.virtual_pipeline_model_parallel_size=2"


def _step_time(argv: list[str], steps: int) -> float:
    """Seconds per training step, start-up excluded."""
    from megatron_rpo.training.trainer import Trainer

    trainer = Trainer(load_config(RECIPE, argv + [f"train.train_iters={steps}"]))
    try:
        start = time.perf_counter()
        trainer.train()
        return (time.perf_counter() - start) / steps
    finally:
        trainer.close(keep_process_group=True)


def _gradients(runs):
    return [step_gradients(argv) for argv in runs]


def _seconds(runs):
    return [_step_time(argv, 3) for argv in runs]


@pytest.fixture(scope="module")
def results(workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("interleaved")

    def argv(save, *extra):
        return overrides(workspace, root / save, "train.train_iters=4", "train.save_interval=2", "train.eval_iters=1",
                         *extra)

    cached = "loss.contrast_scope=global_batch"
    gradient_runs = [argv("g_pp2", "train.save=null", PP2), argv("g_vpp", "train.save=null", PP2, VPP2),
                     argv("g_pp1", "train.save=null", cached),
                     argv("g_vpp_cached", "train.save=null", PP2, VPP2, cached)]
    training_runs = [argv("vpp", PP2, VPP2), argv("stopped", PP2, VPP2, "train.exit_interval=2"),
                     argv("stopped", PP2)]  # resumed without VPP
    timing = ["train.save=null", "data.valid_data_prefix=null", "train.global_batch_size=32"]  # 8 microbatches
    timing_runs = [argv("t", PP2, *timing), argv("t", PP2, VPP2, *timing)]
    groups = Spawns(lambda group: run_ranks(*{"gradients": (_gradients, 2, gradient_runs),
                                              "training": (train_each, 2, training_runs),
                                              "seconds": (_seconds, 2, timing_runs)}[group], timeout=900))

    def result(key):  # each group spawned on its own when a test asks for it
        ranks = groups["gradients"] if key in ("gradients", "loss", "chunks") else None
        if key == "gradients":  # a pipeline rank holds its stage's gradients: the whole model is their union
            return [{**a["grads"], **b["grads"]} for a, b in zip(ranks[0], ranks[1])]
        if key == "loss":
            return [r["loss"] for r in ranks[1]]  # reported on the last stage
        if key == "chunks":
            return [[r["chunks"] for r in rank] for rank in ranks]
        return root if key == "root" else groups[key][0]

    return Spawns(result)


def _assert_same(got: dict, want: dict, **tolerance) -> None:
    assert got.keys() == want.keys() and any(".layers.3." in n for n in want)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, msg=name, **tolerance)


def test_gradients_at_pp2_vpp2_equal_pp2_and_with_the_global_batch_pp1(results):
    pp2, vpp, pp1, vpp_cached = results["gradients"]
    # the layers (1-based) each rank's chunks hold: PP 2 splits 4 layers in halves, VPP 2 interleaves
    assert [rank[0] for rank in results["chunks"]] == [[[1, 2]], [[3, 4]]]
    assert [rank[1] for rank in results["chunks"]] == [[[1], [3]], [[2], [4]]]
    _assert_same(vpp, pp2, rtol=1e-5, atol=1e-7)
    _assert_same(vpp_cached, pp1, rtol=1e-4, atol=1e-6)
    assert results["loss"][1] == pytest.approx(results["loss"][0], abs=1e-6)


def test_a_run_stopped_at_pp2_vpp2_resumes_at_pp2_and_ends_where_the_uninterrupted_run_ends(results):
    from megatron_rpo.convert.files import ConvertedCheckpoint

    uninterrupted, stopped, resumed = results["training"]
    assert not [r["error"] for r in results["training"] if "error" in r]
    assert [h["step"] for h in stopped["history"]] == [1, 2] and [h["step"] for h in resumed["history"]] == [3, 4]
    for a, b in zip(uninterrupted["history"], stopped["history"] + resumed["history"]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    assert resumed["eval"]["loss"] == pytest.approx(uninterrupted["eval"]["loss"], abs=1e-5)
    x, y = (ConvertedCheckpoint(str(results["root"] / d / "export")) for d in ("vpp", "stopped"))
    assert sorted(x.index) == sorted(y.index)
    for name in x.index:
        torch.testing.assert_close(y.get(name), x.get(name), rtol=1e-4, atol=1e-5, msg=name)


def test_step_time_of_the_interleaved_pipeline_is_reported(results):
    pp2, vpp = results["seconds"]
    print(f"\nstep time at 8 microbatches on 2 gloo processes: PP 2 {pp2:.2f} s, PP 2 x VPP 2 {vpp:.2f} s "
          f"({vpp / pp2:.2f}x; informative: gloo is not NCCL)")
    assert pp2 > 0 and vpp > 0


@pytest.mark.parametrize("extra,message", [
    ([VPP2], r"needs parallel.pipeline_model_parallel_size > 1"),
    ([PP2, "parallel.virtual_pipeline_model_parallel_size=4"], r"num_layers \(4\) is not divisible by .* \(2\) x "
                                                                r"virtual_pipeline_model_parallel_size \(4\)"),
])
def test_interleaving_settings_are_checked_before_any_work(extra, message):
    with pytest.raises(ValueError, match=message):
        load_config(RECIPE, extra)


def test_a_step_of_too_few_microbatches_for_the_interleaved_schedule_is_refused():
    config = load_config(RECIPE, [PP2, VPP2, "train.global_batch_size=12"])  # 12 / 4 = 3 microbatches at DP 1
    with pytest.raises(ValueError, match=r"multiple of parallel.pipeline_model_parallel_size \(2\) microbatches"):
        config.data_parallel_size(2)
