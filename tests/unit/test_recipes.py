"""Every recipe in configs/ loads, validates, and fits the world it is written for."""

import glob
import os

import pytest

from megatron_rpo.config import config_to_dict, load_config
from tests.conftest import REPO

RECIPES = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
WORLD = {"tiny_cpu.yaml": 2, "mistral7b_hh_rpo_paired.yaml": 8, "mistral7b_hh_rpo_unpaired.yaml": 8,
         "llama3_8b_rpo_tp2.yaml": 8, "llama2_70b_rpo_tp8_pp4.yaml": 64, "llama31_8b_instruct_rpo.yaml": 8}


def test_every_recipe_is_listed_here():
    assert {os.path.basename(r) for r in RECIPES} == set(WORLD)


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_loads_and_fits_its_world(path):
    config = load_config(path)
    dp = config.data_parallel_size(WORLD[os.path.basename(path)])
    assert dp >= 1


def test_paper_settings():
    paired = load_config(os.path.join(REPO, "configs", "mistral7b_hh_rpo_paired.yaml"))
    unpaired = load_config(os.path.join(REPO, "configs", "mistral7b_hh_rpo_unpaired.yaml"))
    for c in (paired, unpaired):
        assert (c.loss.beta, c.optimizer.optimizer, c.optimizer.lr, c.train.global_batch_size) == (0.1, "rmsprop", 5e-7, 64)
        assert (c.data.max_prompt_length, c.data.max_length, c.train.train_iters) == (256, 512, None)  # one epoch
    assert (paired.loss.tau, paired.data.paired) == (0.5, True)
    assert (unpaired.loss.tau, unpaired.data.paired) == (0.75, False)
    # The unpaired recipe inherits everything else from the paired one.
    a, b = config_to_dict(paired), config_to_dict(unpaired)
    assert a["model"] == b["model"] and a["optimizer"] == b["optimizer"]


def test_llama31_recipe_takes_its_model_from_the_checkpoint():
    from megatron_rpo.config import explicit_keys

    config = load_config(os.path.join(REPO, "configs", "llama31_8b_instruct_rpo.yaml"))
    assert not any(key.startswith("model.") for key in explicit_keys(config))
