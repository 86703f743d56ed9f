"""BERT-style masked-language-model corruption of acoustic-code sequences.

Masking is a pure function of ``(seed, epoch, sample index)``: each sample gets its own
``torch.Generator`` seeded from a hash of the three, never the global RNG. A resumed run, a run
with another world size or another number of DataLoader workers therefore masks every sample
exactly as an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch

from af_train.tokens import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "MaskingConfig", "mask_codes", "masking_generator", "num_to_mask"]


@dataclass(frozen=True)
class MaskingConfig:
    """How many real code tokens are corrupted and how (fractions of the corrupted positions)."""

    rate: float = 0.25  # fraction of the real code tokens of a row chosen for prediction
    mask_fraction: float = 0.8  # of the chosen: replaced by MASK
    random_fraction: float = 0.1  # of the chosen: replaced by a uniformly random code; rest kept

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"masking rate must be in [0, 1), got {self.rate}")
        fractions_ok = 0.0 <= self.mask_fraction <= 1.0 and 0.0 <= self.random_fraction <= 1.0
        if not fractions_ok or self.mask_fraction + self.random_fraction > 1.0 + 1e-9:
            raise ValueError(
                "mask_fraction and random_fraction must be in [0, 1] and sum to <= 1, "
                f"got {self.mask_fraction} and {self.random_fraction}"
            )


def masking_generator(seed: int, epoch: int, sample_index: int) -> torch.Generator:
    """A CPU generator seeded from a hash of (seed, epoch, sample_index); independent of the world."""
    digest = hashlib.blake2b(struct.pack("<qqq", seed, epoch, sample_index), digest_size=8).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return generator


def num_to_mask(num_tokens: int, rate: float) -> int:
    """Masked positions in a row of ``num_tokens`` real codes: round(rate * n), at least one if rate > 0."""
    if num_tokens == 0 or rate == 0.0:
        return 0
    return min(num_tokens, max(1, round(rate * num_tokens)))


def mask_codes(
    codes: torch.Tensor,
    config: MaskingConfig,
    *,
    mask_id: int,
    codebook_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt code rows for MLM.

    ``codes``: LongTensor [rows, n] of real code tokens only (no BOA/EOA/PAD, so those can never be
    masked). Every row is masked independently: its own positions and replacement draws, exactly
    ``num_to_mask(n, rate)`` positions per row. Returns ``(corrupted, labels)``, both [rows, n];
    ``labels`` holds the original code at chosen positions (also where the token was kept) and
    ``IGNORE_INDEX`` elsewhere.
    """
    if codes.dim() != 2:
        raise ValueError(f"mask_codes expects codes of shape [rows, frames], got {tuple(codes.shape)}")
    rows, length = codes.shape
    corrupted = codes.clone()
    labels = torch.full_like(codes, IGNORE_INDEX)
    count = num_to_mask(length, config.rate)
    if count == 0:
        return corrupted, labels
    for row in range(rows):
        positions = torch.randperm(length, generator=generator)[:count]
        choice = torch.rand(count, generator=generator)
        random_codes = torch.randint(0, codebook_size, (count,), generator=generator, dtype=codes.dtype)
        labels[row, positions] = codes[row, positions]
        replaced = corrupted[row, positions]
        as_mask = choice < config.mask_fraction
        as_random = ~as_mask & (choice < config.mask_fraction + config.random_fraction)
        replaced = torch.where(as_mask, torch.full_like(replaced, mask_id), replaced)
        replaced = torch.where(as_random, random_codes, replaced)
        corrupted[row, positions] = replaced
    return corrupted, labels
