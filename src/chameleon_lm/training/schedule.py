"""Learning-rate schedules, as multipliers of the peak learning rate (``LambdaLR`` style).

The state of a schedule is the step alone, so resuming needs nothing but the step counter.
"""

from __future__ import annotations

import math


def warmup_exp_decay(step: int, warmup: int, total: int, final_ratio: float = 0.01) -> float:
    """Chameleon's pre-training schedule: linear warm-up, then exponential decay toward 0.

    The multiplier rises linearly to 1 over ``warmup`` steps, then decays geometrically so that it reaches
    ``final_ratio`` at ``total`` steps (and keeps decaying after).
    """
    if warmup < 0 or total <= 0 or not 0 < final_ratio <= 1:
        raise ValueError("need warmup >= 0, total > 0 and 0 < final_ratio <= 1")
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    return final_ratio ** ((step - warmup) / span)


def warmup_cosine(step: int, warmup: int, total: int, final_ratio: float = 0.0) -> float:
    """Linear warm-up then cosine decay to ``final_ratio`` at ``total`` (the paper's SFT schedule)."""
    if warmup < 0 or total <= 0 or not 0 <= final_ratio <= 1:
        raise ValueError("need warmup >= 0, total > 0 and 0 <= final_ratio <= 1")
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


SCHEDULES = {"exp": warmup_exp_decay, "cosine": warmup_cosine}
