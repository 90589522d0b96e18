import json
import os

import numpy as np
import pytest

from megatron_rpo.data.embeddings import load_prompt_embeddings, precompute_prompt_embeddings, resolve_model
from megatron_rpo.data.preprocess import preprocess


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, hh_slice, sp_tokenizer):
    prefix = str(tmp_path_factory.mktemp("emb") / "hh")
    preprocess([hh_slice], "hh", sp_tokenizer, prefix, max_prompt_length=128, max_length=256, progress=False)
    return prefix


def test_embeddings_equal_a_direct_sentence_transformers_encode(dataset):
    from sentence_transformers import SentenceTransformer

    m = precompute_prompt_embeddings(dataset, progress=False)
    vectors, manifest = load_prompt_embeddings(dataset)
    assert manifest == m and m["dim"] == 384 and vectors.dtype == np.float32
    with open(f"{dataset}.prompts.jsonl") as f:
        prompts = [json.loads(line) for line in f]
    assert vectors.shape == (len(prompts), 384)
    # Independently: the bundled weights, every prompt encoded on its own, normalised by hand.
    direct = SentenceTransformer(resolve_model("all-MiniLM-L6-v2"), device="cpu")
    for i in (0, 5, len(prompts) - 1):
        v = direct.encode(prompts[i], convert_to_numpy=True)
        np.testing.assert_allclose(vectors[i], v / np.linalg.norm(v), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_embeddings_of_another_dataset_version_are_refused(tmp_path, sp_tokenizer):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    prefix = str(tmp_path / "d")
    preprocess([str(src)], "pairs", sp_tokenizer, prefix, progress=False)
    precompute_prompt_embeddings(prefix, progress=False)
    src.write_text(json.dumps({"prompt": "q", "chosen": "c", "rejected": "r"}) + "\n")
    preprocess([str(src)], "pairs", sp_tokenizer, prefix, progress=False)
    with pytest.raises(ValueError, match="computed for another version of"):
        load_prompt_embeddings(prefix)


def test_unknown_model_and_missing_dataset_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="neither a local sentence-transformers directory nor the bundled"):
        resolve_model("some/remote-model")
    with pytest.raises(ValueError, match=r"nothing.manifest.json not found"):
        precompute_prompt_embeddings(str(tmp_path / "nothing"), progress=False)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_one_line_naming_the_cpu(dataset, capsys):
    from tests.workspace import load_script

    tool = load_script("tools/precompute_prompt_embeddings.py", "precompute_prompt_embeddings_tool")
    assert tool.main(["--data-prefix", dataset, "--device", "cuda", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: device 'cuda': torch sees no CUDA GPU") and "--device cpu" in err
    assert len(err.splitlines()) == 1


def _sharded(prefix):
    # Under torchrun-like ranks the prompts are split over ranks and rank 0 writes.
    return precompute_prompt_embeddings(prefix, progress=False)


def test_embeddings_sharded_over_ranks_equal_one_process(tmp_path, dataset):
    import shutil

    from tests.multiprocess import run_ranks

    precompute_prompt_embeddings(dataset, progress=False)
    single, _ = load_prompt_embeddings(dataset)
    copy = tmp_path / "hh"
    for name in os.listdir(os.path.dirname(dataset)):
        if name.startswith("hh.") and not name.startswith("hh.emb"):
            shutil.copy(os.path.join(os.path.dirname(dataset), name), tmp_path / name)
    manifests = run_ranks(_sharded, 2, str(copy), timeout=300)
    assert manifests[1] == {} and manifests[0]["num_prompts"] == len(single)
    sharded, _ = load_prompt_embeddings(str(copy))
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6)


def test_a_device_torch_does_not_know_is_one_line(dataset, capsys):
    # Issue 31 item 8: --device tpu ended in torch's raw RuntimeError.
    from tests.workspace import load_script

    tool = load_script("tools/precompute_prompt_embeddings.py", "precompute_prompt_embeddings_tool")
    assert tool.main(["--data-prefix", dataset, "--device", "tpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: device 'tpu' is not a torch device: use cpu, cuda or cuda:N"
