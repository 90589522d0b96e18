"""Preference training on mixture-of-experts models (issue 20), on 2 gloo processes.

* One step's gradients at EP 2 equal EP 1 on the same per-rank microbatches, with the router's
  load-balancing loss on; the gathered contrast matrix (the loss and its report) is the one
  without EP; the aux loss adds a gradient and never enters the loss value.
* A run stopped at EP 2 resumes at EP 1 and ends where the uninterrupted EP 2 run ends; it logs
  ``moe/aux_loss`` and each MoE layer's load imbalance.
* The reference tool's per-sequence log-probs equal transformers' own sums over the response
  tokens for Qwen3, Qwen3-MoE and Mixtral at TP 1, TP 2 (+ sequence parallel) and EP 2.

Every case of one world shares one spawn.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.multiprocess import Spawns, run_ranks
from tests.workspace import family_checkpoint, overrides, reference_tool, step_gradients, train_each

FAMILIES = ("qwen3", "qwen3_moe_norm", "mixtral")


@pytest.fixture(scope="module")
def checkpoints(workspace, sp_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {kind: family_checkpoint(root, kind, workspace["vocab"], sp_tokenizer) for kind in FAMILIES}


def _reference_logps(ckpt: str, prefix: str, tp: int, ep: int):
    return reference_tool(ckpt, prefix, "--micro-batch-size", "5", "--tensor-model-parallel-size", str(tp),
                          "--expert-model-parallel-size", str(ep))


def _padding(ckpt: str, prefix: str) -> dict:
    """The same sequences padded ([B, S] rows) and packed (one row with a padded tail) at EP 2: their
    log-probs, and the aux loss (megatron's tracker) of a training-mode forward of each."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe import moe_utils

    from megatron_rpo import parallel
    from megatron_rpo.config import Config, DataConfig, ParallelConfig
    from megatron_rpo.data.dataset import PreferenceDataset, collate_step
    from megatron_rpo.models import model_provider
    from megatron_rpo.training.checkpointing import checkpoint_model_config, load_weights
    from megatron_rpo.training.forward_step import logps_loss_func
    from megatron_rpo.training.step import run_schedule, sequence_logps

    config = Config(model=checkpoint_model_config(ckpt), parallel=ParallelConfig(expert_model_parallel_size=2),
                    data=DataConfig(max_prompt_length=96, max_length=160))
    parallel.initialize(config.parallel)
    try:
        model = model_provider(config)
        load_weights(model, ckpt)
        ds = PreferenceDataset(prefix)
        indices = [[0, 1, 2, 3, 32, 33, 34, 35]]  # the same 4 pairs on both ranks
        out = {}
        for form, packing in (("padded", False), ("packed", True)):
            batches = collate_step(ds, indices, 160, packing=packing)
            model.eval()
            ((logps, _),) = sequence_logps(model, batches)
            model.train()
            moe_utils.get_moe_layer_wise_logging_tracker().clear()
            run_schedule(model, batches, logps_loss_func, forward_only=False)
            values = moe_utils.get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"]
            moe_layers = [v for v in values.tolist() if v]
            tokens = int(batches[0]["tokens"].numel())
            out[form] = {"logps": logps, "aux": sum(moe_layers) / len(moe_layers), "tokens": tokens}
        out["real_tokens"] = int(sum(min(int(n), 160) for n in ds.tokens.sequence_lengths[indices[0]]))
        return out
    finally:
        ps.destroy_model_parallel()


def _gradients(runs):
    return [step_gradients(argv) for argv in runs]


def _references(cases):
    return [_reference_logps(*case) for case in cases]


def _transformers_logps(hf_dir: str, prefix: str) -> np.ndarray:
    """Each sequence's response log-prob from transformers itself (float32, padded rows)."""
    from transformers import AutoModelForCausalLM

    from megatron_rpo.data.dataset import PreferenceDataset, collate

    ds = PreferenceDataset(prefix)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
    batch = collate(ds, list(range(len(ds))), ds.manifest["max_length"])
    with torch.no_grad():
        logps = torch.log_softmax(model(batch["tokens"]).logits.float(), dim=-1)
    token = logps.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)  # [b, s]
    return (token * batch["loss_mask"]).sum(-1).numpy()


@pytest.fixture(scope="module")
def results(workspace, checkpoints, tmp_path_factory):
    import glob
    import shutil

    root = tmp_path_factory.mktemp("expert_runs")
    moe = checkpoints["qwen3_moe_norm"]
    model = [f"train.load={moe}", "model.num_query_groups=2"]

    def argv(save, *extra):
        return overrides(workspace, root / save, *model, "train.train_iters=4", "train.save_interval=2",
                         "train.eval_iters=1", *extra)

    ep2 = "parallel.expert_model_parallel_size=2"
    gradient_runs = [argv("g1", "train.save=null"), argv("g2", "train.save=null", ep2),
                     argv("g0", "train.save=null", ep2, "model.moe_aux_loss_coeff=0")]
    training_runs = [argv("ep2", ep2), argv("stopped", ep2, "train.exit_interval=2"),
                     argv("stopped"),  # resumed at EP 1
                     # gradient caching over 2 microbatches, padded rows; and a loss of the diagonal alone
                     argv("cached", ep2, "loss.contrast_scope=global_batch", "train.global_batch_size=16",
                          "data.packing=false", "train.train_iters=2", "train.save=null"),
                     argv("dpo", ep2, "loss.loss_type=dpo", "train.train_iters=2", "train.save=null")]
    prefixes = {}
    for kind in FAMILIES:  # a small dataset per case: the tool writes PREFIX.ref beside it
        for tp, ep in [(1, 1), (2, 1)] + ([(1, 2)] if kind != "qwen3" else []):
            prefix = root / f"{kind}_tp{tp}_ep{ep}" / "valid"
            prefix.parent.mkdir()
            for f in glob.glob(str(workspace["root"] / "valid.*")):
                if ".ref." not in f and not f.endswith("valid.jsonl"):
                    shutil.copy(f, prefix.parent)
            prefixes[(kind, tp, ep)] = str(prefix)
    reference_cases = [(checkpoints[kind], prefix, tp, ep) for (kind, tp, ep), prefix in prefixes.items()]
    padding_case = (moe, str(workspace["root"] / "valid"))
    groups = {"gradients": (_gradients, 2, gradient_runs), "training": (train_each, 2, training_runs),
              "reference": (_references, 2, reference_cases), "padding": (_padding, 2, *padding_case)}
    # Each group spawned on its own when a test asks for it.
    return Spawns(lambda key: {"root": root, "prefixes": prefixes}[key] if key in ("root", "prefixes")
                  else run_ranks(*groups[key], timeout=900)[0])


def test_gradients_at_ep2_equal_ep1_with_the_aux_loss_and_the_matrix_is_the_same(results):
    ep1, ep2, no_aux = results["gradients"]
    assert ep1["grads"].keys() == ep2["grads"].keys()
    assert any(".mlp.experts.local_experts.3." in n for n in ep1["grads"])
    for name, grad in ep1["grads"].items():
        torch.testing.assert_close(ep2["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert ep2["matrix"] == ep1["matrix"] == (8, 8)  # the whole data-parallel batch, 2 ranks x 4 pairs
    assert ep2["loss"] == pytest.approx(ep1["loss"], abs=1e-6)
    # The aux loss never enters the loss value, only the gradient (the routers' above all).
    assert no_aux["loss"] == pytest.approx(ep2["loss"], abs=1e-6)
    router = "decoder.layers.2.mlp.router.weight"
    assert (no_aux["grads"][router] - ep2["grads"][router]).abs().max() > 1e-4


def test_a_run_stopped_at_ep2_resumes_at_ep1_and_ends_where_the_uninterrupted_run_ends(results):
    from megatron_rpo.convert.files import ConvertedCheckpoint
    from megatron_rpo.plot import read_scalars

    uninterrupted, stopped, resumed = results["training"][:3]
    assert not [r["error"] for r in results["training"] if "error" in r]
    assert [h["step"] for h in stopped["history"]] == [1, 2] and [h["step"] for h in resumed["history"]] == [3, 4]
    for a, b in zip(uninterrupted["history"], stopped["history"] + resumed["history"]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    x, y = (ConvertedCheckpoint(str(results["root"] / d / "export")) for d in ("ep2", "stopped"))
    assert sorted(x.index) == sorted(y.index)
    for name in x.index:
        torch.testing.assert_close(y.get(name), x.get(name), rtol=1e-4, atol=1e-5, msg=name)
    # The EP 2 export (each rank's experts in files of their own) converts back to Hugging Face.
    from transformers import AutoModelForCausalLM

    from megatron_rpo.convert import convert_megatron_to_hf

    convert_megatron_to_hf(str(results["root"] / "ep2" / "export"), str(results["root"] / "ep2_hf"), progress=False)
    trained = AutoModelForCausalLM.from_pretrained(results["root"] / "ep2_hf")
    assert type(trained).__name__ == "Qwen3MoeForCausalLM"
    expert = trained.state_dict()["model.layers.3.mlp.experts.gate_up_proj"]  # fused in memory: [E, 2F, H]
    assert torch.isfinite(expert).all() and expert.shape[0] == 4
    scalars = read_scalars(str(results["root"] / "ep2"))
    assert [s for s, _ in scalars["moe/aux_loss"]] == [1, 2, 3, 4]
    assert all(v > 0.5 for _, v in scalars["moe/aux_loss"])  # about 1 when balanced (megatron's form)
    layers = sorted(n for n in scalars if n.startswith("moe/load_imbalance/"))
    assert layers == ["moe/load_imbalance/layer_00", "moe/load_imbalance/layer_02", "moe/load_imbalance/layer_03"]
    assert all(1.0 <= v <= 2.0 for n in layers for _, v in scalars[n])  # 4 experts, top 2: at most 2


def test_reference_logps_equal_transformers_at_tp1_tp2_ep2(results, checkpoints):
    import os

    for ((kind, tp, ep), prefix), got in zip(results["prefixes"].items(), results["reference"]):
        hf = os.path.join(os.path.dirname(checkpoints[kind]), "hf")
        np.testing.assert_allclose(got, _transformers_logps(hf, prefix), rtol=1e-4, atol=1e-3,
                                   err_msg=f"{kind} TP {tp} EP {ep}")


def test_padding_never_changes_a_real_tokens_log_prob_only_the_aux_loss(results):
    """Routing is dropless: the padded rows' pad tokens and the packed row's tail change no real
    token's log-prob. They are routed, so they do count in the load-balancing loss; the numbers
    are printed (pytest -s) for the issue note."""
    padded, packed = results["padding"]["padded"], results["padding"]["packed"]
    torch.testing.assert_close(packed["logps"], padded["logps"], rtol=1e-5, atol=1e-4)
    print(f"\naux loss: padded {padded['aux']:.6f} over {padded['tokens']} tokens, packed {packed['aux']:.6f} over "
          f"{packed['tokens']} tokens; {results['padding']['real_tokens']} real")
    assert padded["tokens"] > packed["tokens"] >= results["padding"]["real_tokens"]


def test_gradient_caching_padded_rows_and_dpo_train_at_ep2(results):
    import math

    cached, dpo = results["training"][3:]
    assert not [r["error"] for r in (cached, dpo) if "error" in r]
    for run in (cached, dpo):
        assert [h["step"] for h in run["history"]] == [1, 2]
        assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in run["history"])
    assert cached["history"][0]["matrix_rows"] == 16  # the whole global batch: 2 microbatches x 2 ranks x 4 pairs
