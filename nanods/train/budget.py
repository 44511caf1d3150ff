"""Fitting a run into a wall-clock budget (`--time-budget 8m`).

The total step count is re-planned after every step from what the recent steps took, evals and
saves included, so a machine that slows down (other work, thermal limits) shortens the run
instead of overrunning the budget. The decay starts where the plan's last decay_frac begins, or
at once when a slowdown leaves less than that, and then runs linearly to zero over whatever steps
are left: the total may only shrink from there, so the decay never restarts.
"""

from __future__ import annotations

import statistics
import time
from collections import deque


class TimeBudget:
    """Plans the total number of optimizer steps that fit in `seconds` of wall time from now."""

    WINDOW = 10  # recent steps whose mean time predicts the next ones

    def __init__(self, seconds: float, max_total: int, decay_frac: float, eval_every: int) -> None:
        self.seconds, self.max_total, self.decay_frac, self.eval_every = seconds, max_total, decay_frac, eval_every
        self.start = time.perf_counter()
        self.step_times: deque[float] = deque(maxlen=self.WINDOW)
        self.eval_seconds = 0.0  # the last eval and save: spread over the steps between evals
        self.decay_start: int | None = None  # the step the decay began at, once it has

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def eval_took(self, seconds: float) -> None:
        self.eval_seconds = seconds

    def plan(self, step: int, total: int, step_seconds: float, first: bool) -> int:
        """The total to train to after `step` took `step_seconds` (the first step of a process pays one-off
        warm-up costs and is not counted); `step` itself when no further step fits."""
        if not first:
            self.step_times.append(step_seconds)
        if not self.step_times:
            return total
        # the last step alone when it was slower: a machine that just got busy stays busy for a while, and a
        # step cannot be cut short, so the cost of guessing low is a whole step past the budget
        per_step = max(statistics.fmean(self.step_times), self.step_times[-1]) + self.eval_seconds / self.eval_every
        fits = step + int(max(0.0, self.seconds - self.elapsed) / per_step)
        planned = max(step, min(self.max_total, fits))  # `step`: no time left for another one, stop here
        return planned if self.decay_start is None else min(planned, total)

    def settle(self, step: int, total: int) -> None:
        """Fix where the decay begins once `total` is agreed (by every rank): at the plan's last decay_frac,
        or at once when the total left less than that."""
        if self.decay_start is None and step >= total - int(self.decay_frac * total):
            self.decay_start = step  # the next step is the decay's first
