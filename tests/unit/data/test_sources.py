"""Inputs beyond JSON lines: Parquet, save_to_disk folders, dataset folders and hub names (issue 14)."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from megatron_rpo.data.preprocess import preprocess
from tests.workspace import REPO


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def hh_as_datasets(tmp_path_factory, hh_slice):
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("hf")
    ds = datasets.Dataset.from_json(hh_slice)
    ds.to_parquet(str(root / "hh.parquet"))
    ds.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": ds.select(range(3)), "test": ds}).save_to_disk(str(root / "saved_dict"))
    repo = root / "hub_like"  # a dataset repository as the hub serves it: data files in a folder
    repo.mkdir()
    (repo / "test.jsonl").write_text(open(hh_slice).read())
    return root


def test_every_input_kind_gives_the_same_dataset(tmp_path, hh_slice, sp_tokenizer, hh_as_datasets):
    want = preprocess([hh_slice], "hh", sp_tokenizer, str(tmp_path / "jsonl"), progress=False).manifest
    root = hh_as_datasets
    kinds = [("parquet", root / "hh.parquet", None), ("saved", root / "saved", None),
             ("saved_dict", root / "saved_dict", "test"), ("hub", f"hf://{root / 'hub_like'}", "test")]
    for name, spec, split in kinds:
        got = preprocess([str(spec)], None, sp_tokenizer, str(tmp_path / name), progress=False, split=split).manifest
        assert got["format"] == "hh" and got["format_detected"], name
        assert _sha(tmp_path / f"{name}.bin") == _sha(tmp_path / "jsonl.bin"), name
        assert _sha(tmp_path / f"{name}.meta.npy") == _sha(tmp_path / "jsonl.meta.npy"), name
        # The same three rows are skipped, named by source and 0-based row index (JSON lines: 1-based lines).
        assert [s["line"] for s in got["skipped"]] == [s["line"] - 1 for s in want["skipped"]], name
        assert got["skipped"][0]["file"] == (f"{spec}[{split}]" if split else str(spec)).replace("hf://", "")
    hub = json.loads((tmp_path / "hub.manifest.json").read_text())["sources"][0]
    assert hub["kind"] == "hub" and hub["split"] == "test" and hub["num_rows"] == 243


def test_split_choice_and_format_detection_errors(tmp_path, sp_tokenizer, hh_as_datasets):
    with pytest.raises(ValueError, match=r"has the splits \['train', 'test'\]; choose one with --split"):
        preprocess([str(hh_as_datasets / "saved_dict")], None, sp_tokenizer, str(tmp_path / "a"), progress=False)
    with pytest.raises(ValueError, match=r"has no split 'valid'; it has \['train', 'test'\]"):
        preprocess([str(hh_as_datasets / "saved_dict")], None, sp_tokenizer, str(tmp_path / "a"), progress=False,
                   split="valid")
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"cannot tell the format from the columns \['answer', 'question'\]"):
        preprocess([str(odd)], None, sp_tokenizer, str(tmp_path / "b"), progress=False)
    assert not list(tmp_path.glob("a.*")) and not list(tmp_path.glob("b.*"))


def test_bad_rows_of_a_parquet_file_are_named_by_row_index(tmp_path, sp_tokenizer):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": f"q{i}?", "completion": f"answer {i}", "label": i % 2 == 0} for i in range(6)]
    rows[3]["completion"] = "   "
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "items.parquet"))
    m = preprocess([str(tmp_path / "items.parquet")], None, sp_tokenizer, str(tmp_path / "out"),
                   progress=False).manifest
    assert m["format"] == "unpaired" and m["num_sequences"] == 5
    assert m["skipped"] == [{"file": str(tmp_path / "items.parquet"), "line": 3, "field": "completion",
                             "reason": "empty"}]


def test_the_tool_says_which_format_it_detected(tmp_path, hh_slice, sp_tokenizer):
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_preference_data.py"), "--input",
                          hh_slice, "--tokenizer", sp_tokenizer, "--output-prefix", str(tmp_path / "hh"),
                          "--no-progress"], capture_output=True, text=True, check=True).stdout
    assert "format: hh (detected from the columns; --format to choose)" in out


def test_without_the_datasets_library_the_error_names_the_extra(tmp_path, monkeypatch, hh_as_datasets, sp_tokenizer):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ValueError, match=r"read with the datasets library: pip install 'megatron_rpo\[hf\]'"):
        preprocess([str(hh_as_datasets / "hh.parquet")], None, sp_tokenizer, str(tmp_path / "a"), progress=False)
