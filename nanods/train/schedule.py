"""Warmup-stable-decay learning-rate schedule."""

from __future__ import annotations


def lr_factor(step: int, total: int, warmup: int, decay_frac: float, decay_start: int | None = None) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based) of `total`.

    Linear warmup over `warmup` steps, flat, then a linear decay to 0 over the last
    decay_frac * total steps, or from `decay_start` on when a time budget fixed where the decay
    began. Changing `total` on resume re-plans only the tail.
    """
    if step < warmup:
        return (step + 1) / warmup
    start = total - int(decay_frac * total) if decay_start is None else decay_start
    if step < start or total <= start:
        return 1.0
    return max(0.0, (total - step) / (total - start))
