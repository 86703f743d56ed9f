"""Synthetic acoustic-code shards for the data tests: random codes written with streaming's MDSWriter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from streaming import MDSWriter

from af_train.shards import CodecInfo, Manifest, shard_columns


def write_shards(
    out: Path,
    num_clips: int,
    *,
    codebooks: int = 4,
    frames: int = 40,
    num_classes: int = 5,
    multi_label: bool = True,
    seed: int = 0,
    min_length: int | None = None,
    size_limit: int = 1 << 14,
    labels_per_clip: list[list[int]] | None = None,
    codebook_size: int = 1024,
) -> dict[str, dict]:
    """Write ``num_clips`` random clips into ``out``; returns {clip id: stored columns} for checking."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    stored: dict[str, dict] = {}
    with MDSWriter(out=str(out), columns=shard_columns(codebooks, frames), size_limit=size_limit) as writer:
        for i in range(num_clips):
            clip_id = f"clip{i:05d}"
            codes = rng.integers(0, codebook_size, size=(codebooks, frames), dtype=np.int16)
            length = frames if min_length is None else int(rng.integers(min_length, frames + 1))
            codes[:, length:] = 0  # padding frames, as af-prepare writes them
            if labels_per_clip is not None:
                labels = np.asarray(labels_per_clip[i], dtype=np.int32)
            elif multi_label:
                count = int(rng.integers(1, 4))
                labels = np.sort(rng.choice(num_classes, size=count, replace=False)).astype(np.int32)
            else:
                labels = np.asarray([rng.integers(0, num_classes)], dtype=np.int32)
            sample = {"id": clip_id, "codes": codes, "length": np.int32(length), "labels": labels}
            writer.write(sample)
            stored[clip_id] = sample
    Manifest(
        codec=CodecInfo(codebooks=codebooks, codebook_size=codebook_size, weights="random-init seed 0"),
        clip_seconds=frames / 75.0,
        frames=frames,
        labels=[f"class{c}" for c in range(num_classes)],
        multi_label=multi_label,
        source_format="csv",
        written=num_clips,
    ).save(out)
    return stored
