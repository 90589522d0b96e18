"""The report: pooled tables over worlds and seeds, the comparisons, the figure and results.json."""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict

from bench.reproduction.experiment import COLLAPSED_BELOW, COMPARISONS, METHODS, STUDY_METHOD, runs_of


def mean_se(values: list[float]) -> tuple[float, float]:
    m = statistics.mean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return m, se


def fmt(values: list[float], digits: int = 2, signed: bool = False) -> str:
    m, se = mean_se(values)
    mean = f"{m:+.{digits}f}" if signed else f"{m:.{digits}f}"
    return mean if math.isnan(se) else f"{mean} ± {se:.{digits}f}"


def collapsed(run: dict) -> bool:
    return run["well_formed"] < COLLAPSED_BELOW


SIGNIFICANCE = 0.05
"""The family-wise level a stated conclusion must clear (Bonferroni over the comparisons made)."""


def sign_test(diffs: list[float]) -> float:
    """The two-sided exact sign test's p-value of paired differences (ties dropped): how likely a
    split at least this lopsided is when neither side is better. 1.0 with nothing untied."""
    ahead, behind = sum(x > 0 for x in diffs), sum(x < 0 for x in diffs)
    n = ahead + behind
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(ahead, behind) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def verdict(diffs: list[float], comparisons: int) -> str:
    """What a comparison may state: who is ahead where the sign test clears :data:`SIGNIFICANCE`
    divided by the number of ``comparisons`` made, "not shown" otherwise."""
    p = sign_test(diffs)
    if p * comparisons >= SIGNIFICANCE:
        return f"not shown (p = {p:.3g})"
    return f"{'first' if sum(x > 0 for x in diffs) > sum(x < 0 for x in diffs) else 'second'} ahead (p = {p:.3g})"



def _label(method: str) -> str:
    return METHODS[method][0]


def write_report(work, scale, per_world: dict, results: dict, minutes: float) -> str:
    """results.md: pooled tables, collapse, per-world tables and the study; results.json; the plot."""
    ws, seeds = list(per_world), len(scale.seeds)
    n = len(ws) * seeds

    def chosen(method: str, world: int) -> list[dict]:
        return runs_of(results, scale, world, method, per_world[world]["chosen_lr"][method])

    def pooled(method: str) -> list[dict]:
        return [r for w in ws for r in chosen(method, w)]

    lines = [f"{len(ws)} world(s) x {seeds} seed(s), {scale.steps} steps of {scale.pairs_per_step} pairs (16 items "
             f"unpaired), {minutes:.0f} minutes. Learning rate chosen per method and world from "
             f"{', '.join(f'{x:g}' for x in scale.lrs)} by the validation prompts' judge reward; the tables report "
             f"test prompts. Mean ± standard error over the {n} runs (worlds x seeds). A run has *collapsed* when "
             f"fewer than {COLLAPSED_BELOW:.0%} of its greedy test replies keep the world's shape.", "",
             "The worlds (the checks of bench/reproduction/world.py, and the warm-up on the test prompts):", "",
             "| world | groups x topics | habit | label temp. | labels agree with judge (stated) "
             "| warm-up reward | warm-up lead rule | warm-up closing rule |", "|---|---|---|---|---|---|---|---|"]
    for w in ws:
        c, warm = per_world[w]["checks"], per_world[w]["warmup"]
        lines.append(f"| {w} | {c['groups']} x {c['topics'] // c['groups']} | {c['habit']:.2f} "
                     f"| {c['label_temperature']:g} | {c['label_agreement']:.3f} ({c['label_agreement_stated']:.3f}) "
                     f"| {warm['test_reward']:.2f} | {warm['lead_rule']:.2f} | {warm['closing_rule']:.2f} |")
    lines += ["", "Pooled over worlds and seeds, each method at its chosen learning rate per world:", "",
              "| method | worlds beating DPO | win rate minus DPO's, paired (runs ahead) | win rate vs warm-up "
              "| win rate, runs not collapsed | collapsed | judge reward (of 3) | lead rule | closing rule "
              "| ranking accuracy |", "|---|---|---|---|---|---|---|---|---|---|"]

    def worlds_ahead(a: str, b: str) -> int:
        return sum(statistics.mean(r["test_win_rate"] for r in chosen(a, w)) >
                   statistics.mean(r["test_win_rate"] for r in chosen(b, w)) for w in ws)

    def paired(a: str, b: str) -> list[float]:
        """a's win rate minus b's, run by run: the same world and seed (one warm-up, one draw of the data)."""
        return [x["test_win_rate"] - y["test_win_rate"] for w in ws for x, y in zip(chosen(a, w), chosen(b, w))]

    for m in scale.methods:
        rs = pooled(m)
        kept = [r for r in rs if not collapsed(r)]
        beats = vs_dpo = "-"
        if m != "dpo" and "dpo" in scale.methods:
            diffs = paired(m, "dpo")
            beats = f"{worlds_ahead(m, 'dpo')} of {len(ws)}"
            vs_dpo = f"{fmt(diffs, digits=3, signed=True)} ({sum(x > 0 for x in diffs)} of {len(diffs)})"
        lines.append(f"| {_label(m)} | {beats} | {vs_dpo} | {fmt([r['test_win_rate'] for r in rs])} "
                     f"| {fmt([r['test_win_rate'] for r in kept]) if kept else '-'} ({len(kept)}) "
                     f"| {len(rs) - len(kept)} of {len(rs)} | {fmt([r['test_reward'] for r in rs])} "
                     f"| {fmt([r['lead_rule'] for r in rs])} | {fmt([r['closing_rule'] for r in rs])} "
                     f"| {fmt([r['ranking_accuracy'] for r in rs])} |")
    pairs = [(a, b, what) for a, b, what in COMPARISONS if a in scale.methods and b in scale.methods]
    against_dpo = [(m, "dpo", "against DPO") for m in scale.methods if m != "dpo" and "dpo" in scale.methods]
    tested = pairs + [c for c in against_dpo if (c[0], c[1]) not in {(a, b) for a, b, _ in pairs}]
    if tested:
        lines += ["", f"The comparisons the conclusions rest on, run by run (the same world and seed, each method at "
                  f"its chosen learning rate). A comparison states who is ahead only where the two-sided sign test "
                  f"over runs clears {SIGNIFICANCE} / {len(tested)} (Bonferroni over the {len(tested)} comparisons "
                  f"made here):", "",
                  "| comparison | win rate, first minus second | runs ahead / tied / behind | worlds ahead | "
                  "what it shows |", "|---|---|---|---|---|"]
        for a, b, what in tested:
            diffs = paired(a, b)
            lines.append(f"| {what}: {_label(a)} minus {_label(b)} | {fmt(diffs, digits=3, signed=True)} "
                         f"| {sum(x > 0 for x in diffs)} / {sum(x == 0 for x in diffs)} / {sum(x < 0 for x in diffs)} "
                         f"| {worlds_ahead(a, b)} of {len(ws)} | {verdict(diffs, len(tested))} |")
        lines += ["", "What these worlds cannot tell: they are small programs with two rules per group and a "
                  "tiny model, so a method's edge here says how it uses preference labels of that kind, not how "
                  "it does on real dialogue, at 7B, or under a human or GPT-4 judge; and runs of one world share "
                  "a warm-up and a vocabulary, so worlds, not runs, are the independent units of a claim about "
                  "worlds in general."]
    lines += ["", "Every learning rate, pooled over worlds and seeds (test win rate; runs collapsed):", "",
              "| method | " + " | ".join(f"lr {x:g}" for x in scale.lrs) + " |", "|---|" + "---|" * len(scale.lrs)]
    for m in scale.methods:
        cells = []
        for lr in scale.lrs:
            rs = [r for w in ws for r in runs_of(results, scale, w, m, lr)]
            cells.append(f"{fmt([r['test_win_rate'] for r in rs])}; {sum(map(collapsed, rs))} of {len(rs)}")
        lines.append(f"| {_label(m)} | " + " | ".join(cells) + " |")
    for w in ws:
        lines += ["", f"W{per_world[w]['description'][1:]}. Mean ± standard error over seeds:", "",
                  "| method | lr | win rate vs warm-up | collapsed | judge reward | lead rule | closing rule "
                  "| ranking accuracy |", "|---|---|---|---|---|---|---|---|"]
        for m in scale.methods:
            rs = chosen(m, w)
            lines.append(f"| {_label(m)} | {per_world[w]['chosen_lr'][m]:g} | {fmt([r['test_win_rate'] for r in rs])} "
                         f"| {sum(map(collapsed, rs))} of {len(rs)} | {fmt([r['test_reward'] for r in rs])} "
                         f"| {fmt([r['lead_rule'] for r in rs])} | {fmt([r['closing_rule'] for r in rs])} "
                         f"| {fmt([r['ranking_accuracy'] for r in rs])} |")
    study_rows = []
    study_world = next((w for w in ws if per_world[w]["study"]), None)
    if study_world is not None:
        lr = per_world[study_world]["chosen_lr"][STUDY_METHOD]
        configs = [(scale.pairs_per_step, 1, "data_parallel"), *scale.study]
        lines += ["", f"Batch-size study (world {study_world}, {_label(STUDY_METHOD)}, lr {lr:g}, "
                  f"{scale.pairs_per_step} pairs per step in every row; only the contrast matrix changes):", "",
                  "| contrast matrix | M x N | win rate vs warm-up | judge reward | ranking accuracy |",
                  "|---|---|---|---|---|"]
        for micro, nproc, scope in sorted(configs, key=lambda c: (c[1], c[0], c[2])):
            side = micro * nproc if scope == "data_parallel" else micro  # the matrix spans the gathered ranks
            if nproc == 1:
                label = f"1 rank x {micro} pairs"
            else:
                kept = "gathered" if scope == "data_parallel" else "per rank (local)"
                label = f"{nproc} ranks x {micro} pairs, {kept}"
            rs = runs_of(results, scale, study_world, STUDY_METHOD, lr, micro, nproc, scope)
            study_rows.append((label, side, rs))
            lines.append(f"| {label} | {side}x{side} | {fmt([r['test_win_rate'] for r in rs])} "
                         f"| {fmt([r['test_reward'] for r in rs])} | {fmt([r['ranking_accuracy'] for r in rs])} |")
    report = "\n".join(lines) + "\n"
    with open(os.path.join(work, "results.md"), "w") as f:
        f.write(report)
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump({"scale": asdict(scale), "worlds": {str(w): v for w, v in per_world.items()},
                   "study_method": STUDY_METHOD, "collapsed_below": COLLAPSED_BELOW, "runs": results}, f, indent=1)
    plot(os.path.join(work, "reproduction.png"), {m: pooled(m) for m in scale.methods}, study_rows, len(ws))
    return report


def plot(path: str, per_method: dict, study_rows: list, worlds_count: int) -> None:
    """Win rate per method pooled over worlds (error bars: standard error over runs; the hollow bar
    leaves collapsed runs out); win rate against the matrix size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if study_rows else 1, figsize=(13 if study_rows else 8, 5), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]} if study_rows else None)
    ax = axes[0, 0]
    x = range(len(per_method))
    stats = [mean_se([r["test_win_rate"] for r in rs]) for rs in per_method.values()]
    kept = [[r["test_win_rate"] for r in rs if not collapsed(r)] for rs in per_method.values()]
    ax.bar([i - 0.2 for i in x], [m for m, _ in stats], width=0.4, yerr=[0 if math.isnan(e) else e for _, e in stats],
           capsize=3, color="tab:blue", label="all runs")
    ax.bar([i + 0.2 for i in x], [statistics.mean(k) if k else 0 for k in kept], width=0.4, fill=False,
           edgecolor="tab:blue", label="runs not collapsed")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(x), [METHODS[m][0].replace("RPO paired, ", "RPO ") for m in per_method],
                  rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("judge win rate vs warm-up (ties half)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"held-out test prompts, {worlds_count} world(s) x seeds, mean ± s.e.")
    if study_rows:
        ax = axes[0, 1]
        for k, (label, side, rs) in enumerate(study_rows):
            m, e = mean_se([r["test_win_rate"] for r in rs])
            one_rank = label.startswith("1 rank")
            ax.errorbar([side * (1 if one_rank else 1.06 + 0.06 * k)], [m], yerr=[0 if math.isnan(e) else e],
                        marker="o" if one_rank else "s", capsize=4, ls="none",
                        color="tab:blue" if one_rank else f"C{k}", label=None if one_rank else label)
        singles = [(side, mean_se([r["test_win_rate"] for r in rs])[0]) for label, side, rs in study_rows
                   if label.startswith("1 rank")]
        ax.plot([x for x, _ in singles], [y for _, y in singles], color="tab:blue", label="1 rank")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("pairs in the contrast matrix (M = N)")
        ax.set_ylabel("judge win rate vs warm-up")
        ax.set_title(f"{METHODS[STUDY_METHOD][0]}:\nmatrix size (8 pairs per step)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
