"""A job's progress as one number and one ETA: the share of the whole job's *time* done, and the
time left, from the library's plan.

The library says which phases a job runs and how many optimiser steps each takes
(`shiftable_lib.plan`); this module weighs them against each other in expected seconds and
follows the reports through them. The ETA is always `elapsed * (1 - fraction) / fraction`, so
the percentage and the ETA never tell two stories.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shiftable_lib.plan import (
    DEMO_CORPUS,
    EVALUATE,
    GATE,
    GENERALIST,
    IMPORT,
    SPECIALIST_PREFIX,
    TOKENIZER,
    PlannedPhase,
)

FRACTION_CAP = 0.99  # the estimate stays below 1 until the job has actually succeeded
# work without steps, as a share of the training steps of its stage (the phases up to the
# next evaluation): building the demo corpus and training the tokenizer weigh against the
# generalist's steps, evaluating and publishing against the steps of what it evaluates
STEPLESS_SHARE = {DEMO_CORPUS: 0.1, TOKENIZER: 0.05, EVALUATE: 0.1}
DEFAULT_SHARE = 0.1
# work whose time does not grow with the model: on an imported base, whose steps cost
# `PlannedPhase.scale` times the profile's own, its share shrinks by that much
SIZE_FREE = {DEMO_CORPUS, TOKENIZER, IMPORT}
# what a step of each kind of phase costs next to a generalist's, until the job has timed one
# of that kind (docs/benchmarks.md, "Progress: one ETA"): a branch trains attention only, the
# gate runs the trunk without gradients
STEP_COST = {GENERALIST: 1.0, SPECIALIST_PREFIX: 0.9, GATE: 0.4}
MIN_TIMED_S = 2.0  # a phase's own rate counts once it has run this long


def kind(phase: str) -> str:
    """The kind of a phase, whose steps cost alike: each specialist's branch is one kind."""
    return SPECIALIST_PREFIX if phase.startswith(SPECIALIST_PREFIX) else phase


@dataclass
class WeightedPhase:
    """A planned phase and its weight in steps, each step costing `cost` (relative units).
    `by_steps` phases replace their weight with the total they report; `reported` is False
    for a phase entered when the one before it ends."""

    name: str
    weight: float
    cost: float = 1.0
    by_steps: bool = True
    reported: bool = True


def weigh(plan: Iterable[PlannedPhase]) -> list[WeightedPhase]:
    """The phases of `plan` with their weights (see STEPLESS_SHARE, STEP_COST)."""
    phases = list(plan)
    weighted: list[WeightedPhase] = []
    stage_start = 0
    for end, phase in enumerate(phases):
        if phase.name != EVALUATE and end + 1 < len(phases):
            continue
        stage = phases[stage_start : end + 1]
        cost = sum(p.steps * STEP_COST.get(kind(p.name), 1.0) * p.scale for p in stage)
        scale = max((p.scale for p in stage if p.steps > 0), default=1.0)
        for p in stage:
            if p.steps > 0:
                step_cost = STEP_COST.get(kind(p.name), 1.0) * p.scale
                weighted.append(WeightedPhase(p.name, float(p.steps), step_cost, True, p.reported))
            else:  # a share of its stage's cost, as one step
                share = STEPLESS_SHARE.get(p.name, DEFAULT_SHARE)
                if p.name in SIZE_FREE:
                    share /= scale
                weighted.append(
                    WeightedPhase(p.name, 1.0, max(1.0, share * cost), False, p.reported)
                )
        stage_start = end + 1
    return weighted


class FractionEstimate:
    """The share of the whole job's time done, and the time left, from a plan of its phases.

    Each phase is expected to take its steps times its kind's seconds per step. Until the job
    has timed a step of some kind, that is the rate of what it has timed, scaled by STEP_COST
    (and before anything is timed, the steps alone decide the fraction). When the job plans
    again (the demo corpus brings specialists), the phases still to come are replaced. The
    fraction is kept monotonic and below `FRACTION_CAP` until the job succeeds, when the
    parent sets it to 1; the ETA follows from it and the time elapsed.
    """

    def __init__(self, plan: Iterable[PlannedPhase] = (), now: float = 0.0) -> None:
        self.phases = weigh(plan)
        self.cursor = -1  # index of the phase running now; -1 before the first
        self.fraction = 0.0
        self.started = now
        self.entered = now  # when the current phase began
        self.step = 0.0  # steps done in it
        self.rates: dict[str, float] = {}  # seconds per unit of cost, per kind timed
        self.eta_s = 0.0

    def update(self, phase: str, step: int, total: int, now: float) -> float:
        """Account for a report of `phase` at `step` of `total` at time `now` (seconds, any
        origin but the constructor's); an unplanned phase changes nothing."""
        start = max(self.cursor, 0)
        index = next(
            (i for i in range(start, len(self.phases)) if self.phases[i].name == phase), None
        )
        if index is None:
            return self.fraction
        if index != self.cursor:
            self._leave(now)
            self.cursor, self.entered = index, now
        planned = self.phases[index]
        if planned.by_steps and total > 0:
            planned.weight = float(total)
        self.step = min(1.0, step / total) * planned.weight if total > 0 else 0.0
        if self.step > 0 and now - self.entered >= MIN_TIMED_S:
            self.rates[kind(phase)] = (now - self.entered) / (self.step * planned.cost)
        self._estimate(now)
        return self.fraction

    def plan_rest(self, plan: Iterable[PlannedPhase]) -> None:
        """Replace the phases after the current one (all of them before the first)."""
        self.phases[self.cursor + 1 :] = weigh(plan)

    def enter_unreported(self, now: float) -> str | None:
        """When the current phase has ended: enter the next phase if the library does not
        report it, and return its name (else None)."""
        following = self.cursor + 1
        if following < len(self.phases) and not self.phases[following].reported:
            name = self.phases[following].name
            self.update(name, 0, 1, now)
            return name
        return None

    def _leave(self, now: float) -> None:
        """The current phase has ended: its rate, if it ran long enough to be timed."""
        if self.cursor < 0:
            return
        done, took = self.phases[self.cursor], now - self.entered
        if took > 0 and (took >= MIN_TIMED_S or kind(done.name) not in self.rates):
            self.rates[kind(done.name)] = took / (done.weight * done.cost)

    def _rate(self, phase: WeightedPhase) -> float | None:
        """Seconds per unit of cost of `phase`'s kind: its own if timed, else the mean of the
        kinds timed so far (None before any); for work that grows with the model (steps, an
        evaluation), of the kinds of steps timed, where there are any: the demo corpus or the
        import says little of a step's time."""
        own = self.rates.get(kind(phase.name))
        if own is not None:
            return own
        sized = phase.by_steps or phase.name not in SIZE_FREE
        steps = {kind(p.name) for p in self.phases if p.by_steps}
        stepped = [r for k, r in self.rates.items() if k in steps] if sized else []
        pool = stepped or list(self.rates.values())
        return sum(pool) / len(pool) if pool else None

    def _estimate(self, now: float) -> None:
        current = self.phases[self.cursor]
        left = [
            (current, current.weight - self.step),
            *((p, p.weight) for p in self.phases[self.cursor + 1 :]),
        ]
        elapsed = now - self.started
        rates = [self._rate(p) for p, _ in left]
        if elapsed <= 0 or any(r is None for r in rates):
            done = (
                sum(p.weight * p.cost for p in self.phases[: self.cursor])
                + self.step * current.cost
            )
            whole = sum(p.weight * p.cost for p in self.phases)
            fraction = done / whole if whole > 0 else 0.0
        else:
            remaining = sum(w * p.cost * r for (p, w), r in zip(left, rates, strict=True))
            fraction = elapsed / (elapsed + remaining)
        self.fraction = max(self.fraction, min(FRACTION_CAP, fraction))
        self.eta_s = elapsed * (1 - self.fraction) / self.fraction if self.fraction > 0 else 0.0
