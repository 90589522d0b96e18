"""Win rates: ties count half, with the standard error over items, and what could not be judged.

The one way the project computes a win rate (the evaluation tool and the reproduction's program
judge both use :func:`tally`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["OUTCOMES", "SCORES", "Tally", "tally"]

OUTCOMES = ("win", "tie", "loss", "unparseable")
SCORES = {"win": 1.0, "tie": 0.5, "loss": 0.0}
"""An outcome's share of a win; an unparseable verdict has none: it is counted and left out."""


@dataclass(frozen=True)
class Tally:
    wins: int
    ties: int
    losses: int
    unparseable: int

    @property
    def judged(self) -> int:
        """Items with a verdict (wins, ties and losses)."""
        return self.wins + self.ties + self.losses

    @property
    def win_rate(self) -> float:
        """(wins + ties / 2) / judged; nan with nothing judged."""
        return (self.wins + 0.5 * self.ties) / self.judged if self.judged else float("nan")

    @property
    def standard_error(self) -> float:
        """The standard error of :attr:`win_rate` over items: the sample standard deviation of the
        per-item scores (1, 0.5, 0) over the square root of their count; nan below 2 items."""
        n = self.judged
        if n < 2:
            return float("nan")
        mean = self.win_rate
        squares = self.wins * (1 - mean) ** 2 + self.ties * (0.5 - mean) ** 2 + self.losses * mean ** 2
        return math.sqrt(squares / (n - 1) / n)

    def as_dict(self) -> dict:
        return {"wins": self.wins, "ties": self.ties, "losses": self.losses, "unparseable": self.unparseable,
                "judged": self.judged, "win_rate": self.win_rate, "standard_error": self.standard_error}


def tally(outcomes) -> Tally:
    """Count ``outcomes`` (each one of :data:`OUTCOMES`).

    Raises:
        ValueError: an outcome that is none of them.
    """
    counts = dict.fromkeys(OUTCOMES, 0)
    for outcome in outcomes:
        if outcome not in counts:
            raise ValueError(f"an outcome is one of {OUTCOMES}, got {outcome!r}")
        counts[outcome] += 1
    return Tally(counts["win"], counts["tie"], counts["loss"], counts["unparseable"])
