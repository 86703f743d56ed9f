"""How a training loss is normalised over the global batch: named loss terms and their global counts.

A training module's ``forward`` returns ``loss``, this micro batch's own mean (what evaluation
averages), and for training ``terms``: ``name -> LossTerm``, each a sum over this micro batch, the
name of the count it is divided by and its weight in the loss. The module's ``loss_counts(batch)``
gives those counts from the batch alone (before the forward pass): ``masked_tokens`` (MLM), ``clips``
(classification, FT2 MPC anchors), ``mpc_anchors`` (joint pretraining). The engine sums the counts
over every micro batch of the step on every rank (``global_loss_counts``), so that the step loss is
sum / global count per term, whatever the split over ranks and micro batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from af_train.distributed import sum_over_ranks


@dataclass(frozen=True)
class LossTerm:
    """One term of a training loss: ``total`` summed over this micro batch, to be divided by the global
    count named ``count_key`` (a key of the module's ``loss_counts``) and weighted by ``weight`` in the
    loss (0: reported, not trained on)."""

    total: torch.Tensor
    count_key: str
    weight: float


def global_loss_counts(module: nn.Module, batches: list[dict[str, Any]], device: torch.device) -> dict[str, float]:
    """Collective: what each loss term is divided by (``module.loss_counts``), summed over ``batches`` (one
    optimizer step's micro batches) and over every rank. At least 1, so a term with nothing to count is 0."""
    local: dict[str, torch.Tensor] = {}
    for batch in batches:
        for name, value in module.loss_counts(batch).items():
            local[name] = local.get(name, 0) + value.double()
    reduced = sum_over_ranks({n: local[n] for n in sorted(local)}, device)
    return {n: max(v, 1.0) for n, v in reduced.items()}
