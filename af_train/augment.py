"""Mixup for fine-tuning (``objective.mixup``), on token sequences.

AudioMAE and BEATs mix spectrograms; af_train's inputs are discrete codes, so the mix happens one
step later, on the input embeddings (the output of the encoder's embedding layer): with probability
``prob`` a training batch is mixed with itself in reverse order (clip i with clip B-1-i, as
AudioMAE pairs them), by ``lam ~ Beta(alpha, alpha)``:

    embeddings = lam * e + (1 - lam) * e[reversed]      targets = lam * y + (1 - lam) * y[reversed]

with multi-hot targets for multi-label data and one-hot ones for single-label data. The attention
mask becomes the union of the pair's masks (the shorter clip's padding is mixed with the longer
clip's tokens). Frozen FT2 row encoders get the same mix, so MPC still compares the same clips.

Randomness: both draws (apply?, lam) are made every training step from the process's global CPU
generator, whose state every checkpoint saves: a resumed run mixes exactly like an uninterrupted
one. Evaluation (``module.eval()``) never mixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Mixup:
    """One batch's mix: ``lam`` of each clip with ``1 - lam`` of its partner (the batch reversed)."""

    lam: float

    def inputs(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.lam * embeddings + (1.0 - self.lam) * embeddings.flip(0)

    def attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return torch.maximum(mask, mask.flip(0))

    def targets(self, labels: torch.Tensor, num_classes: int, multi_label: bool) -> torch.Tensor:
        """Soft targets [B, C]: from multi-hot [B, C] or class indices [B]."""
        dense = labels.float() if multi_label else torch.nn.functional.one_hot(labels, num_classes).float()
        return self.lam * dense + (1.0 - self.lam) * dense.flip(0)


def draw_mixup(prob: float, alpha: float) -> Mixup | None:
    """This step's mix, or None (not mixed this time). Always draws twice, so the RNG stream does not
    depend on the outcome."""
    apply = float(torch.rand(()))
    lam = float(torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample())
    return Mixup(lam) if apply < prob else None
