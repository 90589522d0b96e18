"""A picture of a run: ``python -m megatron_rpo.plot RUN_DIR [--output FILE]``.

Reads the TensorBoard events a run wrote (``RUN_DIR/tensorboard``, or event files in ``RUN_DIR``
itself) and draws loss, reward margin and accuracy -- train and eval -- against the step into
one PNG (``RUN_DIR/run.png`` by default). Unpaired runs show the reward AUC where paired ones
show the accuracy. Needs matplotlib (``pip install megatron_rpo[plot]``).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

from megatron_rpo.errors import InputError

__all__ = ["read_scalars", "panel_lines", "plot_run", "main"]

# (panel title, the scalar names to draw in it, first one found wins per split)
PANELS = (
    ("loss", ("loss",)),
    ("reward margin", ("rewards/margins",)),
    ("accuracy", ("rewards/accuracies", "contrast/reward_auc")),
)


def _event_dir(run_dir: str) -> str:
    for candidate in (os.path.join(run_dir, "tensorboard"), run_dir):
        if glob.glob(os.path.join(candidate, "events.out.tfevents.*")):
            return candidate
    raise InputError(f"no TensorBoard events in {run_dir} or {os.path.join(run_dir, 'tensorboard')}")


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar the run wrote, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(_event_dir(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    out = {}
    for tag in events.Tags()["scalars"]:
        # A resumed run may repeat steps; the latest value of a step wins.
        by_step = {e.step: e.value for e in events.Scalars(tag)}
        out[tag] = sorted(by_step.items())
    return out


def panel_lines(scalars: dict) -> list[tuple[str, list[tuple[str, str]]]]:
    """Per panel of :data:`PANELS`, its title and the ``(split, scalar name)`` lines it draws: one
    measure per panel, training's (an unpaired run evaluated on pairs also logs the accuracy, which
    its training line does not show), for every split that logged it."""
    out = []
    for title, names in PANELS:
        name = next((n for split in ("train", "eval") for n in names if f"{split}/{n}" in scalars), None)
        out.append((title, [(split, name) for split in ("train", "eval") if name and f"{split}/{name}" in scalars]))
    return out


def plot_run(run_dir: str, output: str | None = None) -> str:
    """Draw the run into a PNG; returns its path.

    Raises:
        ValueError: no events, or none of the plotted scalars.
        ImportError: matplotlib is missing (the message names the extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'megatron_rpo[plot]'") from e
    scalars = read_scalars(run_dir)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.8), constrained_layout=True)
    drawn = 0
    styles = {"train": dict(lw=1.2), "eval": dict(marker="o", lw=1.5)}
    for ax, (title, lines) in zip(axes, panel_lines(scalars)):
        for split, name in lines:
            steps, values = zip(*scalars[f"{split}/{name}"])
            ax.plot(steps, values, label=f"{split} ({name.split('/')[-1]})", **styles[split])
            drawn += 1
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if not drawn:
        plt.close(fig)
        raise InputError(f"{run_dir}: none of {[n for _, names in PANELS for n in names]} was logged")
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    output = output or os.path.join(run_dir, "run.png")
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_rpo.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run's train.save directory (or its TensorBoard directory)")
    parser.add_argument("--output", default=None, help="the PNG to write (default RUN_DIR/run.png)")
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.run_dir, args.output)
    except (ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
