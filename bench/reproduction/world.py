"""A family of small preference worlds with a known reward: the worlds and judge of the reproduction (:mod:`bench.reproduction`).

``bench/REPRODUCTION.md`` describes them (the rules, why a small model can learn them, why the
warm-up alone cannot) and what the reproduction found. In short: English requests from topics
in groups; a reply ``<lead> <item>. <closing>``; the judge (:meth:`World.judge`) adds the item's
relevance to the asked topic (1, 0.25 for the same group, else 0), 1 for the group's lead and 1
for the group's closing. The base policy (:meth:`World.sample_reply`), which the warm-up
imitates, has group-dependent habits that are wrong; the preferences (:meth:`World.make_pairs`,
:meth:`World.make_unpaired`) are the judge's, with Bradley-Terry noise.

:func:`draw` builds a world from a seed: world 0 is the hand-built one (12 topics in 4 groups,
habit 0.4, label temperature 0.5); any other seed draws the number of groups (3-6) and of topics
per group, which topics, purposes, lead and closing words, the habit strength (0.3-0.6) and the
label temperature from the pools below. :meth:`World.check` measures what each world must hold.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import statistics
from dataclasses import dataclass

__all__ = ["World", "draw", "Prompt", "MAX_REWARD"]

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
# The pools other worlds draw from: today's topics and six more, purposes, leads and closings
# (leads, and closings, start with different letters, so no two share a first token).
EXTRA_TOPICS = {
    "drink": (("a drink", "something to drink", "a refreshing drink"),
              ("tea", "coffee", "juice", "lemonade", "cocoa", "milk")),
    "flower": (("a flower", "some flowers", "a pretty flower"),
               ("rose", "tulip", "daisy", "lily", "orchid", "sunflower")),
    "sport": (("a sport", "a game to play outdoors", "some exercise"),
              ("tennis", "soccer", "golf", "hockey", "rugby", "cricket")),
    "bird": (("a bird", "a wild bird to watch", "a garden bird"),
             ("robin", "eagle", "owl", "sparrow", "crow", "swan")),
    "color": (("a color", "a colour to paint with", "a shade"),
              ("red", "blue", "green", "yellow", "purple", "orange")),
    "clothing": (("a piece of clothing", "something to wear", "an item of clothing"),
                 ("shirt", "jacket", "scarf", "hat", "dress", "boots")),
}
TOPIC_POOL = {**{t: v for (_, _, _, topics) in GROUPS.values() for t, v in topics.items()}, **EXTRA_TOPICS}
PURPOSE_POOL = tuple(p for g in GROUPS.values() for p in g[2]) + (
    "camping trip", "art class", "office party", "science fair", "wedding", "retirement gift", "road trip",
    "book club")
LEAD_POOL = ("Consider", "Perhaps", "Try", "Maybe", "Imagine", "Behold", "Here", "Well")
CLOSING_POOL = ("Enjoy!", "Cheers!", "Goodbye!", "Thanks!", "Farewell!", "Bye!", "Regards!", "Later!")
BASE_ITEM = {"topic": 0.75, "group": 0.15, "other": 0.10}  # where the base policy's item comes from
MAX_REWARD = 3.0


@dataclass(frozen=True)
class Prompt:
    text: str
    topic: str


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _pick(rng: random.Random, weights: dict):
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def reply_text(lead: str, item: str, closing: str) -> str:
    return f"{lead} {item}. {closing}"


class World:
    """One world: its groups, the base policy's habit strength and the labels' temperature.

    Args:
        groups: group -> (lead the judge wants, closing the judge wants, purposes, {topic: (phrases, items)}).
        habit: the base policy's probability of its most likely lead (another group's), and of its
            most likely closing (a third group's); the others, the right one included, share the rest.
        label_temperature: the Bradley-Terry temperature of the training labels.
        seed: the seed it was drawn from (0: the hand-built world).
    """

    def __init__(self, groups: dict, habit: float, label_temperature: float, seed: int = 0):
        self.groups, self.habit, self.label_temperature, self.seed = groups, habit, label_temperature, seed
        self.leads = tuple(g[0] for g in groups.values())
        self.closings = tuple(g[1] for g in groups.values())
        if not habit > 1.0 / len(groups):
            raise ValueError(f"habit {habit} must exceed 1 / {len(groups)} groups, or the habit is not the most "
                             "likely choice")
        self.topic_group = {topic: group for group, (_, _, _, topics) in groups.items() for topic in topics}
        self.topic_items = {topic: items for (_, _, _, topics) in groups.values()
                            for topic, (_, items) in topics.items()}
        self.item_topic = {item: topic for topic, items in self.topic_items.items() for item in items}
        self._shape = re.compile(r"^\s*(?P<lead>" + "|".join(self.leads) + r") (?P<item>\w+)\. (?P<closing>" +
                                 "|".join(re.escape(c) for c in self.closings) + r")\s*$")

    def describe(self) -> str:
        sizes = sorted({len(t) for (_, _, _, t) in self.groups.values()})
        return (f"world {self.seed}: {len(self.topic_group)} topics in {len(self.groups)} groups "
                f"({'/'.join(map(str, sizes))} per group), habit {self.habit:.2f}, label temperature "
                f"{self.label_temperature:g}; leads {', '.join(self.leads)}; closings {', '.join(self.closings)}")

    def group(self, prompt: Prompt) -> str:
        return self.topic_group[prompt.topic]

    def make_prompts(self) -> list[Prompt]:
        """Every prompt of the world: template x topic phrase x purpose of the topic's group."""
        out = []
        for group, (_, _, purposes, topics) in self.groups.items():
            for topic, (phrases, _) in topics.items():
                for template, phrase, purpose in itertools.product(TEMPLATES, phrases, purposes):
                    out.append(Prompt(template.format(phrase=phrase, purpose=purpose), topic))
        return out

    def split_prompts(self, prompts: list[Prompt], held_out_per_topic: int, seed: int) -> tuple[list, list, list]:
        """(train, validation, test): per topic, ``held_out_per_topic`` prompts each for validation and test.

        Every topic is in all three; no prompt is in two.
        """
        rng = random.Random(seed)
        train, valid, test = [], [], []
        for topic in self.topic_group:
            mine = [p for p in prompts if p.topic == topic]
            rng.shuffle(mine)
            valid += mine[:held_out_per_topic]
            test += mine[held_out_per_topic : 2 * held_out_per_topic]
            train += mine[2 * held_out_per_topic :]
        return train, valid, test

    def base_choices(self, group: str, options: tuple, shift: int) -> dict:
        """The base policy's probabilities of ``options`` (leads or closings) in ``group``: the habit of
        the group ``shift`` places further on has ``habit``, the others share the rest."""
        habit = options[(list(self.groups).index(group) + shift) % len(options)]
        rest = (1.0 - self.habit) / (len(options) - 1)
        return {o: self.habit if o == habit else rest for o in options}

    def sample_reply(self, prompt: Prompt, rng: random.Random) -> str:
        """One reply of the base policy (see the module docstring)."""
        group = self.group(prompt)
        source = _pick(rng, BASE_ITEM)
        if source == "topic":
            pool = self.topic_items[prompt.topic]
        elif source == "group":
            pool = [i for t, g in self.topic_group.items() if g == group and t != prompt.topic
                    for i in self.topic_items[t]]
        else:
            pool = [i for t, g in self.topic_group.items() if g != group for i in self.topic_items[t]]
        return reply_text(_pick(rng, self.base_choices(group, self.leads, 1)), rng.choice(pool),
                          _pick(rng, self.base_choices(group, self.closings, 2)))

    def parse(self, reply: str) -> tuple[str, str, str] | None:
        """(lead, item, closing) of a reply of the world's shape, else None."""
        m = self._shape.match(reply)
        return None if m is None else (m["lead"], m["item"], m["closing"])

    def judge(self, prompt: Prompt, reply: str) -> float:
        """The reward of ``reply`` to ``prompt``: relevance + lead + closing, in [0, 3] (module docstring).

        A reply of another shape scores 0.
        """
        parts = self.parse(reply)
        if parts is None:
            return 0.0
        lead, item, closing = parts
        group = self.group(prompt)
        want_lead, want_closing = self.groups[group][:2]
        topic = self.item_topic.get(item)
        if topic is None or self.topic_group[topic] != group:
            relevance = 0.0
        else:
            relevance = 1.0 if topic == prompt.topic else 0.25
        return relevance + float(lead == want_lead) + float(closing == want_closing)

    def _label_pair(self, prompt: Prompt, temperature: float, rng: random.Random) -> tuple[str, str, float]:
        while True:  # pairs of equal reward are redrawn
            a, b = self.sample_reply(prompt, rng), self.sample_reply(prompt, rng)
            ra, rb = self.judge(prompt, a), self.judge(prompt, b)
            if ra != rb:
                break
        a_wins = ra > rb if temperature == 0 else rng.random() < _sigmoid((ra - rb) / temperature)
        return (a, b, ra - rb) if a_wins else (b, a, rb - ra)

    def make_pairs(self, prompts: list[Prompt], per_prompt: int, temperature: float,
                   rng: random.Random) -> list[dict]:
        """``pairs`` rows: two base replies per pair, the chosen one drawn by Bradley-Terry on the judge.

        ``temperature`` 0 labels by the judge exactly (held-out pairs). Pairs of equal reward are redrawn.
        """
        rows = []
        for prompt in prompts:
            for _ in range(per_prompt):
                chosen, rejected, _ = self._label_pair(prompt, temperature, rng)
                rows.append({"prompt": prompt.text, "chosen": chosen, "rejected": rejected})
        return rows

    def base_median_reward(self, group: str, rng: random.Random, samples: int = 2000) -> float:
        """The base policy's median reward on the prompts of ``group`` (the unpaired labels' threshold)."""
        prompts = [p for p in self.make_prompts() if self.group(p) == group]
        rewards = sorted(self.judge(p, self.sample_reply(p, rng)) for p in rng.choices(prompts, k=samples))
        return rewards[len(rewards) // 2]

    def make_unpaired(self, prompts: list[Prompt], per_prompt: int, temperature: float,
                      rng: random.Random) -> list[dict]:
        """``unpaired`` rows: one base reply each, desirable with probability sigmoid((r - median) / temperature)."""
        medians = {group: self.base_median_reward(group, random.Random(0)) for group in self.groups}
        rows = []
        for prompt in prompts:
            for _ in range(per_prompt):
                reply = self.sample_reply(prompt, rng)
                label = rng.random() < _sigmoid((self.judge(prompt, reply) - medians[self.group(prompt)]) / temperature)
                rows.append({"prompt": prompt.text, "completion": reply, "label": label})
        return rows

    def make_demonstrations(self, prompts: list[Prompt], per_prompt: int, rng: random.Random) -> list[dict]:
        """The warm-up corpus: base-policy replies, unjudged.

        Written as ``pairs`` rows because the trainer's ``sft`` loss reads the chosen side of a
        preference dataset; the rejected side is another base reply and is never trained on.
        """
        return [{"prompt": p.text, "chosen": self.sample_reply(p, rng), "rejected": self.sample_reply(p, rng)}
                for p in prompts for _ in range(per_prompt)]

    def check(self, held_out_per_topic: int, split_seed: int, samples: int = 3000) -> dict:
        """What every world must hold, measured (as world 0 was checked); see :func:`check_failures`.

        * ``base_wrong_groups``: groups where the base policy's most likely lead and closing, what
          greedy decoding of a faithful imitation picks, are both wrong (must be all of them);
        * ``label_agreement`` (measured on ``samples`` training pairs) and ``label_agreement_stated``
          (the mean Bradley-Terry probability the temperature gives the same pairs);
        * ``unpaired_reward_gap``: mean judge reward of desirable minus undesirable items (> 0);
        * ``held_out_overlap``: held-out prompt texts also in training (must be 0), and the split sizes;
        * ``within_group``: the share of the base policy's replies of the group's topic or group.
        """
        rng = random.Random(12345)
        prompts = self.make_prompts()
        wrong = 0
        for group in self.groups:
            want_lead, want_closing = self.groups[group][:2]
            leads, closings = self.base_choices(group, self.leads, 1), self.base_choices(group, self.closings, 2)
            wrong += max(leads, key=leads.get) != want_lead and max(closings, key=closings.get) != want_closing
        picks = rng.choices(prompts, k=samples)
        labelled = [self._label_pair(p, self.label_temperature, rng) for p in picks]
        agreement = statistics.mean(margin > 0 for _, _, margin in labelled)
        # margin: chosen minus rejected reward, negative where the noise flipped the label; the
        # stated rate is the probability the temperature gives the better reply, sigmoid(|margin| / T)
        stated = statistics.mean(_sigmoid(abs(m) / self.label_temperature) for _, _, m in labelled)
        items = self.make_unpaired(picks[: samples // 2], 1, self.label_temperature, rng)
        by_text = {p.text: p for p in prompts}
        good = [self.judge(by_text[r["prompt"]], r["completion"]) for r in items if r["label"]]
        bad = [self.judge(by_text[r["prompt"]], r["completion"]) for r in items if not r["label"]]
        train, valid, test = self.split_prompts(prompts, held_out_per_topic, split_seed)
        trained = {p.text for p in train}
        return {"groups": len(self.groups), "topics": len(self.topic_group), "habit": self.habit,
                "label_temperature": self.label_temperature, "base_wrong_groups": wrong,
                "label_agreement": agreement, "label_agreement_stated": stated,
                "unpaired_reward_gap": statistics.mean(good) - statistics.mean(bad),
                "held_out_overlap": sum(p.text in trained for p in valid + test),
                "prompts": {"train": len(train), "valid": len(valid), "test": len(test)}}


def check_failures(numbers: dict) -> list[str]:
    """What a world's :meth:`World.check` numbers break, in words (none for a usable world)."""
    out = []
    if numbers["base_wrong_groups"] != numbers["groups"]:
        out.append(f"the base policy's habits are right in {numbers['groups'] - numbers['base_wrong_groups']} group(s)")
    if abs(numbers["label_agreement"] - numbers["label_agreement_stated"]) > 0.03:
        out.append(f"labels agree with the judge {numbers['label_agreement']:.3f} of the time, the temperature "
                   f"states {numbers['label_agreement_stated']:.3f}")
    if not numbers["unpaired_reward_gap"] > 0:
        out.append("desirable items are not better than undesirable ones")
    if numbers["held_out_overlap"]:
        out.append(f"{numbers['held_out_overlap']} held-out prompts are training prompts")
    return out


def draw(seed: int) -> World:
    """World ``seed``: 0 is the hand-built world; any other seed draws one from the pools (module docstring)."""
    if seed == 0:
        return World(GROUPS, habit=0.4, label_temperature=0.5, seed=0)
    rng = random.Random(f"preference-world-{seed}")
    n = rng.randint(3, 6)
    per_group = rng.randint(2, min(4, len(TOPIC_POOL) // n))
    topics = rng.sample(sorted(TOPIC_POOL), n * per_group)
    purposes = rng.sample(PURPOSE_POOL, 4 * n)
    leads, closings = rng.sample(LEAD_POOL, n), rng.sample(CLOSING_POOL, n)
    groups = {}
    for g in range(n):
        mine = topics[g * per_group : (g + 1) * per_group]
        groups[f"group{g + 1}"] = (leads[g], closings[g], tuple(purposes[4 * g : 4 * g + 4]),
                                   {t: TOPIC_POOL[t] for t in mine})
    habit = round(rng.uniform(max(0.3, 1.0 / n + 0.1), 0.6), 2)
    return World(groups, habit=habit, label_temperature=rng.choice((0.35, 0.5, 0.75)), seed=seed)
