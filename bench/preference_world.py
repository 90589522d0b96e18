"""A small preference world with a known reward: the world and the judge of ``bench/reproduction.py``.

``bench/REPRODUCTION.md`` describes the world (the rules, why a small model can learn them, why
the warm-up alone cannot) and what the reproduction found. In short: English requests from 12
topics in 4 groups; a reply ``<lead> <item>. <closing>``; the judge (:func:`judge`) adds the
item's relevance to the asked topic (1, 0.25 for the same group, else 0), 1 for the group's
lead and 1 for the group's closing. The base policy (:func:`sample_reply`), which the warm-up
imitates, has group-dependent habits that are wrong; the preferences (:func:`make_pairs`,
:func:`make_unpaired`) are the judge's, with Bradley-Terry noise.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass

__all__ = ["GROUPS", "Prompt", "make_prompts", "split_prompts", "sample_reply", "judge", "reply_text",
           "parse", "make_pairs", "make_unpaired", "make_demonstrations", "MAX_REWARD"]

# group -> (lead the judge wants, closing the judge wants, purposes, {topic: (phrases, items)})
GROUPS = {
    "food": ("Consider", "Enjoy!", ("dinner party", "picnic", "lunch box", "family breakfast"), {
        "fruit": (("a piece of fruit", "some fruit", "a fresh fruit"),
                  ("apple", "banana", "cherry", "mango", "peach", "plum")),
        "vegetable": (("a vegetable", "some vegetables", "something green to cook"),
                      ("carrot", "potato", "onion", "spinach", "pepper", "cabbage")),
        "dessert": (("a dessert", "something sweet", "a sweet treat"),
                    ("cake", "pudding", "cookie", "pie", "brownie", "tart")),
    }),
    "animals": ("Perhaps", "Cheers!", ("school project", "children's book", "zoo visit", "drawing class"), {
        "pet": (("a pet", "an animal to keep at home", "a family pet"),
                ("dog", "cat", "rabbit", "hamster", "parrot", "goldfish")),
        "farm": (("a farm animal", "an animal for a farm", "some livestock"),
                 ("cow", "sheep", "goat", "pig", "horse", "chicken")),
        "sea": (("a sea creature", "an ocean animal", "some marine life"),
                ("dolphin", "whale", "octopus", "shark", "seal", "turtle")),
    }),
    "places": ("Try", "Goodbye!", ("summer holiday", "honeymoon", "travel blog", "geography quiz"), {
        "city": (("a city", "a big city to visit", "a famous town"),
                 ("Paris", "Tokyo", "Rome", "Cairo", "Lima", "Oslo")),
        "country": (("a country", "a foreign country", "a nation to visit"),
                    ("France", "Japan", "Brazil", "Kenya", "Canada", "Norway")),
        "nature": (("a natural wonder", "some wild scenery", "a landscape"),
                   ("mountain", "desert", "forest", "lake", "canyon", "glacier")),
    }),
    "objects": ("Maybe", "Thanks!", ("new hobby", "birthday gift", "garage sale", "weekend project"), {
        "tool": (("a tool", "something for my workshop", "a hand tool"),
                 ("hammer", "saw", "drill", "wrench", "chisel", "pliers")),
        "instrument": (("a musical instrument", "an instrument to learn", "something to play music on"),
                       ("piano", "guitar", "violin", "flute", "drum", "trumpet")),
        "vehicle": (("a vehicle", "something to ride", "a way to get around"),
                    ("bicycle", "car", "train", "boat", "scooter", "bus")),
    }),
}
TEMPLATES = (
    "Can you recommend {phrase} for my {purpose}?",
    "I need {phrase} for a {purpose}. What do you suggest?",
    "What would you pick as {phrase} for a {purpose}?",
    "Please suggest {phrase} for my {purpose}.",
    "Any ideas for {phrase}? It is for a {purpose}.",
    "Help me choose {phrase} for the {purpose}.",
)
LEADS = tuple(g[0] for g in GROUPS.values())
CLOSINGS = tuple(g[1] for g in GROUPS.values())
# The base policy has habits that depend on the group, and they are wrong: in each group its most
# likely lead (0.4) is another group's, and so is its most likely closing; the right one has 0.2.
BASE_HABIT = 0.4
BASE_ITEM = {"topic": 0.75, "group": 0.15, "other": 0.10}  # where the item comes from
MAX_REWARD = 3.0

TOPIC_GROUP = {topic: group for group, (_, _, _, topics) in GROUPS.items() for topic in topics}
TOPIC_ITEMS = {topic: items for (_, _, _, topics) in GROUPS.values() for topic, (_, items) in topics.items()}
ITEM_TOPIC = {item: topic for topic, items in TOPIC_ITEMS.items() for item in items}


@dataclass(frozen=True)
class Prompt:
    text: str
    topic: str

    @property
    def group(self) -> str:
        return TOPIC_GROUP[self.topic]


def make_prompts() -> list[Prompt]:
    """Every prompt of the world: template x topic phrase x purpose of the topic's group (864)."""
    out = []
    for group, (_, _, purposes, topics) in GROUPS.items():
        for topic, (phrases, _) in topics.items():
            for template, phrase, purpose in itertools.product(TEMPLATES, phrases, purposes):
                out.append(Prompt(template.format(phrase=phrase, purpose=purpose), topic))
    return out


def split_prompts(prompts: list[Prompt], held_out_per_topic: int, seed: int) -> tuple[list, list, list]:
    """(train, validation, test): per topic, ``held_out_per_topic`` prompts each for validation and test.

    Every topic is in all three; no prompt is in two.
    """
    rng = random.Random(seed)
    train, valid, test = [], [], []
    for topic in TOPIC_GROUP:
        mine = [p for p in prompts if p.topic == topic]
        rng.shuffle(mine)
        valid += mine[:held_out_per_topic]
        test += mine[held_out_per_topic : 2 * held_out_per_topic]
        train += mine[2 * held_out_per_topic :]
    return train, valid, test


def reply_text(lead: str, item: str, closing: str) -> str:
    return f"{lead} {item}. {closing}"


def _pick(rng: random.Random, weights: dict):
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def base_choices(group: str, options: tuple, shift: int) -> dict:
    """The base policy's probabilities of ``options`` (leads or closings) in ``group``: the habit of
    the group ``shift`` places further on has ``BASE_HABIT``, the other three share the rest."""
    habit = options[(list(GROUPS).index(group) + shift) % len(options)]
    rest = (1.0 - BASE_HABIT) / (len(options) - 1)
    return {o: BASE_HABIT if o == habit else rest for o in options}


def sample_reply(prompt: Prompt, rng: random.Random) -> str:
    """One reply of the base policy (see the module docstring)."""
    source = _pick(rng, BASE_ITEM)
    if source == "topic":
        pool = TOPIC_ITEMS[prompt.topic]
    elif source == "group":
        pool = [i for t, g in TOPIC_GROUP.items() if g == prompt.group and t != prompt.topic for i in TOPIC_ITEMS[t]]
    else:
        pool = [i for t, g in TOPIC_GROUP.items() if g != prompt.group for i in TOPIC_ITEMS[t]]
    return reply_text(_pick(rng, base_choices(prompt.group, LEADS, 1)), rng.choice(pool),
                      _pick(rng, base_choices(prompt.group, CLOSINGS, 2)))


_SHAPE = re.compile(r"^\s*(?P<lead>" + "|".join(LEADS) + r") (?P<item>\w+)\. (?P<closing>" +
                    "|".join(re.escape(c) for c in CLOSINGS) + r")\s*$")


def parse(reply: str) -> tuple[str, str, str] | None:
    """(lead, item, closing) of a reply of the world's shape, else None."""
    m = _SHAPE.match(reply)
    return None if m is None else (m["lead"], m["item"], m["closing"])


def judge(prompt: Prompt, reply: str) -> float:
    """The reward of ``reply`` to ``prompt``: relevance + lead + closing, in [0, 3] (module docstring).

    A reply of another shape scores 0.
    """
    parts = parse(reply)
    if parts is None:
        return 0.0
    lead, item, closing = parts
    want_lead, want_closing = GROUPS[prompt.group][:2]
    topic = ITEM_TOPIC.get(item)
    if topic is None or TOPIC_GROUP[topic] != prompt.group:
        relevance = 0.0
    else:
        relevance = 1.0 if topic == prompt.topic else 0.25
    return relevance + float(lead == want_lead) + float(closing == want_closing)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def make_pairs(prompts: list[Prompt], per_prompt: int, temperature: float, rng: random.Random) -> list[dict]:
    """``pairs`` rows: two base replies per pair, the chosen one drawn by Bradley-Terry on the judge.

    ``temperature`` 0 labels by the judge exactly (held-out pairs). Pairs of equal reward are redrawn.
    """
    rows = []
    for prompt in prompts:
        for _ in range(per_prompt):
            while True:
                a, b = sample_reply(prompt, rng), sample_reply(prompt, rng)
                ra, rb = judge(prompt, a), judge(prompt, b)
                if ra != rb:
                    break
            a_wins = ra > rb if temperature == 0 else rng.random() < _sigmoid((ra - rb) / temperature)
            chosen, rejected = (a, b) if a_wins else (b, a)
            rows.append({"prompt": prompt.text, "chosen": chosen, "rejected": rejected})
    return rows


def base_median_reward(group: str, rng: random.Random, samples: int = 2000) -> float:
    """The base policy's median reward on the prompts of ``group`` (the unpaired labels' threshold)."""
    prompts = [p for p in make_prompts() if p.group == group]
    rewards = sorted(judge(p, sample_reply(p, rng)) for p in rng.choices(prompts, k=samples))
    return rewards[len(rewards) // 2]


def make_unpaired(prompts: list[Prompt], per_prompt: int, temperature: float, rng: random.Random) -> list[dict]:
    """``unpaired`` rows: one base reply each, desirable with probability sigmoid((r - median) / temperature)."""
    medians = {group: base_median_reward(group, random.Random(0)) for group in GROUPS}
    rows = []
    for prompt in prompts:
        for _ in range(per_prompt):
            reply = sample_reply(prompt, rng)
            label = rng.random() < _sigmoid((judge(prompt, reply) - medians[prompt.group]) / temperature)
            rows.append({"prompt": prompt.text, "completion": reply, "label": label})
    return rows


def make_demonstrations(prompts: list[Prompt], per_prompt: int, rng: random.Random) -> list[dict]:
    """The warm-up corpus: base-policy replies, unjudged.

    Written as ``pairs`` rows because the trainer's ``sft`` loss reads the chosen side of a
    preference dataset; the rejected side is another base reply and is never trained on.
    """
    return [{"prompt": p.text, "chosen": sample_reply(p, rng), "rejected": sample_reply(p, rng)}
            for p in prompts for _ in range(per_prompt)]
