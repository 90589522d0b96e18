"""The evaluation (megatron_rpo/evaluate): win-rate arithmetic against an independent computation,
the judges' protocols and parsing, prompts rendered and cut as training cuts them, generation from a
local model and from a real OpenAI-compatible server (tests/openai_server.py) alike, faults retried
and counted, and nothing asked twice."""

import json
import math

import numpy as np
import pytest

from megatron_rpo.errors import InputError
from megatron_rpo.evaluate.judges import LLMJudge, Template, TEMPLATES, clean_response, load_template, parse_choice
from megatron_rpo.evaluate.winrate import tally
from tests.openai_server import OpenAIServer, first_letter_judge
from tests.workspace import HH_SLICE, tiny_causal_lm, tiny_reward_model


# -- arithmetic ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("outcomes", [
    ["win"] * 7 + ["tie"] * 2 + ["loss"] * 3 + ["unparseable"] * 2,
    ["win", "loss"],
    ["tie"] * 5,
    ["win"] * 3 + ["unparseable"],
])
def test_the_win_rate_counts_ties_half_and_leaves_unparseable_out(outcomes):
    t = tally(outcomes)
    scores = np.array([{"win": 1.0, "tie": 0.5, "loss": 0.0}[o] for o in outcomes if o != "unparseable"],
                      dtype=np.float64)
    assert (t.wins, t.ties, t.losses, t.unparseable) == tuple(outcomes.count(o) for o in
                                                               ("win", "tie", "loss", "unparseable"))
    assert t.win_rate == pytest.approx(scores.mean(), abs=1e-15)
    assert t.standard_error == pytest.approx(scores.std(ddof=1) / math.sqrt(len(scores)), abs=1e-15)


def test_a_tally_of_nothing_or_one_has_no_error_and_a_bad_outcome_is_refused():
    assert math.isnan(tally([]).win_rate) and math.isnan(tally(["win"]).standard_error)
    with pytest.raises(ValueError, match="an outcome is one of"):
        tally(["draw"])


# -- parsing and protocols -----------------------------------------------------------------------------
@pytest.mark.parametrize("answer, choice", [
    ("Response 1", "1"), ("response 2.", "2"), ("**Response 2** is more helpful", "2"), ("2", "2"), (" (1) ", "1"),
    ("Response 1 is better than Response 2", "1"),  # the first words name it
    ("I prefer Response 2; it is concise.", "2"),     # names exactly one
    ("Both Response 1 and Response 2 are fine", None), ("Neither.", None), ("", None), ("Response 3", None),
    ("12", None),
])
def test_a_verdict_is_parsed_strictly(answer, choice):
    assert parse_choice(answer) == choice


def test_a_summary_verdict_names_a_summary():
    assert parse_choice("Summary 2", "Summary") == "2" and parse_choice("Response 2", "Summary") is None


def test_the_paper_cuts_a_hanging_sentence_before_judging():
    assert clean_response("It is fine. And then") == "It is fine."
    assert clean_response("No end at all") == "No end at all"


class Scripted:
    """A judge backend that answers from a script, by which response it is shown first."""

    def __init__(self, answers):
        self.answers, self.asked = answers, []

    def __repr__(self):
        return "scripted"

    def chat(self, messages, *, max_tokens, temperature=0.0, seed=None):
        first = messages[-1]["content"].split("Response 1: ", 1)[1].split("\nEND OF RESPONSE 1", 1)[0]
        self.asked.append((messages, first))
        return self.answers[first]


class Item:
    def __init__(self, id, question="\n\nHuman: hi?\n\nAssistant:"):
        self.id, self.question = id, question


@pytest.mark.parametrize("when_first, when_second, outcome", [
    ("Response 1", "Response 2", "win"),    # the candidate both times
    ("Response 2", "Response 1", "loss"),   # the baseline both times
    ("Response 1", "Response 1", "tie"),    # the position both times: the orders split
    ("Response 2", "Response 2", "tie"),
    ("Response 1", "I cannot say", "unparseable"),
])
def test_both_orders_a_split_verdict_is_a_tie_and_an_unreadable_one_is_counted(when_first, when_second, outcome):
    backend = Scripted({"ours.": when_first, "theirs.": when_second})
    judgement = LLMJudge(backend, TEMPLATES["dialogue"]).judge(Item("a"), "ours.", "theirs.")
    assert judgement.outcome == outcome and judgement.orders == ["candidate", "baseline"]
    assert [first for _, first in backend.asked] == ["ours.", "theirs."]
    messages = backend.asked[0][0]
    # The paper's prompt: the conversation without its trailing turn marker, then the two responses.
    assert messages[0]["content"] == "Here is a conversation between <|user|> and <|assistant|>.\n\nHuman: hi?"
    assert messages[1]["content"].startswith("<|assistant|> can now choose from different responses.\n\n"
                                             "Response 1: ours.\nEND OF RESPONSE 1\n\nResponse 2: theirs.")
    assert messages[1]["content"].endswith("which response is more helpful, harmless, and concise? Pick one.")


def test_the_single_order_protocol_asks_once_in_an_order_drawn_from_the_seed():
    backend = Scripted({"ours.": "Response 1", "theirs.": "Response 1"})
    judge = LLMJudge(backend, TEMPLATES["dialogue"], protocol="single", seed=3)
    outcomes = [judge.judge(Item(str(k)), "ours.", "theirs.") for k in range(40)]
    assert len(backend.asked) == 40
    firsts = [o.orders[0] for o in outcomes]
    assert 5 < firsts.count("candidate") < 35  # both orders drawn
    assert all(o.outcome == ("win" if o.orders[0] == "candidate" else "loss") for o in outcomes)
    again = LLMJudge(Scripted({"ours.": "Response 1", "theirs.": "Response 1"}), TEMPLATES["dialogue"],
                     protocol="single", seed=3)
    assert [again.judge(Item(str(k)), "ours.", "theirs.").orders for k in range(40)] == [o.orders for o in outcomes]


def test_a_prompt_file_of_ones_own_needs_its_three_fields(tmp_path):
    good = tmp_path / "judge.txt"
    good.write_text("Which is better for {history}?\nResponse 1: {response_1}\nResponse 2: {response_2}\n")
    template = load_template(str(good))
    assert isinstance(template, Template) and template.render("h", "a", "b", "U", "A")[0]["content"].startswith(
        "Which is better for h?")
    bad = tmp_path / "bad.txt"
    bad.write_text("Which is better: {response_1} or {response_2}?")
    with pytest.raises(InputError, match=r"the prompt lacks \{history\}"):
        load_template(str(bad))
    with pytest.raises(InputError, match="neither dialogue nor summarization nor a readable file"):
        load_template(str(tmp_path / "missing.txt"))


# -- the store -----------------------------------------------------------------------------------------
def test_a_line_cut_short_by_a_kill_is_dropped_and_asked_again(tmp_path):
    from megatron_rpo.evaluate.generation import Store

    path = tmp_path / "generations.jsonl"
    store = Store(str(path))
    store.add("a", {"response": "one"})
    store.add("b", {"response": "two"})
    with open(path, "a") as f:
        f.write('{"key": "c", "respo')  # killed mid-write
    again = Store(str(path))
    assert "a" in again and "b" in again and "c" not in again and again.dropped == 1
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b"]


# -- TL;DR ---------------------------------------------------------------------------------------------
def _tldr_row(choice=1, **info):
    return {"info": {"post": "My cat ate my homework again.", "title": "Cat trouble", "subreddit": "cats", **info},
            "summaries": [{"text": "cat ate homework"}, {"text": " Cat eats homework again."}], "choice": choice}


def test_tldr_rows_become_the_usual_prompt_and_bad_ones_are_named(tmp_path):
    from megatron_rpo.data.formats import BadRow, detect_format, read_examples
    from megatron_rpo.data.sources import open_source

    path = tmp_path / "tldr.jsonl"
    rows = [_tldr_row(), _tldr_row(choice=2), {"info": {"title": "t", "subreddit": "s"}, "summaries": [],
                                                "choice": 0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = open_source(str(path))
    assert detect_format(source.columns) == "tldr"
    good, bad_choice, bad_post = list(read_examples([source], "tldr"))
    assert good.prompt == "SUBREDDIT: r/cats\n\nTITLE: Cat trouble\n\nPOST: My cat ate my homework again.\n\nTL;DR:"
    assert (good.chosen, good.rejected) == (" Cat eats homework again.", " cat ate homework")
    assert isinstance(bad_choice, BadRow) and str(bad_choice) == f"{path}:2: field 'choice': expected 0 or 1, got 2"
    assert isinstance(bad_post, BadRow) and str(bad_post) == f"{path}:3: field 'info.post': missing"


# -- prompts -------------------------------------------------------------------------------------------
def test_prompts_are_rendered_and_cut_as_preprocessing_cuts_them(sp_tokenizer, tmp_path):
    from megatron_rpo.data.dataset import PreferenceDataset
    from megatron_rpo.data.preprocess import preprocess
    from megatron_rpo.data.tokenizer import load_tokenizer
    from megatron_rpo.evaluate.items import load_items

    tok = load_tokenizer(sp_tokenizer)
    items, bad = load_items([HH_SLICE], "hh", tok, samples=None, max_prompt_length=48, max_length=96)
    prefix = str(tmp_path / "hh")
    preprocess([HH_SLICE], "hh", sp_tokenizer, prefix, max_prompt_length=48, max_length=96, progress=False)
    data = PreferenceDataset(prefix)
    trained = {}
    for k in range(0, len(data.meta), 2):  # each pair's chosen sequence: its prompt tokens
        tokens = data.tokens[k].tolist()
        trained[tuple(tokens[: int(data.meta[k]["prompt_length"])])] = k
    assert len(items) == len(trained) and len(bad) == len(data.manifest["skipped"])
    cut = 0
    for item in items:
        ids = [tok.bos_id] + tok.encode(item.prompt)
        cut += item.prompt_tokens == 48
        if item.prompt_tokens < 48:  # a cut prompt is decoded and encoded again, which may differ by a token
            assert tuple(ids) in trained, item.source
            assert len(ids) == item.prompt_tokens
    assert cut > 0  # some prompts were cut


def test_the_sample_is_the_same_for_a_seed_and_another_for_another(sp_tokenizer):
    from megatron_rpo.data.tokenizer import load_tokenizer
    from megatron_rpo.evaluate.items import load_items

    tok = load_tokenizer(sp_tokenizer)
    first = [i.id for i in load_items([HH_SLICE], "hh", tok, samples=16, seed=1)[0]]
    assert first == [i.id for i in load_items([HH_SLICE], "hh", tok, samples=16, seed=1)[0]]
    assert first != [i.id for i in load_items([HH_SLICE], "hh", tok, samples=16, seed=2)[0]]
    assert len(set(first)) == 16


# -- models and endpoints ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(sp_tokenizer, tmp_path_factory) -> str:
    return tiny_causal_lm(tmp_path_factory.mktemp("tiny_hf"), sp_tokenizer)


def test_an_endpoint_retries_every_kind_of_fault_and_counts_the_retries(tiny_model):
    from megatron_rpo.evaluate.endpoint import Endpoint

    with OpenAIServer({"tiny": tiny_model}, faults=["429", "500", "malformed", "slow", None, "500"],
                      slow_seconds=2.0) as server:
        endpoint = Endpoint(server.url, "tiny", timeout=0.5, retries=4, backoff=0.01)
        endpoint.check()  # /models answers: the first fault is spent on it and retried
        first = endpoint.complete("Hello there", max_tokens=5)
        second = endpoint.complete("Hello there", max_tokens=5)
    assert first == second and isinstance(first, str)
    assert endpoint.retries == 5 and server.faults_served == 5  # 429, 500, malformed, slow (a timeout), 500


def test_a_wrong_endpoint_is_one_clear_line(tiny_model):
    from megatron_rpo.evaluate.endpoint import Endpoint, EndpointError

    with OpenAIServer({"tiny": tiny_model}) as server:
        with pytest.raises(EndpointError, match=r"does not serve the model 'tyni'; it serves: tiny, judge$"):
            Endpoint(server.url, "tyni").check()
        with pytest.raises(EndpointError, match=r"is not an OpenAI-compatible API \(404 on /v2/completions\)"):
            Endpoint(server.url.replace("/v1", "/v2"), "tiny", retries=0).complete("x", max_tokens=1)
        url = server.url
    with pytest.raises(EndpointError, match=r"does not answer: APIConnectionError after 2 tries"):
        Endpoint(url, "tiny", retries=1, backoff=0.01, timeout=2).check()


def test_a_local_model_and_the_same_model_behind_a_server_give_the_same_table(tiny_model, sp_tokenizer, tmp_path):
    from megatron_rpo.data.tokenizer import load_tokenizer
    from megatron_rpo.evaluate.endpoint import Endpoint
    from megatron_rpo.evaluate.generation import EndpointGenerator, HFGenerator
    from megatron_rpo.evaluate.items import load_items
    from megatron_rpo.evaluate.run import evaluate

    tok = load_tokenizer(sp_tokenizer)
    items, _ = load_items([HH_SLICE], "hh", tok, samples=12, seed=0, max_prompt_length=48, max_length=72)
    options = dict(max_new_tokens=12, max_length=72)
    # Half the judge's calls fail for a while: the table is complete all the same.
    faults = ["500", None] * 6 + ["429", None] * 4
    with OpenAIServer({"tiny": tiny_model}, faults=faults) as server:
        judge_endpoint = Endpoint(server.url, "judge", backoff=0.01)
        judge = LLMJudge(judge_endpoint, TEMPLATES["dialogue"])
        local = evaluate(items, {"tiny": HFGenerator(tiny_model, batch_size=1, **options)}, judge,
                         str(tmp_path / "local"), judge_concurrency=4, progress=False)
        served = evaluate(items, {"tiny": EndpointGenerator(Endpoint(server.url, "tiny", backoff=0.01),
                                                            concurrency=3, **options)},
                          judge, str(tmp_path / "served"), judge_concurrency=4, progress=False)
        asked = len(server.log)
        again = evaluate(items, {"tiny": HFGenerator(tiny_model, batch_size=4, **options)}, judge,
                         str(tmp_path / "local"), progress=False)
        assert len(server.log) == asked  # everything was kept: nothing asked again
    assert [r.as_dict() for r in local] == [r.as_dict() for r in served] == [r.as_dict() for r in again]
    assert judge_endpoint.retries == server.faults_served == 10
    # The verdicts are the rule's, both orders: computed here from the kept responses.
    records = [json.loads(line) for line in (tmp_path / "local" / "judgements.jsonl").read_text().splitlines()]
    assert len(records) == 12
    for r in records:
        ours, theirs = clean_response(r["candidate_response"]), clean_response(r["baseline_response"])
        first, second = first_letter_judge(ours, theirs), first_letter_judge(theirs, ours)
        expected = ("tie" if first == second == "Response 1" or (first == "Response 2" and second == "Response 2")
                    else "win" if first == "Response 1" else "loss")
        assert r["outcome"] == expected and r["answers"] == [first, second]
    row = local[0].tally
    assert (row.wins, row.ties, row.losses) == tuple(sum(r["outcome"] == o for r in records)
                                                     for o in ("win", "tie", "loss"))
    table = (tmp_path / "local" / "results.md").read_text()
    assert f"| tiny | reference | {row.win_rate:.3f} ± {row.standard_error:.3f} | {row.wins} / {row.ties} / " \
           f"{row.losses} | 0 |" in table


def test_a_reward_model_judges_by_its_scores(tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from megatron_rpo.evaluate.judges import RewardModelJudge

    folder = tiny_reward_model(tmp_path / "rm")
    judge = RewardModelJudge(folder)
    item = Item("x")
    outcomes = set()
    model = LlamaForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for candidate, baseline in (("Sure, here it is.", "No."), ("No.", "Sure, here it is."), ("Same.", "Same.")):
        judgement = judge.judge(item, candidate, baseline)
        with torch.no_grad():
            scores = [model(**tokenizer(item.question, r, return_tensors="pt")).logits[0, 0].item()
                      for r in (candidate, baseline)]
        assert judgement.scores == pytest.approx(scores, abs=1e-6)
        want = "win" if scores[0] > scores[1] else "loss" if scores[0] < scores[1] else "tie"
        assert judgement.outcome == want
        outcomes.add(want)
    assert outcomes == {"win", "loss", "tie"}
