"""Tokenizers: audio → discrete code rows at 75 Hz, one module per kind, one interface (``Tokenizer``).

* ``encodec`` (:mod:`af_train.tokenizers.encodec`): EnCodec 24 kHz with the official weights; a
  random-initialised variant exists only for plumbing tests (``--codec-random-init``).
* ``mel-rvq`` (:mod:`af_train.tokenizers.mel_rvq`): log-mel frames quantised by a residual k-means
  fitted on a training split (``af-fit-tokenizer``), stored as one ``.safetensors`` file.

:func:`load_tokenizer` builds one from what a user types (``encodec`` or a fitted file);
:func:`tokenizer_from_identity` re-creates exactly the one a manifest or checkpoint recorded;
:func:`check_same_tokenizer` refuses to mix codes of two different tokenizers.
Audio decoding for all of them is in :mod:`af_train.tokenizers.audio_io`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from af_train.files import sha256_file
from af_train.tokenizers.base import (
    FRAME_RATE,
    HOP_LENGTH,
    SAMPLE_RATE,
    Tokenizer,
    TokenizerError,
    check_same_tokenizer,
    describe_identity,
    frames_for_samples,
    identity_key,
)

__all__ = [
    "FRAME_RATE",
    "HOP_LENGTH",
    "KINDS",
    "SAMPLE_RATE",
    "Tokenizer",
    "TokenizerError",
    "check_same_tokenizer",
    "describe_identity",
    "frames_for_samples",
    "identity_key",
    "load_tokenizer",
    "tokenizer_from_identity",
]

KINDS = ("encodec", "mel-rvq")


def load_tokenizer(spec: str | Path, device: str | torch.device | None = None) -> Tokenizer:
    """``"encodec"`` (official weights from torch hub's cache; ``CodecWeightsError`` says how to get
    them) or the path of a fitted mel-rvq file (``.safetensors``)."""
    if str(spec) == "encodec":
        from af_train.tokenizers.encodec import AcousticCodec

        return AcousticCodec(device=device)
    path = Path(spec)
    if not path.is_file():
        raise TokenizerError(
            f"tokenizer {str(spec)!r}: no such file; give 'encodec' or the path of a tokenizer fitted with "
            "af-fit-tokenizer (python3 -m af_train.prepare.fit_tokenizer --kind mel-rvq ... --out FILE)"
        )
    from af_train.tokenizers.mel_rvq import MelRVQTokenizer

    return MelRVQTokenizer.load(path, device=device)


def tokenizer_from_identity(
    identity: dict[str, Any], search_paths: Iterable[str | Path] = (), device: str | torch.device | None = None
) -> Tokenizer:
    """Exactly the tokenizer ``identity`` records, or :class:`TokenizerError` naming what is missing.

    A fitted mel-rvq file is looked for at its recorded path, then by its file name in each of
    ``search_paths`` (a folder, or a file); its sha256 must match. EnCodec weights are matched by
    their sha256 prefix or random-init seed. Another tokenizer is never substituted.
    """
    kind = identity.get("kind") if isinstance(identity, dict) else None
    search_paths = [Path(p) for p in search_paths]
    if kind == "encodec":
        from af_train.tokenizers.encodec import codec_from_identity

        return codec_from_identity(identity, search_paths, device)
    if kind == "mel-rvq":
        from af_train.tokenizers.mel_rvq import MelRVQTokenizer

        wanted = str(identity.get("sha256", ""))
        recorded = Path(identity["file"]) if identity.get("file") else None
        candidates = [recorded] if recorded is not None else []
        for p in search_paths:
            candidates += [p] if p.is_file() else [p / recorded.name] if recorded is not None else []
        for path in candidates:
            if path.is_file() and sha256_file(path) == wanted:
                return MelRVQTokenizer.load(path, device=device)
        looked = ", ".join(str(c) for c in candidates) or "nowhere (no file recorded, no search path)"
        raise TokenizerError(
            f"the mel-rvq tokenizer these codes were made with (sha256 {wanted[:16]}, file "
            f"{identity.get('file')}) is not here (looked in: {looked}); copy that fitted file beside the "
            "data or pass its folder"
        )
    raise TokenizerError(f"unknown tokenizer kind {kind!r} in identity {identity!r}; known kinds: {', '.join(KINDS)}")
