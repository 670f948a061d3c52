"""The learning-rate schedule: linear warm-up, then constant or cosine down to a floor."""

from __future__ import annotations

import math
from collections.abc import Callable

from cogvx_dist.train.config import OptimConfig


def lr_lambda(optim: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step k."""
    warmup, floor = optim.warmup_steps, optim.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
