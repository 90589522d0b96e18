import json
import os

import pytest
import torch

from tests.multiprocess import TIER_VARIABLE
from tests.workspace import HH_SLICE, build

# The tiers, one marker per test, given by its module's path (pyproject.toml declares the markers;
# `bash scripts/test.sh -m unit` runs one tier, docs/cpu.md lists the ways):
#   unit: in the pytest process (short subprocesses allowed, no gloo ranks);
#   dist: multi-rank, gloo ranks forked from the preloaded forkserver (tests.multiprocess);
#   e2e:  whole commands: the launcher, the recipes, the quickstart, the README, the reproduction;
#   gpu:  needs CUDA, skipped without it.
# A module not named below is unit if it is under tests/unit; run_ranks refuses to run in a unit
# test, so a module that starts spawning ranks has to be added to DIST.
GPU = ("tests/gpu/",)
E2E = tuple(f"tests/functional/test_{name}.py" for name in ("readme", "quickstart", "recipe_runs", "run_safety",
                                                             "reproduction", "megatron_versions", "evaluate"))
DIST = ("tests/functional/",) + tuple(f"tests/unit/{name}.py" for name in (
    "test_cpu", "test_device", "test_logprobs", "test_plan", "convert/test_convert", "data/test_embeddings",
    "loss/test_distributed", "models/test_lora", "models/test_recompute", "training/test_context_parallel",
    "training/test_forward_step", "training/test_optimizer", "training/test_packing", "training/test_reference",
    "training/test_step"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tier(path: str) -> str:
    """The tier of the test module at ``path``."""
    relative = os.path.relpath(path, ROOT).replace(os.sep, "/")
    for name, prefixes in (("gpu", GPU), ("e2e", E2E), ("dist", DIST)):
        if relative.startswith(prefixes):
            return name
    return "unit"


def pytest_collection_modifyitems(config, items):
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs CUDA")
    for item in items:
        name = tier(str(item.path))
        item.add_marker(name)
        if name == "gpu" and skip is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _tier_of_this_test(request, monkeypatch):
    """The running test's tier, for :func:`tests.multiprocess.run_ranks` to refuse ranks in a unit test."""
    monkeypatch.setenv(TIER_VARIABLE, tier(str(request.node.path)))


@pytest.fixture(scope="session")
def hh_slice() -> str:
    """The bundled 243-pair HH-RLHF slice (data/README.md)."""
    return HH_SLICE


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory) -> str:
    """A sentencepiece model trained on the bundled slice (nothing is downloaded)."""
    from megatron_rpo.data.tokenizer import train_sentencepiece

    texts = []
    with open(HH_SLICE) as f:
        for line in f:
            row = json.loads(line)
            texts += [row["chosen"], row["rejected"]]
    return train_sentencepiece(texts, str(tmp_path_factory.mktemp("tok") / "sp"), vocab_size=800)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, hh_slice, sp_tokenizer) -> dict:
    """A converted tiny Llama matching configs/tiny_cpu.yaml, train/valid datasets and embeddings."""
    return build(tmp_path_factory.mktemp("train"), hh_slice, sp_tokenizer)


def pytest_report_header(config):
    from tests.equivalence import RUN_SEED, SEEDS

    return f"equivalence harness: cases drawn with seeds {SEEDS[0]}..{SEEDS[-1]} (run seed {RUN_SEED})"
