"""``python -m megatron_rpo.evaluate`` as users run it: a local model and the same model behind a
real OpenAI-compatible server give the same table; a run killed mid-judging resumes without asking
again; TL;DR data preprocesses, trains with its recipe's loss and is judged with the summarization
prompt; AlpacaEval answers come out in alpaca_eval's format."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_rpo.evaluate.__main__ import main
from tests.openai_server import OpenAIServer
from tests.workspace import HH_SLICE, REPO, RECIPE, launch_env, tiny_causal_lm, tiny_reward_model

COMMON = ["--samples", "10", "--max-prompt-length", "48", "--max-length", "72", "--max-new-tokens", "12",
          "--no-progress"]


@pytest.fixture(scope="module")
def models(sp_tokenizer, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval_models")
    return {"policy": tiny_causal_lm(root / "policy", sp_tokenizer), "rm": tiny_reward_model(root / "rm")}


def _command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_rpo.evaluate", *args], cwd=REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=600)


def _rows(output) -> list[dict]:
    with open(os.path.join(output, "results.json")) as f:
        return json.load(f)["rows"]


def test_a_local_model_and_the_same_model_served_give_the_same_table(models, tmp_path):
    local = _command("--data", HH_SLICE, "--format", "hh", "--model", f"tiny={models['policy']}", "--batch-size", "1",
                     "--judge", "reward-model", "--judge-path", models["rm"], "--output", str(tmp_path / "local"),
                     *COMMON)
    assert local.returncode == 0, local.stderr[-3000:]
    assert "| tiny | reference |" in local.stdout and "10 held-out prompts" in local.stdout
    with OpenAIServer({"tiny": models["policy"]}) as server:
        served = _command("--data", HH_SLICE, "--format", "hh", "--endpoint-model", f"tiny={server.url}@tiny",
                          "--tokenizer", models["policy"], "--judge", "reward-model", "--judge-path", models["rm"],
                          "--output", str(tmp_path / "served"), *COMMON)
    assert served.returncode == 0, served.stderr[-3000:]
    assert _rows(tmp_path / "local") == _rows(tmp_path / "served")
    assert local.stdout.splitlines()[-3:] == served.stdout.splitlines()[-3:]  # the table itself
    assert f"tiny at {server.url}: 11 calls, 0 retried" in served.stderr  # /models, then 10 prompts


def test_a_wrong_endpoint_or_model_is_one_line_before_any_work(models, tmp_path):
    with OpenAIServer({"tiny": models["policy"]}) as server:
        wrong = _command("--data", HH_SLICE, "--endpoint-model", f"tiny={server.url}@tyni", "--tokenizer",
                         models["policy"], "--judge", "reward-model", "--judge-path", models["rm"], "--output",
                         str(tmp_path / "out"), *COMMON)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert wrong.stderr.strip().splitlines()[-1] == (f"error: the endpoint {server.url} does not serve the model "
                                                     "'tyni'; it serves: tiny, judge")
    assert not os.path.exists(tmp_path / "out" / "generations.jsonl")


def test_a_killed_run_resumes_without_asking_again(models, tmp_path):
    args = ["--data", HH_SLICE, "--format", "hh", "--model", f"tiny={models['policy']}", "--judge", "llm",
            "--judge-model", "judge", "--concurrency", "1", "--output", str(tmp_path / "out"), *COMMON]
    # The server holds the judge after 3 items (both orders each): the kill lands there, every time.
    with OpenAIServer(hold_judge_after=6) as server:
        job = subprocess.Popen([sys.executable, "-m", "megatron_rpo.evaluate", "--judge-url", server.url, *args],
                               cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
        judgements = tmp_path / "out" / "judgements.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.poll() is None and server._judged <= 6:
            time.sleep(0.1)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
        kept = {json.loads(line)["item"] for line in judgements.read_text().splitlines() if line.endswith("}")}
        assert len(kept) == 3, job.stdout.read().decode()[-3000:]
        asked_before = len(server.log)
        server.release()
        assert main(["--judge-url", server.url, *args]) == 0
        again = server.log[asked_before:]
    # Both orders of every item not kept, nothing for the kept ones.
    assert len(again) == 2 * (10 - len(kept))
    records = [json.loads(line) for line in judgements.read_text().splitlines()]
    assert len(records) == len({r["item"] for r in records}) == 10


def _tldr_rows(count: int) -> list[dict]:
    """TL;DR comparisons in the format of openai/summarize_from_feedback, made up for the test."""
    rows = []
    pets = ["cat", "dog", "parrot", "hamster", "rabbit", "turtle"]
    for k in range(count):
        pet = pets[k % len(pets)]
        post = (f"My {pet} keeps waking me up at night number {k}. I tried moving its bed and feeding it later, "
                f"but nothing works and I am exhausted at work.")
        good, bad = f"my {pet} wakes me every night and nothing helps", f"{pet} stuff"
        rows.append({"info": {"id": f"t{k}", "post": post, "title": f"{pet} problem {k}", "subreddit": "pets"},
                     "summaries": [{"text": good}, {"text": bad}] if k % 2 == 0 else [{"text": bad}, {"text": good}],
                     "choice": 0 if k % 2 == 0 else 1, "worker": "w", "batch": "b", "split": "train"})
    return rows


def test_tldr_preprocesses_trains_with_its_recipe_and_is_judged_with_the_summarization_prompt(
        workspace, sp_tokenizer, tmp_path):
    from megatron_rpo.config import load_config
    from megatron_rpo.data.embeddings import precompute_prompt_embeddings
    from megatron_rpo.data.preprocess import preprocess

    rows = _tldr_rows(48)
    for split, part in (("train", rows[:40]), ("valid", rows[40:])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        result = preprocess([str(tmp_path / f"{split}.jsonl")], None, sp_tokenizer, str(tmp_path / split),
                            max_prompt_length=96, max_length=160, progress=False)
        assert result.manifest["format"] == "tldr" and not result.manifest["skipped"]
        precompute_prompt_embeddings(str(tmp_path / split), progress=False)
    # The recipe's loss and optimizer on the tiny model, 2 steps, exported.
    recipe = load_config(os.path.join(REPO, "configs", "mistral7b_tldr_rpo.yaml"))
    loss = [f"loss.{k}={v}" for k, v in vars(recipe.loss).items() if k in ("loss_type", "beta", "weighting", "tau")]
    save = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "megatron_rpo.train", "--config", RECIPE,
                          f"model.vocab_size={workspace['vocab']}", f"train.load={workspace['root'] / 'ckpt'}",
                          f"data.train_data_prefix={tmp_path / 'train'}",
                          f"data.valid_data_prefix={tmp_path / 'valid'}",
                          f"train.save={save}", "train.train_iters=2", "train.eval_iters=1", "loss.reference=online",
                          f"optimizer.optimizer={recipe.optimizer.optimizer}", *loss],
                         cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    with OpenAIServer() as server:
        assert main(["--data", str(tmp_path / "valid.jsonl"), "--model", f"rpo={save / 'export'}",
                     "--tokenizer", sp_tokenizer, "--judge", "llm",
                     "--judge-url", server.url, "--judge-model", "judge", "--samples", "0", "--max-new-tokens", "8",
                     "--output", str(tmp_path / "eval"), "--no-progress"]) == 0
        asked = [entry["request"]["messages"] for entry in server.log if entry["route"] == "/v1/chat/completions"]
    assert len(asked) == 2 * 8  # every held-out comparison, both orders
    first, second = asked[0]
    assert first["content"].startswith("Here is a forum post presented by <|user|> for summarization by <|assistant|> "
                                       ".\n\nSUBREDDIT: r/pets\n\nTITLE: ")
    assert "Summary 1: " in second["content"] and second["content"].endswith("A good summary is both precise and "
                                                                             "concise. Pick one.")
    assert (tmp_path / "eval" / "exports" / "rpo" / "config.json").exists()  # the checkpoint exported once
    assert len(_rows(tmp_path / "eval")) == 1


def test_alpaca_eval_answers_come_out_in_its_format(models, tmp_path):
    prompts = tmp_path / "alpaca_eval.json"
    prompts.write_text(json.dumps([{"instruction": "Name a fruit.", "dataset": "helpful_base"},
                                   {"instruction": "Say hello.", "dataset": "oasst"}]))
    out = tmp_path / "model_outputs.json"
    result = _command("--data", HH_SLICE, "--model", f"tiny={models['policy']}", "--judge", "reward-model",
                      "--judge-path", models["rm"], "--output", str(tmp_path / "eval"), "--alpaca-eval-prompts",
                      str(prompts), "--alpaca-eval-outputs", str(out), *COMMON)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(out.read_text())
    assert [(a["instruction"], a["dataset"], a["generator"]) for a in answers] == [
        ("Name a fruit.", "helpful_base", "tiny"), ("Say hello.", "oasst", "tiny")]
    assert all(isinstance(a["output"], str) for a in answers)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "ok"}, {"prompt": "no instruction"}]))
    refused = _command("--data", HH_SLICE, "--model", f"tiny={models['policy']}", "--judge", "reward-model",
                       "--judge-path", models["rm"], "--output", str(tmp_path / "eval"), "--alpaca-eval-prompts",
                       str(bad), "--alpaca-eval-outputs", str(tmp_path / "x.json"), *COMMON)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == f"error: {bad}: row 1: field 'instruction' is missing or empty"
