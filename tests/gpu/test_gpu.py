"""The GPU tier: every training path on CUDA as shipped, bf16, one GPU (``pytest tests/gpu``).

Skipped without CUDA (tests/conftest.py). ``scripts/gpu_check.sh`` runs it with the benchmarks.
Inputs are the tiny workspace of the CPU tests (converted checkpoint, HH train/valid splits);
every trainer run is 3 bf16 steps in one process, on the GPU of ``LOCAL_RANK`` 0.

Tolerances, and why:

* bf16 log-probs against float64: 1% of each sequence's log-prob. bf16 keeps 8 significant bits
  (0.4% per value); four layers and a sum over tens of response tokens stay within 1%.
* resumed against uninterrupted runs: the first step after the resume within 2% of the
  uninterrupted loss. Weights and optimizer state are restored exactly, but GPU kernels (the
  attention backward's atomic adds, cuBLAS's split-K reductions) are not bitwise deterministic,
  so neither is a bf16 run against itself; the loss is equal to well within that.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.multiprocess import run_ranks
from tests.workspace import REPO, build, family_checkpoint, overrides, train


# name -> overrides of configs/tiny_cpu.yaml (online reference, embedding weights, packing by default)
RUNS = {
    "rpo_online": [],
    "rpo_precomputed": ["loss.reference=precomputed"],
    "dpo": ["loss.loss_type=dpo"],
    "ipo": ["loss.loss_type=ipo"],
    "simpo": ["loss.loss_type=simpo", "loss.beta=2.0"],
    "simpo_rpo": ["loss.loss_type=simpo_rpo", "loss.beta=2.0"],
    "sft": ["loss.loss_type=sft"],
    "scope_local": ["loss.contrast_scope=local"],
    "scope_global_batch": ["loss.contrast_scope=global_batch"],
    "uniform": ["loss.weighting=uniform"],
    "diagonal": ["loss.weighting=diagonal"],
    "unpaired": ["data.paired=false", "loss.tau=0.75"],
    "padded": ["data.packing=false"],
    "lora": ["lora.rank=8"],  # megatron's local layers on the GPU (docs/lora.md), the base as the reference
}


@pytest.fixture(scope="module")
def gpu_workspace(tmp_path_factory, hh_slice, sp_tokenizer):
    """The tiny workspace, plus reference log-probs computed on the GPU by the reference tool."""
    ws = build(tmp_path_factory.mktemp("gpu"), hh_slice, sp_tokenizer)
    root = ws["root"]
    for split in ("train", "valid"):
        run_ranks(_reference_tool, 1, str(root / "ckpt"), str(root / split), timeout=300)
    return ws


def _reference_tool(ckpt: str, prefix: str):
    from tests.workspace import load_script

    tool = load_script("tools/precompute_reference_logps.py", "reference_tool")
    assert tool.main(["--load", ckpt, "--data-prefix", prefix, "--no-progress"]) == 0


def _all_runs(ws, root) -> dict:
    from megatron.core import parallel_state

    out = {}
    for name, extra in RUNS.items():
        save = root / name
        argv = overrides(ws, save, "train.train_iters=3", "train.eval_iters=1", *extra)
        if name != "rpo_online":
            argv.append("train.export=false")
        out[name] = train(argv)
        parallel_state.destroy_model_parallel()  # the process group stays for the next run
    return out


@pytest.fixture(scope="module")
def runs(gpu_workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    (results,) = run_ranks(_all_runs, 1, gpu_workspace, root, timeout=600)
    return results, root


@pytest.mark.parametrize("name", list(RUNS))
def test_trainer_runs_in_bf16_on_the_gpu(runs, name):
    results, root = runs
    r = results[name]
    assert [h["step"] for h in r["history"]] == [1, 2, 3]
    for h in r["history"]:
        assert math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]), h
    assert r["eval"] and math.isfinite(r["eval"]["loss"])
    assert (root / name / "latest").read_text().strip() == "iter_0000003"


def test_export_converts_back_to_hugging_face(runs, gpu_workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    _, root = runs
    out = tmp_path / "hf"
    export = str(root / "rpo_online" / "export")
    subprocess.run([sys.executable, "tools/convert_megatron_to_hf.py", "--megatron-dir", export,
                    "--output-dir", str(out), "--no-progress"], check=True, cwd=REPO)
    trained = AutoModelForCausalLM.from_pretrained(out).eval()
    start = AutoModelForCausalLM.from_pretrained(gpu_workspace["root"] / "hf").eval()
    tokens = torch.randint(0, gpu_workspace["vocab"], (1, 16))
    with torch.no_grad():
        a, b = trained(tokens).logits, start(tokens).logits
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


# The GPU recipes' optimizer settings (distributed optimizer, RMSprop, warm-up), whichever Adam the
# container gives megatron (transformer-engine's, apex's or torch's).
@pytest.mark.parametrize("settings", [[], ["optimizer.use_distributed_optimizer=true", "optimizer.optimizer=rmsprop",
                                           "optimizer.lr_warmup_iters=3"]], ids=["default", "recipes"])
def test_resume_continues_the_uninterrupted_run(gpu_workspace, tmp_path, settings):
    argv = overrides(gpu_workspace, tmp_path / "full", "train.train_iters=4", "train.save_interval=2",
                     "train.export=false", *settings)
    full = run_ranks(train, 1, argv, timeout=300)[0]["history"]
    part = overrides(gpu_workspace, tmp_path / "resumed", "train.train_iters=4", "train.save_interval=2",
                     "train.export=false", *settings)
    first = run_ranks(train, 1, part + ["train.exit_interval=2"], timeout=300)[0]["history"]
    second = run_ranks(train, 1, part, timeout=300)[0]["history"]
    assert [h["step"] for h in first + second] == [1, 2, 3, 4]
    assert first[0]["loss"] == full[0]["loss"]  # the same weights and batch: the forward is deterministic
    for a, b in zip(first + second, full):
        assert a["lr"] == b["lr"]
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2), (a["step"], a["loss"], b["loss"])


def _bf16_and_reference_logps(ckpt: str, prefix: str, indices: list[int]):
    from megatron_rpo import parallel
    from megatron_rpo.config import Config, DataConfig
    from megatron_rpo.data.dataset import PreferenceDataset, collate_step
    from megatron_rpo.device import current_device
    from megatron_rpo.models import model_provider
    from megatron_rpo.training.checkpointing import checkpoint_model_config, load_weights
    from megatron_rpo.training.step import sequence_logps

    config = Config(model=checkpoint_model_config(ckpt), data=DataConfig(max_prompt_length=96, max_length=160))
    parallel.initialize(config.parallel)
    model = model_provider(config, bf16=True)
    load_weights(model, ckpt)
    ds = PreferenceDataset(prefix, reference_logps=True)
    out = {}
    for packing in (True, False):
        batches = collate_step(ds, [indices], 160, packing=packing)
        ((logps, lengths),) = sequence_logps(model, batches)
        assert logps.device == current_device()  # cuda:LOCAL_RANK
        out[packing] = logps.cpu().double()
    out["precomputed"] = torch.from_numpy(ds.ref_logps[indices]).double()
    out["lengths"] = lengths.cpu()
    return out


def _float64_logps(hf_dir, prefix: str, indices: list[int]) -> torch.Tensor:
    """Response log-probs from transformers in float64 on the CPU, one sequence at a time."""
    from transformers import AutoModelForCausalLM

    from megatron_rpo.data.dataset import PreferenceDataset

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
    ds = PreferenceDataset(prefix)
    out = []
    for i in indices:
        ids = torch.from_numpy(ds.tokens[i].astype(np.int64))[:160]
        prompt = int(ds.meta["prompt_length"][i])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[None]).logits[0], -1)  # [s, V]
        token = logp[:-1].gather(1, ids[1:, None])[:, 0]  # log p(ids[t + 1] | ids[:t + 1])
        out.append(token[prompt - 1:].sum())
    return torch.stack(out)


def test_bf16_log_probs_and_the_reference_tool_match_float64(gpu_workspace):
    root = gpu_workspace["root"]
    indices = list(range(16))
    got = run_ranks(_bf16_and_reference_logps, 1, str(root / "ckpt"), str(root / "valid"), indices, timeout=300)[0]
    want = _float64_logps(root / "hf", str(root / "valid"), indices)
    for key in (True, False, "precomputed"):
        torch.testing.assert_close(got[key], want, rtol=1e-2, atol=0.0, msg=f"{key}")


def test_prompt_embeddings_on_cuda_match_the_cpu(gpu_workspace, tmp_path):
    from megatron_rpo.data.embeddings import load_prompt_embeddings

    root = gpu_workspace["root"]
    for path in root.glob("valid.*"):
        if ".emb" not in path.name:
            shutil.copy(path, tmp_path / path.name)
    subprocess.run([sys.executable, "tools/precompute_prompt_embeddings.py", "--data-prefix", str(tmp_path / "valid"),
                    "--device", "cuda", "--no-progress"], check=True, cwd=REPO)
    gpu, manifest = load_prompt_embeddings(str(tmp_path / "valid"))
    cpu, _ = load_prompt_embeddings(str(root / "valid"))
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)


def _transformer_engine_logps(ckpt: str, prefix: str, indices: list[int]):
    from megatron_rpo.models import use_transformer_engine

    assert use_transformer_engine()
    return _bf16_and_reference_logps(ckpt, prefix, indices)


def test_transformer_engine_spec_matches_transformers(gpu_workspace):
    pytest.importorskip("transformer_engine", reason="transformer-engine is not installed (the NGC container has it)")
    root = gpu_workspace["root"]
    indices = list(range(16))
    got = run_ranks(_transformer_engine_logps, 1, str(root / "ckpt"), str(root / "valid"), indices, timeout=300)[0]
    want = _float64_logps(root / "hf", str(root / "valid"), indices)
    for packing in (True, False):  # packed: transformer-engine's thd attention with cu_seqlens
        torch.testing.assert_close(got[packing], want, rtol=1e-2, atol=0.0, msg=f"packing={packing}")


@pytest.fixture(scope="module")
def gpu_families(gpu_workspace, sp_tokenizer, tmp_path_factory):
    """Tiny Qwen3, Qwen3-MoE and Mixtral (issue 20), each with its own copy of the held-out set and
    reference log-probs computed on the GPU."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for kind in ("qwen3", "qwen3_moe_norm", "mixtral"):
        ckpt = family_checkpoint(root, kind, gpu_workspace["vocab"], sp_tokenizer)
        data = root / kind / "data"
        data.mkdir()
        for path in gpu_workspace["root"].glob("valid.*"):
            if ".ref." not in path.name and path.name != "valid.jsonl":
                shutil.copy(path, data / path.name)
        run_ranks(_reference_tool, 1, ckpt, str(data / "valid"), timeout=300)
        out[kind] = {"ckpt": ckpt, "hf": root / kind / "hf", "valid": str(data / "valid")}
    return out


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe_norm", "mixtral"])
def test_family_bf16_log_probs_match_float64_transformers(gpu_families, kind):
    """transformer-engine's layers when it imports (the experts stay SequentialMLP), the local spec otherwise."""
    f = gpu_families[kind]
    indices = list(range(16))
    got = run_ranks(_bf16_and_reference_logps, 1, f["ckpt"], f["valid"], indices, timeout=300)[0]
    want = _float64_logps(f["hf"], f["valid"], indices)
    for key in (True, False, "precomputed"):
        torch.testing.assert_close(got[key], want, rtol=1e-2, atol=0.0, msg=f"{kind} {key}")


def test_mixture_of_experts_trains_in_bf16(gpu_workspace, gpu_families, tmp_path):
    argv = overrides(gpu_workspace, tmp_path / "moe", "train.train_iters=3", "train.eval_iters=1",
                     f"train.load={gpu_families['qwen3_moe_norm']['ckpt']}", "train.export=false")
    r = run_ranks(train, 1, argv, timeout=300)[0]
    assert [h["step"] for h in r["history"]] == [1, 2, 3]
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in r["history"])


def _gpu_activations(cases: list[str]) -> dict:
    from tests.unit.test_plan import plan_batch, saved_activations

    return {name: saved_activations(name, plan_batch(), world=1) for name in cases}


def test_memory_plan_activations_match_what_autograd_keeps_on_the_gpu():
    """The plan's per-layer inventory of transformer-engine's layers in bf16 (what the GPU plan
    counts) within 25% of the saved tensors measured on the GPU, as the CPU test does for the local
    spec; single-GPU cases of tests/unit/test_plan.py."""
    from tests.unit.test_plan import compare_activations

    cases = ["none", "full", "moe"]
    (measured,) = run_ranks(_gpu_activations, 1, cases, timeout=300)
    from megatron_rpo.models import use_transformer_engine

    for name in cases:
        compare_activations(name, [measured[name]], world=1, bf16=True, transformer_engine=use_transformer_engine())


def _reference_tool_cp(ckpt: str, prefix: str, cp: int):
    from tests.workspace import reference_tool

    return reference_tool(ckpt, prefix, "--context-parallel-size", str(cp))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="context parallelism 2 needs 2 GPUs")
def test_context_parallel_bf16_log_probs_equal_cp1(gpu_workspace, tmp_path):
    """transformer-engine's context-parallel attention (p2p, thd) in bf16: the reference tool's file
    at CP 2 within 1% of its file at CP 1 (two GPUs, each run in its own processes)."""
    import glob

    root = gpu_workspace["root"]
    files = {}
    for cp in (1, 2):
        (tmp_path / f"cp{cp}").mkdir()
        for f in glob.glob(str(root / "valid.*")):
            if ".ref." not in f and not f.endswith("valid.jsonl"):
                shutil.copy(f, tmp_path / f"cp{cp}")
        files[cp] = run_ranks(_reference_tool_cp, 2, str(root / "ckpt"), str(tmp_path / f"cp{cp}" / "valid"), cp,
                              timeout=300)[0]
    np.testing.assert_allclose(files[2], files[1], rtol=0.01)
