"""Warmup-stable-decay learning-rate schedule."""

from __future__ import annotations


def lr_factor(step: int, total: int, warmup: int, decay_frac: float) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based) of `total`.

    Linear warmup over `warmup` steps, flat, then a linear decay to 0 over the last
    decay_frac * total steps. Changing `total` on resume re-plans only the tail.
    """
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = int(decay_frac * total)
    decay_start = total - decay_steps
    if decay_steps == 0 or step < decay_start:
        return 1.0
    return max(0.0, (total - step) / decay_steps)
