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
    from tests.workspace import load_script

    tool = load_script("tools/preprocess_preference_data.py", "preprocess_tool")
    prefix = str(tmp_path / "t")
    assert tool.main(["--input", hh_slice, "--format", "hh", "--tokenizer", sp_tokenizer, "--output-prefix", prefix,
                      "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "480 sequences (240 pairs" in out and "3 skipped" in out and ":241: rejected:" in out
    assert tool.main(["--input", hh_slice, "--format", "hh", "--tokenizer", sp_tokenizer, "--output-prefix",
                      str(tmp_path / "s"), "--strict", "--no-progress"]) == 2
    assert "hh_harmless_slice.jsonl:241: field 'rejected'" in capsys.readouterr().err


# -- inputs that are not clean UTF-8 JSON lines, outputs that cannot be written (issue 13) -----------
def _pairs(n=6, identical=()):
    rows = [{"prompt": f"question {i}?", "chosen": f"a good answer {i}", "rejected": f"a bad answer {i}"}
            for i in range(n)]
    for i in identical:
        rows[i]["rejected"] = rows[i]["chosen"]
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_an_undecodable_line_is_skipped_and_listed(tmp_path, sp_tokenizer):
    src = tmp_path / "latin1.jsonl"
    lines = _pairs().encode().splitlines(keepends=True)
    lines[2] = '{"prompt": "caf\u00e9?", "chosen": "oui", "rejected": "non"}\n'.encode("latin-1")
    src.write_bytes(b"".join(lines))
    m = preprocess([str(src)], "pairs", sp_tokenizer, str(tmp_path / "out"), progress=False).manifest
    assert m["num_pairs"] == 5
    assert m["skipped"] == [{"file": str(src), "line": 3, "field": "<text>",
                             "reason": "not valid UTF-8: byte 0xe9 at column 16"}]


@pytest.mark.parametrize("name,content,message", [
    ("utf16.jsonl", _pairs().encode("utf-16"), "looks like UTF-16 text"),
    ("hidden_gzip.jsonl", gzip.compress(_pairs().encode()), "looks like gzip-compressed data, but its name does not"),
    ("binary.jsonl", b"\x00\x01\x02" * 100, "looks like a binary file"),
    ("not_gzip.jsonl.gz", _pairs().encode(), "ends in .gz but the file is not gzip-compressed"),
    ("truncated.jsonl.gz", gzip.compress(_pairs(200).encode())[:400], "gzip data is truncated or corrupt after line"),
])
def test_a_file_that_is_not_utf8_json_lines_is_one_clear_error(tmp_path, sp_tokenizer, name, content, message):
    src = tmp_path / name
    src.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(src)) + ".*" + re.escape(message)):
        preprocess([str(src)], "pairs", sp_tokenizer, str(tmp_path / "out"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing written


def _unwritable_dir(tmp_path):
    if os.geteuid() != 0:
        folder = tmp_path / "readonly"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    folder = "/sys/kernel"  # a read-only file system for root too
    try:
        open(os.path.join(folder, "megatron_rpo_probe"), "wb").close()
    except OSError:
        return folder
    pytest.skip("no unwritable folder to test with")


def test_outputs_that_cannot_be_written_are_one_line_errors(tmp_path, sp_tokenizer):
    src = tmp_path / "pairs.jsonl"
    src.write_text(_pairs())
    folder = _unwritable_dir(tmp_path)
    with pytest.raises(ValueError, match=rf"cannot write {re.escape(str(folder))}/out/train\.bin"):
        preprocess([str(src)], "pairs", sp_tokenizer, os.path.join(str(folder), "out", "train"), progress=False)
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=r"cannot write .*afile/train\.bin: .*afile is a file, not a directory"):
        preprocess([str(src)], "pairs", sp_tokenizer, str(tmp_path / "afile" / "train"), progress=False)
    with pytest.raises(ValueError, match=r"ends in a path separator; it names files, e\.g\. '.*out/train'"):
        preprocess([str(src)], "pairs", sp_tokenizer, str(tmp_path / "out") + "/", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=rf"input {re.escape(str(tmp_path / 'empty'))} is a folder but not a dataset"):
        preprocess([str(tmp_path / "empty")], "pairs", sp_tokenizer, str(tmp_path / "x"), progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("x.*"))
    with pytest.raises(ValueError, match=r"input file .*missing\.jsonl does not exist"):
        preprocess([str(tmp_path / "missing.jsonl")], "pairs", sp_tokenizer, str(tmp_path / "x"), progress=False)


def test_identical_pairs_are_skipped_unless_kept(tmp_path, sp_tokenizer):
    src = tmp_path / "pairs.jsonl"
    src.write_text(_pairs(identical=(1, 4)))
    m = preprocess([str(src)], "pairs", sp_tokenizer, str(tmp_path / "a"), progress=False).manifest
    assert m["num_pairs"] == 4 and [(s["line"], s["field"]) for s in m["skipped"]] == [(2, "rejected"),
                                                                                      (5, "rejected")]
    assert all("identical to chosen" in s["reason"] for s in m["skipped"])
    kept = preprocess([str(src)], "pairs", sp_tokenizer, str(tmp_path / "b"), keep_identical_pairs=True,
                      progress=False).manifest
    assert kept["num_pairs"] == 6 and kept["keep_identical_pairs"]


def test_unpaired_data_with_an_empty_side_is_refused(tmp_path, sp_tokenizer):
    src = tmp_path / "unpaired.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"q{i}?", "completion": f"a{i}", "label": True}) + "\n"
                           for i in range(5)))
    with pytest.raises(ValueError, match="needs both chosen .* and rejected .* found 5 chosen and 0 rejected"):
        preprocess([str(src)], "unpaired", sp_tokenizer, str(tmp_path / "out"), progress=False)
    assert not list(tmp_path.glob("out*"))


def test_malformed_json_is_described_once(tmp_path, sp_tokenizer):
    src = tmp_path / "pairs.jsonl"
    src.write_text(_pairs() + '{"prompt": "unterminated\n')
    m = preprocess([str(src)], "pairs", sp_tokenizer, str(tmp_path / "out"), progress=False).manifest
    (reason,) = [s["reason"] for s in m["skipped"]]
    assert reason == "malformed JSON at column 12: Unterminated string starting" and "at at" not in reason


def test_sigterm_and_kill_leave_no_staged_files(tmp_path, sp_tokenizer):
    import signal
    import subprocess
    import sys
    import time

    from tests.workspace import REPO

    src = tmp_path / "big.jsonl"
    src.write_text(_pairs(30000))
    prefix = tmp_path / "out"
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_preference_data.py"), "--input", str(src),
           "--format", "pairs", "--tokenizer", sp_tokenizer, "--output-prefix", str(prefix), "--no-progress"]

    def staged():
        return sorted(p.name for p in tmp_path.glob("out.*.tmp-*"))

    def start_and_wait_for_staging():
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not staged():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        return proc

    proc = start_and_wait_for_staging()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert staged() == [] and not list(tmp_path.glob("out.bin"))

    proc = start_and_wait_for_staging()
    proc.kill()  # no chance to clean up
    proc.wait()
    assert staged()
    # The next run on that prefix removes what the killed one left, and finishes.
    small = tmp_path / "small.jsonl"
    small.write_text(_pairs())
    preprocess([str(small)], "pairs", sp_tokenizer, str(prefix), progress=False)
    assert staged() == [] and (tmp_path / "out.bin").exists()


def _hf_tokenizer_with_bos_template(folder, hh_slice) -> str:
    """A byte-level BPE tokenizer folder whose chat template starts with {{ bos_token }}, as Llama-3's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([r["chosen"] for r in _rows(hh_slice)],
                           trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}[assistant] {% endif %}")
    fast.save_pretrained(str(folder))
    return str(folder)


def test_exactly_one_bos_whatever_the_chat_template_does(tmp_path, hh_slice):
    tokenizer = _hf_tokenizer_with_bos_template(tmp_path / "tok", hh_slice)
    bos = load_tokenizer(tokenizer).bos_id
    src = tmp_path / "pairs.jsonl"
    src.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi there"}],
                               "chosen": [{"role": "assistant", "content": "hello"}],
                               "rejected": [{"role": "assistant", "content": "go away"}]}) + "\n"
                   + json.dumps({"prompt": "plain question?", "chosen": "yes", "rejected": "no"}) + "\n")
    preprocess([str(src)], "pairs", tokenizer, str(tmp_path / "out"), progress=False)
    tokens, meta = _read(str(tmp_path / "out"))
    for k in range(4):  # message rows (the template emits a bos) and string rows alike
        ids = tokens[k].tolist()
        assert ids[0] == bos and ids.count(bos) == 1, (k, ids[:6])


def test_message_lists_say_how_they_were_rendered(tmp_path, sp_tokenizer, capsys):
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi there"}],
                               "chosen": [{"role": "assistant", "content": "hello"}],
                               "rejected": [{"role": "assistant", "content": "go away"}]}) + "\n")
    # A bare sentencepiece model has no chat template: HH style, said on the console and in the manifest.
    m = preprocess([str(src)], "pairs", sp_tokenizer, str(tmp_path / "hh"), progress=False).manifest
    assert m["chat_rendering"] == "hh" and m["chat_template_file"] is None
    assert "has no chat template, so message lists are rendered HH style" in capsys.readouterr().err
    tok = load_tokenizer(sp_tokenizer)
    tokens, meta = _read(str(tmp_path / "hh"))
    assert tok.decode(tokens[0].tolist()[1:int(meta["prompt_length"][0])]).endswith("Human: hi there\n\nAssistant:")

    template = tmp_path / "chat.jinja"
    template.write_text("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    m = preprocess([str(src)], "pairs", sp_tokenizer, str(tmp_path / "tpl"), chat_template=str(template),
                   progress=False).manifest
    assert m["chat_rendering"] == "template" and m["chat_template_file"] == str(template)
    assert "rendered HH style" not in capsys.readouterr().err
    tokens, meta = _read(str(tmp_path / "tpl"))
    ids = tokens[0].tolist()
    assert ids.count(tok.bos_id) == 1  # the template's {{ bos_token }} is not doubled
    assert tok.decode(ids[1:int(meta["prompt_length"][0])]) == "<|user|>hi there\n<|assistant|>"
    assert tok.decode(ids[int(meta["prompt_length"][0]):-1]) == "hello\n"
    # String rows need no rendering: the manifest says so.
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "q?", "chosen": "yes", "rejected": "no"}) + "\n")
    assert preprocess([str(plain)], "pairs", sp_tokenizer, str(tmp_path / "p"), progress=False).manifest[
        "chat_rendering"] is None
