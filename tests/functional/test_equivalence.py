"""The equivalence harness (tests/equivalence.py) in the default suite: every shipped recipe's own
layout shrunk, and a seeded sample of the space drawn anew on every run, each compared with one
process training the same global batch. The seed is in pytest's header; a failing case's id
starts with its own seed, and ``MEGATRON_RPO_EQUIVALENCE_SEEDS=<seed> pytest
tests/functional/test_equivalence.py`` reruns it alone.

All cases of one world size share one start-up; the single process runs every case's
independent computation (and the precomputed reference log-probs) first.
"""

from __future__ import annotations

import glob
import os

import pytest

from tests.equivalence import (
    SEEDS,
    compare,
    draw,
    evaluates,
    prepare_world,
    recipe_case,
    reference_overrides,
    resumed,
    run_cases,
)
from tests.multiprocess import run_ranks
from tests.workspace import REPO

RECIPES = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.yaml")) if not p.endswith("tiny_cpu.yaml"))

def _recipe(name: str):
    return recipe_case(os.path.join(REPO, "configs", name))


# Resumed at another layout, each with the distributed optimizer (every GPU recipe has it on).
RESUMED = [resumed(_recipe("qwen3_30b_a3b_rpo.yaml"), 2, "parallel.expert_model_parallel_size=1"),
           resumed(_recipe("mixtral_8x7b_rpo.yaml"), 1, "parallel.expert_model_parallel_size=1"),
           resumed(_recipe("llama2_70b_rpo_tp8_pp4.yaml"), 2, "parallel.virtual_pipeline_model_parallel_size=null"),
           # at DP 4 then, a smaller micro batch: the global-batch matrix is the same
           resumed(_recipe("llama3_8b_rpo_tp2.yaml"), 1, "parallel.tensor_model_parallel_size=1",
                   "parallel.sequence_parallel=false", "train.micro_batch_size=1"),
           resumed(_recipe("llama31_8b_long_rpo.yaml"), 2, "parallel.context_parallel_size=1")]
# Drawn cases that once failed, kept on every run: s550384 (a refusal that named no setting) and
# s733643 (Qwen3-MoE at PP 4, whose dense-only stage holds no expert to optimize: the distributed
# optimizer could not save), also resumed at PP 2 (DP 2 then: half the micro batch, the same matrix).
FOUND = [draw(550384), draw(733643),
         resumed(draw(733643), 2, "parallel.pipeline_model_parallel_size=2", "train.micro_batch_size=2")]
CASES = [recipe_case(r) for r in RECIPES] + RESUMED + FOUND + [draw(seed) for seed in SEEDS]


@pytest.fixture(scope="module")
def outcomes(workspace, sp_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("equivalence")
    world = prepare_world(root, workspace, sp_tokenizer)
    def key(case):  # what decides the single process's run
        return case.recipe, case.family, case.steps, evaluates(case), reference_overrides(case)

    single, index = [], {}
    for case in CASES:
        if key(case) not in index:
            index[key(case)] = len(single)
            single.append((case, reference_overrides(case), str(root / "single" / f"run{len(single)}")))
    want = run_ranks(run_cases, 1, world, single, True, timeout=1800)[0]
    out = {}
    for size in sorted({c.world for c in CASES}):
        group = [c for c in CASES if c.world == size]
        runs = [(c, c.overrides, str(root / f"world{size}" / f"case{n}")) for n, c in enumerate(group)]
        got = run_ranks(run_cases, size, world, runs, timeout=1800)[0]
        for case, result in zip(group, got):
            out[case.name] = (result, want[index[key(case)]])
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_layout_trains_as_one_process_does(case, outcomes):
    compare(case, *outcomes[case.name])
