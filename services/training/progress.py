"""A job's progress as one number: the share of the whole job done, from the library's plan.

The library says which phases a job runs and how many optimiser steps each takes
(`shiftable_lib.plan`); this module only weighs them against each other and follows the
reports through them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shiftable_lib.plan import DEMO_CORPUS, EVALUATE, TOKENIZER, PlannedPhase

FRACTION_CAP = 0.99  # the estimate stays below 1 until the job has actually succeeded
# work without steps, as a share of the training steps of its stage (the phases up to the
# next evaluation): building the demo corpus and training the tokenizer weigh against the
# generalist's steps, evaluating and publishing against the steps of what it evaluates
STEPLESS_SHARE = {DEMO_CORPUS: 0.1, TOKENIZER: 0.05, EVALUATE: 0.1}
DEFAULT_SHARE = 0.1


@dataclass
class WeightedPhase:
    """A planned phase and its weight in training steps. `by_steps` phases replace their
    weight with the total they report; `reported` is False for a phase entered when the one
    before it ends."""

    name: str
    weight: float
    by_steps: bool = True
    reported: bool = True


def weigh(plan: Iterable[PlannedPhase]) -> list[WeightedPhase]:
    """The phases of `plan` with their weights (see STEPLESS_SHARE)."""
    phases = list(plan)
    weighted: list[WeightedPhase] = []
    stage_start = 0
    for end, phase in enumerate(phases):
        if phase.name != EVALUATE and end + 1 < len(phases):
            continue
        stage = phases[stage_start : end + 1]
        steps = sum(p.steps for p in stage)
        for p in stage:
            share = STEPLESS_SHARE.get(p.name, DEFAULT_SHARE)
            weight = float(p.steps) if p.steps > 0 else max(1.0, share * steps)
            weighted.append(WeightedPhase(p.name, weight, p.steps > 0, p.reported))
        stage_start = end + 1
    return weighted


class FractionEstimate:
    """The share of the whole job done, from a plan of the phases it will run.

    Each phase weighs its number of optimiser steps (a branch's is estimated until it reports
    its real total), work without steps a share of the steps around it (`weigh`). Within a
    phase progress is linear in steps. When the job plans again (the demo corpus brings
    specialists), the phases still to come are replaced. Steps of different phases do not cost
    the same time, so this is an estimate; it is kept monotonic (a corrected estimate never
    moves it back) and below `FRACTION_CAP` until the job succeeds, when the parent sets it
    to 1.
    """

    def __init__(self, plan: Iterable[PlannedPhase] = ()) -> None:
        self.phases = weigh(plan)
        self.cursor = -1  # index of the phase running now; -1 before the first
        self.fraction = 0.0

    def update(self, phase: str, step: int, total: int) -> float:
        """Account for a report of `phase` at `step` of `total`; an unplanned phase changes
        nothing."""
        start = max(self.cursor, 0)
        index = next(
            (i for i in range(start, len(self.phases)) if self.phases[i].name == phase), None
        )
        if index is None:
            return self.fraction
        self.cursor = index
        planned = self.phases[index]
        if planned.by_steps and total > 0:
            planned.weight = float(total)
        within = min(1.0, step / total) if total > 0 else 0.0
        done = sum(p.weight for p in self.phases[:index]) + planned.weight * within
        whole = sum(p.weight for p in self.phases)
        if whole > 0:
            self.fraction = max(self.fraction, min(FRACTION_CAP, done / whole))
        return self.fraction

    def plan_rest(self, plan: Iterable[PlannedPhase]) -> None:
        """Replace the phases after the current one (all of them before the first)."""
        self.phases[self.cursor + 1 :] = weigh(plan)

    def enter_unreported(self) -> str | None:
        """When the current phase has ended: enter the next phase if the library does not
        report it, and return its name (else None)."""
        following = self.cursor + 1
        if following < len(self.phases) and not self.phases[following].reported:
            name = self.phases[following].name
            self.update(name, 0, 1)
            return name
        return None
