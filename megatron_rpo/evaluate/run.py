"""One evaluation: models answer the held-out prompts, a judge compares each answer with the
baseline (the test set's chosen response, or another model: head to head), and the win rates are
written as a table.

The output folder holds, and a rerun of the same command reuses:

* ``generations.jsonl``: every response, by model, sampling settings and prompt;
* ``judgements.jsonl``: every item judged: the prompt, both responses, what the judge said and
  the verdict; keyed by the judge and the two responses' contents, so a second judge, another
  baseline or a resumed run asks only what it has not asked;
* ``results.md`` (the table) and ``results.json`` (the table and the settings).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from dataclasses import dataclass

from tqdm import tqdm

from megatron_rpo.evaluate.generation import Store, generate_missing, run_each
from megatron_rpo.evaluate.winrate import Tally, tally
from megatron_rpo.publish import write_text

__all__ = ["REFERENCE", "Row", "judge_all", "evaluate", "markdown_table"]

REFERENCE = "reference"
"""The baseline's name when it is the held-out chosen response."""


@dataclass
class Row:
    candidate: str
    baseline: str
    tally: Tally
    candidate_length: float
    baseline_length: float

    def as_dict(self) -> dict:
        return {"candidate": self.candidate, "baseline": self.baseline, **self.tally.as_dict(),
                "candidate_mean_length": self.candidate_length, "baseline_mean_length": self.baseline_length}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def judge_all(judge, items: list, candidate: str, responses: dict[str, str], baseline: str,
              baselines: dict[str, str], store: Store, *, concurrency: int = 1, progress: bool = True) -> list[dict]:
    """Every item's judgement of ``candidate`` against ``baseline`` (kept in ``store`` one by one)."""
    def key(item):
        return f"{judge.name}:{_digest(responses[item.id])}:{_digest(baselines[item.id])}:{item.id}"

    def ask(item):
        judgement = judge.judge(item, responses[item.id], baselines[item.id])
        store.add(key(item), {"item": item.id, "source": item.source, "prompt": item.question,
                              "candidate": candidate, "baseline": baseline,
                              "candidate_response": responses[item.id], "baseline_response": baselines[item.id],
                              "judge": judge.name, **judgement.as_dict()})

    missing = [item for item in items if key(item) not in store]
    bar = tqdm(total=len(items), initial=len(items) - len(missing), unit=" items",
               desc=f"judge {candidate} vs {baseline}", disable=not progress, dynamic_ncols=True)
    try:
        run_each(ask, missing, concurrency, bar)
    finally:
        bar.close()
    return [store.get(key(item)) for item in items]


def evaluate(items: list, generators: dict, judge, output: str, *, head_to_head: bool = False,
             length=None, judge_concurrency: int = 1, progress: bool = True, settings: dict | None = None) -> list[Row]:
    """Generate (what is not cached), judge (what is not kept), and write the table.

    Args:
        generators: model name -> generator (:mod:`megatron_rpo.evaluate.generation`).
        head_to_head: the first model against the second, instead of every model against the
            held-out chosen response.
        length: ``text -> int``, the length a table reports (tokens of the models' tokenizer).
    """
    os.makedirs(output, exist_ok=True)
    store = Store(os.path.join(output, "generations.jsonl"))
    responses = {name: generate_missing(name, gen, items, store, progress=progress)
                 for name, gen in generators.items()}
    names = list(generators)
    if head_to_head:
        pairs = [(names[0], names[1])]
    else:
        responses[REFERENCE] = {item.id: item.reference for item in items}
        pairs = [(name, REFERENCE) for name in names]
    judgements = Store(os.path.join(output, "judgements.jsonl"))
    length = length or (lambda text: len(text.split()))
    rows = []
    for candidate, baseline in pairs:
        records = judge_all(judge, items, candidate, responses[candidate], baseline, responses[baseline], judgements,
                            concurrency=judge_concurrency, progress=progress)
        rows.append(Row(candidate, baseline, tally(r["outcome"] for r in records),
                        statistics.mean(length(responses[candidate][i.id]) for i in items),
                        statistics.mean(length(responses[baseline][i.id]) for i in items)))
    table = markdown_table(rows, judge.name, len(items))
    write_text(os.path.join(output, "results.md"), table + "\n")
    write_text(os.path.join(output, "results.json"),
               json.dumps({"rows": [r.as_dict() for r in rows], "judge": judge.name, "items": len(items),
                           "settings": settings or {}}, indent=2, default=str) + "\n")
    return rows


def markdown_table(rows: list[Row], judge: str, items: int) -> str:
    """One row per model: win rate ± standard error (ties half), wins / ties / losses, unparseable
    verdicts (left out of the rate), mean lengths."""
    lines = [f"Judge: {judge}; {items} held-out prompts; ties count half; ± one standard error over items; "
             "unparseable verdicts are left out of the rate.", "",
             "| model | against | win rate | wins / ties / losses | unparseable | mean length (model / against) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        t = r.tally
        rate = "-" if not t.judged else (f"{t.win_rate:.3f}" if t.judged < 2 else
                                         f"{t.win_rate:.3f} ± {t.standard_error:.3f}")
        lines.append(f"| {r.candidate} | {r.baseline} | {rate} | {t.wins} / {t.ties} / {t.losses} | {t.unparseable} | "
                     f"{r.candidate_length:.1f} / {r.baseline_length:.1f} |")
    return "\n".join(lines)
