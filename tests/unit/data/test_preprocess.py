import gzip
import json
import os
import re

import numpy as np
import pytest

from megatron_rpo.data.files import read_manifest
from megatron_rpo.data.preprocess import MANIFEST_KIND, preprocess
from megatron_rpo.data.tokenizer import load_tokenizer


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix), np.load(f"{prefix}.meta.npy")


def test_hh_round_trip_on_real_data(tmp_path, hh_slice, sp_tokenizer):
    prefix = str(tmp_path / "hh")
    result = preprocess([hh_slice], "hh", sp_tokenizer, prefix, max_prompt_length=128, max_length=256, progress=False)
    m = read_manifest(prefix, MANIFEST_KIND)
    assert m == result.manifest
    # The three pairs whose prompts differ are skipped and named; the rest are kept.
    assert m["num_rows"] == 243 and m["num_pairs"] == 240 and m["num_sequences"] == 480
    assert [(s["line"], s["field"]) for s in m["skipped"]] == [(241, "rejected"), (242, "rejected"), (243, "rejected")]
    assert all("differs from chosen's" in s["reason"] for s in m["skipped"])
    assert m["tokenizer"]["sha256"] and m["sources"][0]["sha256"]

    tokens, meta = _read(prefix)
    tok = load_tokenizer(sp_tokenizer)
    rows = _rows(hh_slice)
    assert len(tokens) == 480
    assert meta["is_chosen"].tolist() == [True, False] * 240
    assert meta["pair_id"].tolist() == [i // 2 for i in range(480)]
    assert (meta["prompt_id"][0::2] == meta["prompt_id"][1::2]).all()
    for k in (0, 1, 17, 300):
        ids, plen = tokens[k].tolist(), int(meta["prompt_length"][k])
        assert len(ids) <= 256 and plen <= 128
        assert ids[0] == tok.bos_id and 0 < plen < len(ids)
        row = rows[int(meta["pair_id"][k])]
        dialogue = row["chosen"] if meta["is_chosen"][k] else row["rejected"]
        cut = dialogue.rfind("\n\nAssistant:") + len("\n\nAssistant:")
        # The stored response decodes back to the dialogue's last turn (unless it was cut).
        response = ids[plen:]
        if response[-1] == tok.eos_id:
            assert tok.decode(response[:-1]).strip() == dialogue[cut:].strip()
        # The prompt keeps its end: the turn being answered.
        assert tok.decode(ids[1:plen]).endswith("Assistant:")
    with open(f"{prefix}.prompts.jsonl") as f:
        prompts = [json.loads(line) for line in f]
    assert len(prompts) == m["num_prompts"] == len(set(meta["prompt_id"].tolist()))


def test_truncation_keeps_prompt_end_and_cuts_response(tmp_path, sp_tokenizer):
    src = tmp_path / "long.jsonl"
    src.write_text(json.dumps({"prompt": "word " * 400 + "final question?", "chosen": "yes " * 300,
                               "rejected": "no"}) + "\n")
    prefix = str(tmp_path / "out")
    m = preprocess([str(src)], "pairs", sp_tokenizer, prefix, max_prompt_length=32, max_length=64,
                   progress=False).manifest
    tokens, meta = _read(prefix)
    tok = load_tokenizer(sp_tokenizer)
    assert meta["prompt_length"].tolist() == [32, 32]
    assert len(tokens[0]) == 64 and tokens[0][-1] != tok.eos_id  # chosen cut to fit
    assert tokens[1][-1] == tok.eos_id and len(tokens[1]) < 64  # rejected fits whole
    assert tok.decode(tokens[0][1:32].tolist()).endswith("final question?")
    assert (m["truncated_prompts"], m["truncated_responses"]) == (1, 1)


BAD_ROWS = [
    ('{"prompt": "p", "chosen": "c", "rejected": "r"', "<json>", "malformed JSON"),
    ('["not", "an", "object"]', "<json>", "expected an object"),
    ('{"chosen": "c", "rejected": "r"}', "prompt", "missing"),
    ('{"prompt": "  ", "chosen": "c", "rejected": "r"}', "prompt", "empty"),
    ('{"prompt": "p", "chosen": 3, "rejected": "r"}', "chosen", "expected a string or a message list"),
    ('{"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "r"}', "chosen[0]", "a message must be"),
]


def _write(tmp_path, lines, name="in.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("line,field,reason", BAD_ROWS)
def test_bad_rows_are_skipped_and_listed_or_fatal_with_strict(tmp_path, sp_tokenizer, line, field, reason):
    good = json.dumps({"prompt": "hello", "chosen": "good answer", "rejected": "bad answer"})
    src = _write(tmp_path, [good, line, good])
    prefix = str(tmp_path / "out")
    m = preprocess([src], "pairs", sp_tokenizer, prefix, progress=False).manifest
    assert m["num_pairs"] == 2
    (skipped,) = m["skipped"]
    assert (skipped["file"], skipped["line"], skipped["field"]) == (src, 2, field)
    assert reason in skipped["reason"]

    strict_prefix = str(tmp_path / "strict")
    with pytest.raises(ValueError, match=re.escape(f"{os.path.basename(src)}:2: field '{field}'")):
        preprocess([src], "pairs", sp_tokenizer, strict_prefix, strict=True, progress=False)
    assert not list(tmp_path.glob("strict*")), "a failed run must leave nothing behind"


def test_unpaired_format_and_label_errors(tmp_path, sp_tokenizer):
    src = _write(tmp_path, [
        json.dumps({"prompt": "q1", "completion": "a1", "label": True}),
        json.dumps({"prompt": "q1", "completion": "a2", "label": False}),
        json.dumps({"prompt": "q2", "completion": "a3", "label": "yes"}),
        json.dumps({"prompt": "q3", "completion": "a4"}),
    ])
    prefix = str(tmp_path / "u")
    m = preprocess([src], "unpaired", sp_tokenizer, prefix, progress=False).manifest
    assert (m["paired"], m["num_sequences"], m["num_prompts"]) == (False, 2, 1)
    assert [(s["line"], s["field"]) for s in m["skipped"]] == [(3, "label"), (4, "label")]
    _, meta = _read(prefix)
    assert meta["is_chosen"].tolist() == [True, False] and meta["pair_id"].tolist() == [-1, -1]


def test_gzip_input_and_hh_without_assistant_turn(tmp_path, sp_tokenizer):
    path = tmp_path / "in.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}) + "\n")
        f.write(json.dumps({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: go"}) + "\n")
    m = preprocess([str(path)], "hh", sp_tokenizer, str(tmp_path / "o"), progress=False).manifest
    assert m["num_pairs"] == 1
    assert m["skipped"][0]["field"] == "chosen" and "no '\\n\\nAssistant:' turn" in m["skipped"][0]["reason"]


def test_message_lists_render_hh_style_without_chat_template(tmp_path, sp_tokenizer):
    src = _write(tmp_path, [json.dumps({
        "prompt": [{"role": "user", "content": "What is 2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    })])
    prefix = str(tmp_path / "m")
    preprocess([src], "pairs", sp_tokenizer, prefix, progress=False)
    with open(f"{prefix}.prompts.jsonl") as f:
        assert json.loads(f.readline()) == "\n\nHuman: What is 2+2?\n\nAssistant:"
    tokens, meta = _read(prefix)
    tok = load_tokenizer(sp_tokenizer)
    assert tok.decode(tokens[0][int(meta["prompt_length"][0]):-1].tolist()).strip() == "4"


def test_failed_run_keeps_the_previous_dataset(tmp_path, sp_tokenizer):
    good = _write(tmp_path, [json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})], "good.jsonl")
    prefix = str(tmp_path / "ds")
    preprocess([good], "pairs", sp_tokenizer, prefix, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("ds*")}
    bad = _write(tmp_path, ["{broken"], "bad.jsonl")
    with pytest.raises(ValueError, match="bad.jsonl:1: field '<json>'"):
        preprocess([bad], "pairs", sp_tokenizer, prefix, strict=True, progress=False)
    with pytest.raises(ValueError, match="no usable row"):
        preprocess([bad], "pairs", sp_tokenizer, prefix, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("ds*")} == before


def test_manifest_detects_files_from_another_run(tmp_path, sp_tokenizer):
    a = _write(tmp_path, [json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})], "a.jsonl")
    b = _write(tmp_path, [json.dumps({"prompt": "q", "chosen": "longer answer", "rejected": "r"})], "b.jsonl")
    preprocess([a], "pairs", sp_tokenizer, str(tmp_path / "x"), progress=False)
    preprocess([b], "pairs", sp_tokenizer, str(tmp_path / "y"), progress=False)
    os.replace(tmp_path / "y.bin", tmp_path / "x.bin")
    with pytest.raises(ValueError, match=r"x.bin does not match .*x.manifest.json"):
        read_manifest(str(tmp_path / "x"), MANIFEST_KIND)


def test_bad_options(tmp_path, sp_tokenizer):
    src = _write(tmp_path, [json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})])
    with pytest.raises(ValueError, match="max_prompt_length=512, max_length=512"):
        preprocess([src], "pairs", sp_tokenizer, str(tmp_path / "o"), max_prompt_length=512, progress=False)
    with pytest.raises(ValueError, match="input file .*missing.jsonl does not exist"):
        preprocess([str(tmp_path / "missing.jsonl")], "pairs", sp_tokenizer, str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match="tokenizer .*nope.model' does not exist"):
        preprocess([src], "pairs", str(tmp_path / "nope.model"), str(tmp_path / "o"), progress=False)


def test_tool_reports_and_fails_cleanly(tmp_path, hh_slice, sp_tokenizer, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "preprocess_tool", os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools",
                                        "preprocess_preference_data.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    prefix = str(tmp_path / "t")
    assert tool.main(["--input", hh_slice, "--format", "hh", "--tokenizer", sp_tokenizer, "--output-prefix", prefix,
                      "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "480 sequences (240 pairs" in out and "3 skipped" in out and ":241: rejected:" in out
    assert tool.main(["--input", hh_slice, "--format", "hh", "--tokenizer", sp_tokenizer, "--output-prefix",
                      str(tmp_path / "s"), "--strict", "--no-progress"]) == 1
    assert "hh_harmless_slice.jsonl:241: field 'rejected'" in capsys.readouterr().err
