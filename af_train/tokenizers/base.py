"""What every tokenizer is: audio at 24 kHz in, int16 code rows at 75 Hz out, plus an identity.

A tokenizer's ``identity()`` is a JSON-able dict recorded in each shard manifest (``tokenizer``) and in
the metadata of every weight file trained on those shards. Two identities name the same tokenizer when
their *key* fields agree (:func:`identity_key`): the kind, the weights (EnCodec: the checkpoint's
sha256 prefix or the random-init seed; mel-rvq: the fitted file's sha256), the number of rows and
the codebook size. Cosmetic fields (where a file lay, when it was fitted) are left out of the
comparison, so moving a fitted file does not make its shards incompatible.
"""

from __future__ import annotations

import math
import re
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

SAMPLE_RATE = 24_000
HOP_LENGTH = 320  # samples per code frame
FRAME_RATE = SAMPLE_RATE / HOP_LENGTH  # 75.0 Hz


class TokenizerError(ValueError):
    """A tokenizer that cannot be built, found, or mixed with another; the message names the fix."""


def frames_for_samples(num_samples: int) -> int:
    """Code frames a tokenizer emits for ``num_samples`` at 24 kHz (a partial last hop counts)."""
    return math.ceil(num_samples / HOP_LENGTH)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` → the GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@runtime_checkable
class Tokenizer(Protocol):
    """The interface every tokenizer kind implements (docs/ARCHITECTURE.md, "Contracts": tokenizer identity)."""

    kind: str
    sample_rate: int
    frame_rate: float
    num_rows: int
    codebook_size: int
    device: torch.device

    def encode_batch(self, clips: torch.Tensor | np.ndarray) -> torch.Tensor:
        """float clips [B, samples] mono at ``sample_rate`` → int16 codes [B, num_rows, frames] on the CPU."""
        ...

    def identity(self) -> dict[str, Any]:
        """JSON-able description that re-creates exactly this tokenizer (see the module doc)."""
        ...


_PRETRAINED = re.compile(r"pretrained sha256:([0-9a-f]+)")


def identity_key(identity: dict[str, Any]) -> tuple:
    """The fields of an identity that decide whether two codes are comparable."""
    kind = identity.get("kind")
    rows, codes = identity.get("rows"), identity.get("codes")
    if kind == "encodec":
        weights = str(identity.get("weights", ""))
        match = _PRETRAINED.match(weights)
        weights_key = f"sha256:{match.group(1)[:16]}" if match else weights  # the file name is cosmetic
        return (kind, identity.get("model"), weights_key, rows, codes)
    if kind == "mel-rvq":
        return (kind, identity.get("sha256"), rows, codes)
    return (kind, tuple(sorted((k, str(v)) for k, v in identity.items() if k not in ("file", "path"))))


def describe_identity(identity: dict[str, Any] | None) -> str:
    """One line naming a tokenizer for error messages."""
    if not identity:
        return "an unknown tokenizer (no identity recorded)"
    kind = identity.get("kind", "?")
    shape = f"{identity.get('rows', '?')} rows x {identity.get('codes', '?')} codes"
    if kind == "encodec":
        return f"encodec ({identity.get('weights', '?')}, {identity.get('bandwidth', '?')} kbps, {shape})"
    if kind == "mel-rvq":
        sha = str(identity.get("sha256", "?"))[:16]
        return f"mel-rvq (file {identity.get('file', '?')}, sha256 {sha}, {shape})"
    return f"{kind} ({identity})"


def check_same_tokenizer(a: dict[str, Any] | None, b: dict[str, Any] | None, what_a: str, what_b: str) -> None:
    """Raise :class:`TokenizerError` naming both sides when ``a`` and ``b`` are different tokenizers.

    An identity that is missing (``None`` or empty: a weight file written before identities were
    recorded) is not compared: there is nothing to compare it with.
    """
    if not a or not b:
        return
    if identity_key(a) != identity_key(b):
        raise TokenizerError(
            f"{what_a} and {what_b} come from different tokenizers: {what_a} from {describe_identity(a)}, "
            f"{what_b} from {describe_identity(b)}. Codes of different tokenizers mean different things; "
            "prepare every split (and pretrain every checkpoint) with the same tokenizer "
            "(af-prepare --tokenizer ...)"
        )
