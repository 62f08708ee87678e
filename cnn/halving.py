"""Successive halving: the rungs, and which variants stop at one.

Rungs are at r, r*eta, r*eta^2, ... epochs, below `epochs`. At a rung the variants still
training are ranked by their score (the mean over repeats of the best validation accuracy
so far, on the same images); the top ceil(n / eta) go on, the others stop. Each stop carries
the paired difference with the leader and its interval, so a reader sees whether it was
clear-cut. No decision is made while any running variant lacks a score at the rung.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

from cnn.stats import Comparison


def rungs(min_epochs: int, factor: int, epochs: int) -> list[int]:
    """The epochs at which variants are ranked: r, r*eta, ... while below `epochs`."""
    if min_epochs < 1:
        raise ValueError(f"halving_min_epochs: expected at least 1, found {min_epochs}")
    if factor < 2:
        raise ValueError(f"halving_factor: expected at least 2, found {factor}")
    out, r = [], min_epochs
    while r < epochs:
        out.append(r)
        r *= factor
    return out


def kept(n: int, factor: int) -> int:
    """How many of `n` ranked variants go on: ceil(n / eta), at least one."""
    return max(1, math.ceil(n / factor))


@dataclass(frozen=True)
class Stop:
    """Why one variant stopped at a rung."""
    variant: str
    rung: int  # 1 for the first
    epoch: int
    score: float
    cutoff: float  # the lowest score that went on
    leader: str
    leader_score: float
    difference: float  # score's paired difference with the leader (negative)
    ci: tuple[float, float]
    distinguishable: bool

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci"] = list(self.ci)
        d["sentence"] = self.sentence
        return d

    @property
    def sentence(self) -> str:
        clear = "clearly behind" if self.ci[1] < 0 else "not distinguishable from"
        return (f"{self.variant} stopped at rung {self.rung} (epoch {self.epoch}): val_acc {self.score:.4f}, the "
                f"lowest that went on {self.cutoff:.4f}; {clear} the leader {self.leader} ({self.variant} minus "
                f"{self.leader}: {self.difference * 100:+.2f} points, 95% interval {self.ci[0] * 100:+.2f} to "
                f"{self.ci[1] * 100:+.2f})")


class MissingScores(ValueError):
    """A running variant has no score at the rung yet: nothing is decided."""


def decide(rung: int, epoch: int, scores: dict[str, float | None], factor: int,
           paired: Callable[[str, str], Comparison]) -> tuple[list[str], list[Stop]]:
    """(the variants that go on, best first; the stops). `scores`: every variant still
    training, None for one that has not reached the rung. `paired(a, b)`: a minus b, paired on
    the validation images. Ties keep the earlier variant in `scores`' order."""
    missing = [v for v, s in scores.items() if s is None]
    if missing:
        raise MissingScores(f"rung {rung} (epoch {epoch}): no score yet for {', '.join(missing)}; "
                            "no variant is stopped on missing data")
    order = {v: i for i, v in enumerate(scores)}
    ranked = sorted(scores, key=lambda v: (-scores[v], order[v]))
    n_keep = kept(len(ranked), factor)
    go_on, stop = ranked[:n_keep], ranked[n_keep:]
    leader, cutoff = ranked[0], scores[ranked[n_keep - 1]]
    stops = []
    for v in stop:
        c = paired(v, leader)
        stops.append(Stop(variant=v, rung=rung, epoch=epoch, score=scores[v], cutoff=cutoff, leader=leader,
                          leader_score=scores[leader], difference=c.difference, ci=tuple(c.ci),
                          distinguishable=c.distinguishable))
    return go_on, stops
