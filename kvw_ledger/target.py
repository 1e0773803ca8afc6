"""Forget to a target: the smallest gamma whose forget-probe accuracy reaches a target.

``forget --target-forget ACC`` asks for the least weakening that brings the forget
probe's greedy generation accuracy to at most ACC while the stability limits hold.
Each trial weakens a staged copy of HEAD (forward passes only) and measures it; the
search doubles or halves gamma from the one given until the target is bracketed,
then bisects geometrically. It assumes accuracy falls as gamma grows, which holds
for KVW's monotone gates up to measurement noise: the chosen gamma is the smallest
that was seen to reach the target, and every trial is recorded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from kvw_ledger.errors import BadInputError, TargetNotReachedError

__all__ = ["TargetSearch", "Trial", "search"]


@dataclass(frozen=True)
class TargetSearch:
    """What ``forget --target-forget`` searches for, and how far."""

    target: float  # forget-probe accuracy to reach (at most), 0..1, worst modality
    max_doublings: int = 8  # bracketing steps: gamma times or divided by 2 each
    steps: int = 6  # geometric bisection steps once the target is bracketed
    tolerance: float = 1.05  # stop bisecting when hi / lo falls below this ratio

    def __post_init__(self) -> None:
        if not (math.isfinite(self.target) and 0 <= self.target <= 1):
            raise BadInputError(f"--target-forget must be an accuracy in [0, 1], not {self.target}")


@dataclass(frozen=True)
class Trial:
    """One staged weakening measured."""

    gamma: float
    forget_acc: float  # worst-modality greedy generation accuracy on the forget probe
    stable: bool  # every stability check passed
    failed: list[str] = field(default_factory=list)  # the checks that failed, with figures

    def reached(self, target: float) -> bool:
        """Whether this trial's forget accuracy is at most ``target``."""
        return self.forget_acc <= target + 1e-12

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form, recorded in the forget entry."""
        return asdict(self)


def search(
    trial: Callable[[float], Trial], start: float, spec: TargetSearch
) -> tuple[Trial, list[Trial]]:
    """The smallest gamma seen to reach ``spec.target``, and every trial in order.

    ``trial(gamma)`` weakens a staged copy and measures it. The chosen trial must
    also be stable: a larger gamma only weakens more.

    Raises:
        TargetNotReachedError: no gamma tried reached the target, or the smallest that
            did failed a stability check; the message lists every trial.
    """
    trials: list[Trial] = []

    def run(gamma: float) -> Trial:
        measured = trial(gamma)
        trials.append(measured)
        return measured

    first = run(start)
    lo: float | None = None  # largest gamma seen not to reach the target
    hi: Trial | None = None  # smallest trial seen to reach it
    if first.reached(spec.target):
        hi = first
        for _ in range(spec.max_doublings):
            lower = run(hi.gamma / 2)
            if not lower.reached(spec.target):
                lo = lower.gamma
                break
            hi = lower
    else:
        lo = start
        for _ in range(spec.max_doublings):
            higher = run(lo * 2)
            if higher.reached(spec.target):
                hi = higher
                break
            lo = higher.gamma
    if hi is None:
        raise TargetNotReachedError(_refusal(f"no gamma up to {lo:g} reached forget accuracy {spec.target:g}", trials))
    if lo is not None:
        for _ in range(spec.steps):
            if hi.gamma / lo < spec.tolerance:
                break
            middle = run(math.sqrt(lo * hi.gamma))
            if middle.reached(spec.target):
                hi = middle
            else:
                lo = middle.gamma
    if not hi.stable:
        raise TargetNotReachedError(
            _refusal(
                f"the smallest gamma that reached forget accuracy {spec.target:g}, {hi.gamma:g}, "
                f"failed {', '.join(hi.failed)}",
                trials,
            )
        )
    return hi, trials


def _refusal(why: str, trials: list[Trial]) -> str:
    tried = "; ".join(
        f"gamma {t.gamma:.4g}: forget acc {t.forget_acc:.3f}{'' if t.stable else ' (unstable)'}"
        for t in sorted(trials, key=lambda t: t.gamma)
    )
    return (
        f"{why}; nothing was committed. Tried: {tried}. Widen --layers, start from another "
        "--gamma, raise the limits, or accept a higher --target-forget"
    )
