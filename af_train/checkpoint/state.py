"""What makes a run resumable besides DeepSpeed's state: the progress counters and the RNG streams.

``Progress`` is saved in every checkpoint's ``af_meta.json``; the RNG state of each rank in its own
rank file (``af_train.checkpoint.files``).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Counters that make a run resumable (saved in every checkpoint)."""

    step: int = 0  # optimizer steps attempted (applied + skipped)
    samples: int = 0  # samples consumed, all ranks
    tokens: int = 0  # real (non-pad) tokens consumed, all ranks and rows
    epoch: int = 0
    skipped_steps: int = 0  # steps whose update was skipped (non-finite loss/gradients, fp16 overflow)
    nonfinite_steps: int = 0  # of those, skipped for a non-finite loss or gradient (not fp16 scaling)
    consecutive_nonfinite: int = 0
    best: dict[str, Any] = field(default_factory=dict)

    def count_step(self, samples: int, tokens: int, applied: bool, nonfinite: bool) -> None:
        """Count one optimizer step (a skipped one too); a non-finite step is logged as a warning."""
        self.step += 1
        self.samples += samples
        self.tokens += tokens
        self.skipped_steps += not applied
        if nonfinite:
            self.nonfinite_steps += 1
            self.consecutive_nonfinite += 1
            log.warning("step %d skipped: non-finite loss or gradient norm (%d in a row, %d in total)",
                        self.step, self.consecutive_nonfinite, self.nonfinite_steps)
        elif applied:
            self.consecutive_nonfinite = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
