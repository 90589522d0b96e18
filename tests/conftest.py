import json

import pytest
import torch

from tests.workspace import HH_SLICE, build


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
