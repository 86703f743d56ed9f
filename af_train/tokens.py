"""Token ids (a contract shared by data, model and inference): codebook entries first, specials above."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # MLM label of an unmasked position (torch.nn.functional.cross_entropy skips it)
NUM_SPECIAL = 8  # PAD, MASK, BOA, EOA + 4 reserved (keeps the vocabulary a multiple of 8)


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens for a codebook of ``codebook_size`` entries (ids 0..size-1)."""

    codebook_size: int = 1024

    @property
    def pad(self) -> int:
        return self.codebook_size

    @property
    def mask(self) -> int:
        return self.codebook_size + 1

    @property
    def boa(self) -> int:  # beginning of audio
        return self.codebook_size + 2

    @property
    def eoa(self) -> int:  # end of audio
        return self.codebook_size + 3

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + NUM_SPECIAL


def frame_rows(rows: torch.Tensor, start: int | None, end: int | None) -> torch.Tensor:
    """[rows, n] -> [rows, n + specials]: a ``start`` column before and an ``end`` column after (None: none).

    How a clip's code rows become a sequence (BOA + codes + EOA), and its MLM targets (-100 at both ends).
    """
    parts = []
    if start is not None:
        parts.append(torch.full((rows.shape[0], 1), start, dtype=torch.long))
    parts.append(rows.long())
    if end is not None:
        parts.append(torch.full((rows.shape[0], 1), end, dtype=torch.long))
    return torch.cat(parts, dim=1)
