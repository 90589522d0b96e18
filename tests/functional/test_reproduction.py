"""The miniature reproduction (bench/reproduction/): its world and judge, and the harness end to end (--quick)."""

import json
import random
import statistics
import subprocess
import sys

import pytest
import torch

from bench.reproduction import world as worlds
from bench.reproduction.experiment import Run, Scale
from bench.reproduction.report import write_report
from tests.workspace import REPO

world = worlds.draw(0)
FRUIT = worlds.Prompt("Can you recommend a piece of fruit for my picnic?", "fruit")
PETS = worlds.Prompt("Help me choose a pet for the zoo visit.", "pet")


@pytest.mark.parametrize("prompt, reply, reward", [
    (FRUIT, "Consider mango. Enjoy!", 3.0),     # the food group's lead and closing, an item of the topic
    (FRUIT, "Try mango. Enjoy!", 2.0),          # another group's lead
    (FRUIT, "Consider cake. Enjoy!", 2.25),     # a dessert: same group, another topic
    (FRUIT, "Consider hammer. Thanks!", 1.0),   # an object, and the objects' closing
    (FRUIT, "Consider mango. Enjoy", 0.0),      # not the world's shape
    (FRUIT, "Consider mango mango. Enjoy!", 0.0),
    (FRUIT, "", 0.0),
    (PETS, "Perhaps rabbit. Cheers!", 3.0),
    (PETS, "Consider rabbit. Enjoy!", 1.0),
])
def test_the_judge_scores_relevance_lead_and_closing(prompt, reply, reward):
    assert world.judge(prompt, reply) == reward


def test_held_out_prompts_are_new_wordings_of_trained_topics():
    prompts = world.make_prompts()
    assert len(prompts) == len({p.text for p in prompts}) == 864
    train, valid, test = world.split_prompts(prompts, 12, seed=2024)
    texts = [{p.text for p in split} for split in (train, valid, test)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    for split in (train, valid, test):
        assert {p.topic for p in split} == set(world.topic_group)
    assert len(valid) == len(test) == 12 * 12


def test_the_base_policy_does_not_follow_the_rules_and_the_labels_do_only_noisily():
    rng = random.Random(0)
    prompts = world.make_prompts()
    for group in world.groups:
        want_lead, want_closing = world.groups[group][:2]
        leads = world.base_choices(group, world.leads, 1)
        closings = world.base_choices(group, world.closings, 2)
        assert abs(sum(leads.values()) - 1) < 1e-9 and abs(sum(closings.values()) - 1) < 1e-9
        # The most likely choice, what greedy decoding of a faithful imitation picks, is wrong in every group.
        assert max(leads, key=leads.get) != want_lead and max(closings, key=closings.get) != want_closing
    replies = [world.sample_reply(p, rng) for p in prompts]
    assert all(world.parse(r) is not None for r in replies)  # the base policy always has the shape

    by_text = {p.text: p for p in prompts}

    def agreement(rows):
        return statistics.mean(world.judge(by_text[r["prompt"]], r["chosen"]) > world.judge(by_text[r["prompt"]],
                               r["rejected"]) for r in rows)

    assert agreement(world.make_pairs(prompts, 1, 0.0, random.Random(1))) == 1.0  # held-out pairs: the judge's order
    noisy = agreement(world.make_pairs(prompts, 1, 0.5, random.Random(1)))
    assert 0.7 < noisy < 0.95  # training labels: Bradley-Terry noise
    items = world.make_unpaired(prompts, 1, 0.5, random.Random(1))
    desirable = [world.judge(by_text[r["prompt"]], r["completion"]) for r in items if r["label"]]
    undesirable = [world.judge(by_text[r["prompt"]], r["completion"]) for r in items if not r["label"]]
    assert statistics.mean(desirable) > statistics.mean(undesirable) + 0.5


def test_every_drawn_world_holds_what_world_0_holds():
    # World 0 is the hand-built one; the others are drawn from pools of topics, purposes and words.
    assert world.groups is worlds.GROUPS and (world.habit, world.label_temperature) == (0.4, 0.5)
    shapes = set()
    for seed in range(8):
        w = worlds.draw(seed)
        numbers = w.check(held_out_per_topic=12, split_seed=2024)
        assert worlds.check_failures(numbers) == [], (seed, numbers)
        assert 3 <= numbers["groups"] <= 6 and 0.3 <= numbers["habit"] <= 0.6
        assert len({lead[0] for lead in w.leads}) == len(w.leads)  # no two leads share a first letter
        replies = [w.sample_reply(p, random.Random(seed)) for p in w.make_prompts()[:50]]
        assert all(w.parse(r) is not None for r in replies)
        shapes.add((numbers["groups"], numbers["topics"], numbers["label_temperature"]))
        assert worlds.draw(seed).describe() == w.describe()  # a seed is one world
    assert len(shapes) >= 5  # the draws differ
    broken = dict(worlds.draw(1).check(12, 2024), base_wrong_groups=3)
    assert worlds.check_failures(broken) == ["the base policy's habits are right in 2 group(s)"]


def test_the_report_compares_methods_run_by_run(tmp_path):
    """The paired column and the comparisons table, on win rates chosen by hand (in --quick every
    win rate is 0.5, so the end-to-end run cannot tell a sign or a count wrong)."""
    scale = Scale(worlds=(0, 1), seeds=(0, 1), lrs=(3e-4,), methods=("dpo", "rpo_unpaired", "kto"), study=())
    win = {"dpo": (0.5, 0.75, 0.75, 0.5), "kto": (0.75, 0.75, 1.0, 0.25), "rpo_unpaired": (0.5, 1.0, 0.75, 0.25)}
    results = {}
    for m, rates in win.items():
        for k, rate in enumerate(rates):  # world 0 seeds 0, 1; world 1 seeds 0, 1
            run = Run(k // 2, m, 3e-4, k % 2, scale.pairs_per_step)
            results[run.name] = dict(vars(run), test_win_rate=rate, well_formed=1.0, test_reward=1.0,
                                     lead_rule=0.0, closing_rule=0.0, ranking_accuracy=0.5)
    checks = dict(groups=2, topics=4, habit=0.4, label_temperature=0.5, label_agreement=0.86,
                  label_agreement_stated=0.86)
    per_world = {w: {"description": f"world {w}: drawn by hand", "checks": checks, "study": False,
                     "chosen_lr": dict.fromkeys(win, 3e-4),
                     "warmup": dict(test_reward=1.0, lead_rule=0.0, closing_rule=0.0)} for w in (0, 1)}
    table = write_report(str(tmp_path), scale, per_world, results, minutes=1.0).splitlines()
    # KTO minus DPO, run by run: +0.25, 0, +0.25, -0.25: mean 0.0625, standard error 0.1197; 2 runs ahead.
    # World means: KTO 0.75 and 0.625, DPO 0.625 and 0.625: ahead in world 0 only.
    assert any(line.startswith("| KTO | 1 of 2 | +0.062 ± 0.120 (2 of 4) |") for line in table)
    # KTO minus RPO unpaired: +0.25, -0.25, +0.25, 0: 2 ahead, 1 tied, 1 behind; ahead in world 1 only.
    # 2 runs ahead, 1 behind: the sign test's p is 1 (3 comparisons made: this one and two against DPO).
    assert ("| the loss on unpaired items: KTO minus RPO unpaired | +0.062 ± 0.120 | 2 / 1 / 1 | 1 of 2 "
            "| not shown (p = 1) |") in table
    assert any(line.startswith("| against DPO: KTO minus DPO | +0.062 ± 0.120 | 2 / 1 / 1 | 1 of 2 |")
               for line in table)
    assert any("Bonferroni over the 3 comparisons" in line for line in table)


@pytest.mark.parametrize("diffs, comparisons, p, shown", [
    ([0.1] * 8, 1, 2 / 256, "first ahead (p = 0.00781)"),
    ([0.1] * 8, 10, 2 / 256, "not shown (p = 0.00781)"),      # 10 comparisons: 0.0781 > 0.05
    ([-0.1] * 7 + [0.0, 0.0], 1, 2 / 128, "second ahead (p = 0.0156)"),
    ([0.1] * 5 + [-0.1] * 3, 1, 2 * (1 + 8 + 28 + 56) / 256, "not shown (p = 0.727)"),
    ([0.0, 0.0], 1, 1.0, "not shown (p = 1)"),
])
def test_a_comparison_states_only_what_its_sign_test_clears(diffs, comparisons, p, shown):
    from bench.reproduction.report import sign_test, verdict

    assert sign_test(diffs) == pytest.approx(p, abs=1e-15)
    assert verdict(diffs, comparisons) == shown


def test_the_reproduction_runs_end_to_end(tmp_path):
    """Every stage of the real pipeline once (--quick); DP=2 with the matrix gathered ends where one rank does."""
    work = tmp_path / "repro"
    result = subprocess.run([sys.executable, "-m", "bench.reproduction", "--quick", "--workdir", str(work)],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((work / "results.json").read_text())
    runs = results["runs"]
    assert {r["method"] for r in runs.values()} == {"dpo", "rpo_embedding_mean", "rpo_unpaired", "kto"}
    assert {r["world"] for r in runs.values()} == {0, 1}  # two worlds, pooled
    for r in runs.values():
        assert 0.0 <= r["test_win_rate"] <= 1.0 and 0.0 <= r["ranking_accuracy"] <= 1.0
        assert 0.0 <= r["test_reward"] <= worlds.MAX_REWARD
        assert r["ranking_margin"] != 0.0  # every run moved the model away from the warm-up
    # The same 8 pairs a step, one matrix: on 1 rank of 8, or gathered over 2 ranks of 4 (exact gradients).
    study = results["study_method"]
    single = next(r for r in runs.values() if r["method"] == study and r["nproc"] == 1)
    gathered = [r for r in runs.values() if r["method"] == study and r["nproc"] == 2]
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        assert not gathered  # NCCL cannot put 2 ranks on one GPU: the harness skips those runs
    else:
        assert gathered[0]["ranking_margin"] == pytest.approx(single["ranking_margin"], rel=1e-4, abs=1e-5)
    table = (work / "results.md").read_text()
    for label in ("| DPO |", "| RPO paired, embedding weights, rows mean 1 |", "| RPO unpaired |", "| KTO |",
                  "| 1 rank x 8 pairs |", "worlds beating DPO", "World 1: 10 topics in 5 groups"):
        assert label in table
    # The paired column: each world's KTO run minus that world's DPO run (one seed, one lr in --quick).
    main = {(r["world"], r["method"]): r["test_win_rate"] for r in runs.values() if r["nproc"] == 1 and r["micro"] == 8}
    diff = (main[0, "kto"] - main[0, "dpo"] + main[1, "kto"] - main[1, "dpo"]) / 2
    kto_row = next(line for line in table.splitlines() if line.startswith("| KTO |"))
    assert float(kto_row.split(" | ")[2].split(" ± ")[0]) == pytest.approx(diff, abs=5e-4 + 1e-9), kto_row
    ahead = (main[0, "kto"] > main[0, "rpo_unpaired"]) + (main[1, "kto"] > main[1, "rpo_unpaired"])
    comparison = next(line for line in table.splitlines() if line.startswith("| the loss on unpaired items: KTO minus"))
    assert comparison.split(" | ")[2].startswith(f"{ahead} / "), comparison
    for r in runs.values():  # collapse is counted from the replies' shape
        assert 0.0 <= r["well_formed"] <= 1.0
    assert (work / "reproduction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key, r in runs.items():  # each world's runs and files in its own folder; every run exported to Hugging Face
        assert (work / f"world{r['world']}" / "runs" / key / "hf" / "config.json").exists(), key
    for w in (0, 1):
        assert (work / f"world{w}" / "world" / "test_pairs.jsonl").exists()
    assert "results (" in result.stdout
