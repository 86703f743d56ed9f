"""Learnable synthetic acoustic-code shards for the engine tests (written with streaming's MDSWriter).

Each class owns a small set of codes and a period; a clip repeats a pattern drawn from its classes'
codes, so MLM (predict a masked code from its neighbours) and classification both have signal a tiny
model picks up in a few dozen steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from streaming import MDSWriter

from af_train.shards import CodecInfo, Manifest, shard_columns


def write_split(out: Path, num_clips: int, *, split: str, num_classes: int = 4, multi_label: bool = True,
                frames: int = 30, codebooks: int = 4, seed: int = 0, shuffle_labels: bool = False) -> None:
    """``shuffle_labels``: the same clips, each written with the labels of another clip (a random
    permutation): what a model learns from them is chance."""
    rng = np.random.default_rng([seed, {"train": 0, "val": 1, "test": 2}.get(split, 3)])
    clips = []
    class_codes = [np.arange(16) + 16 * c for c in range(num_classes)]
    out.mkdir(parents=True, exist_ok=True)
    with MDSWriter(out=str(out), columns=shard_columns(codebooks, frames), size_limit=1 << 13) as writer:
        for i in range(num_clips):
            primary = i % num_classes
            labels = [primary]
            if multi_label and rng.random() < 0.3:
                labels.append(int((primary + 1 + rng.integers(num_classes - 1)) % num_classes))
            labels = sorted(set(labels))
            period = 2 + primary
            motif = rng.choice(np.concatenate([class_codes[c] for c in labels]), size=period)
            row = np.resize(motif, frames)
            codes = np.stack([(row + 100 * k) % 1024 for k in range(codebooks)]).astype(np.int16)
            length = int(rng.integers(frames // 2, frames + 1))
            codes[:, length:] = 0
            clips.append((codes, length, labels))
        written_labels = [labels for _, _, labels in clips]
        if shuffle_labels:
            order = np.random.default_rng([seed, 0x5F]).permutation(num_clips)
            written_labels = [written_labels[j] for j in order]
        for i, ((codes, length, _), labels) in enumerate(zip(clips, written_labels)):
            writer.write({"id": f"{split}{i:05d}", "codes": codes, "length": np.int32(length),
                          "labels": np.asarray(labels, dtype=np.int32)})
    Manifest(
        codec=CodecInfo(codebooks=codebooks, weights="synthetic (tests)"),
        clip_seconds=frames / 75.0, frames=frames, labels=[f"class{c}" for c in range(num_classes)],
        multi_label=multi_label, source_format="csv", split=split, written=num_clips,
    ).save(out)


def write_dataset(root: Path, *, multi_label: bool = True, sizes: dict[str, int] | None = None) -> Path:
    for split, count in (sizes or {"train": 256, "val": 40, "test": 40}).items():
        write_split(root / split, count, split=split, multi_label=multi_label)
    return root
