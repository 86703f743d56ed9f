"""Learning-rate schedule: linear warmup, then cosine or linear decay to ``min_lr_ratio`` × lr.

The factor is a pure function of the optimizer step, so a resumed run (DeepSpeed restores the
scheduler's step count) continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from af_train.config import OptimConfig


class LRSchedule:
    """``factor(step)`` multiplies the base lr; ``step`` counts applied optimizer steps from 0."""

    def __init__(self, optim: OptimConfig, total_steps: int):
        self.schedule = optim.schedule
        self.warmup_steps = optim.warmup_steps
        self.min_ratio = optim.min_lr_ratio
        self.total_steps = max(total_steps, 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps  # the first step already uses a non-zero lr
        if self.schedule == "constant":
            return 1.0
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps, 0) / decay_steps, 1.0)
        if self.schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:  # linear
            shape = 1.0 - progress
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int) -> LambdaLR:
    schedule = LRSchedule(optim, total_steps)
    # A plain function (not the object) so the scheduler's state_dict stores only the step count: a
    # resumed run with a longer train.max_steps follows the new schedule, not the checkpoint's.
    return LambdaLR(optimizer, lambda step: schedule(step))
