"""Synthetic acoustic-code shards (MDS shards + ``manifest.json``, as af-prepare writes them) for the tests
and the benchmarks: the one place that writes them.

Two kinds of clips, one writer (``write_clips``):

- ``random_clips`` / ``write_random_shards``: uniform random codes and labels; for checking what the data
  pipeline does with the stored columns, and for throughput (``tools/benchmark_data.py``,
  ``tools/benchmark_train.py``).
- ``patterned_clips`` / ``write_patterned_split`` / ``write_patterned_dataset``: learnable clips. Each class
  owns a small set of codes and a period; a clip repeats a pattern drawn from its classes' codes, so MLM
  (predict a masked code from its neighbours) and classification both have signal a tiny model picks up in
  a few dozen steps (the engine tests).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from af_train.shards import CodecInfo, Manifest, shard_columns

SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}  # patterned clips: one random stream per split


def write_clips(out: Path, clips: Iterable[dict], *, frames: int, num_classes: int, multi_label: bool,
                weights: str, codebooks: int = 4, codebook_size: int = 1024, split: str = "train",
                size_limit: int = 1 << 14, hashes: list[str] | None = None) -> dict[str, dict]:
    """Write ``clips`` (samples with the MDS columns: id, codes, length, labels) into ``out`` with streaming's
    MDSWriter (shards of at most ``size_limit`` bytes; ``hashes`` recorded in index.json as af-prepare does),
    then its manifest; returns {clip id: the stored sample} for checking."""
    from streaming import MDSWriter

    out.mkdir(parents=True, exist_ok=True)
    stored: dict[str, dict] = {}
    recorded = {"hashes": hashes} if hashes else {}
    with MDSWriter(out=str(out), columns=shard_columns(codebooks, frames), size_limit=size_limit,
                   **recorded) as writer:
        for sample in clips:
            writer.write(sample)
            stored[sample["id"]] = sample
    Manifest(
        codec=CodecInfo(codebooks=codebooks, codebook_size=codebook_size, weights=weights),
        clip_seconds=frames / 75.0,
        frames=frames,
        labels=[f"class{c}" for c in range(num_classes)],
        multi_label=multi_label,
        source_format="csv",
        split=split,
        written=len(stored),
    ).save(out)
    return stored


def random_clips(num_clips: int, *, codebooks: int, frames: int, num_classes: int, multi_label: bool, seed: int,
                 min_length: int | None = None, labels_per_clip: list[list[int]] | None = None,
                 codebook_size: int = 1024) -> Iterator[dict]:
    """Random codes; full-length clips, or lengths drawn from [min_length, frames]; 1-3 labels per clip
    (multi-label), one, or ``labels_per_clip``."""
    rng = np.random.default_rng(seed)
    for i in range(num_clips):
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
        yield {"id": f"clip{i:05d}", "codes": codes, "length": np.int32(length), "labels": labels}


def write_random_shards(
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
    weights: str = "random-init seed 0",
) -> dict[str, dict]:
    """Write ``num_clips`` clips of ``random_clips`` into ``out``; returns {clip id: stored columns}."""
    clips = random_clips(num_clips, codebooks=codebooks, frames=frames, num_classes=num_classes,
                         multi_label=multi_label, seed=seed, min_length=min_length, labels_per_clip=labels_per_clip,
                         codebook_size=codebook_size)
    return write_clips(out, clips, frames=frames, num_classes=num_classes, multi_label=multi_label, weights=weights,
                       codebooks=codebooks, codebook_size=codebook_size, size_limit=size_limit)


def patterned_clips(num_clips: int, *, split: str, num_classes: int, multi_label: bool, frames: int,
                    codebooks: int, seed: int) -> Iterator[dict]:
    """Learnable clips: class ``i % num_classes`` (plus, multi-label, a second class for about 30% of the
    clips) sets the codes and the period of the repeated pattern; lengths from frames // 2 to frames."""
    rng = np.random.default_rng([seed, SPLIT_STREAMS.get(split, 3)])
    class_codes = [np.arange(16) + 16 * c for c in range(num_classes)]
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
        yield {"id": f"{split}{i:05d}", "codes": codes, "length": np.int32(length),
               "labels": np.asarray(labels, dtype=np.int32)}


def write_patterned_split(out: Path, num_clips: int, *, split: str, num_classes: int = 4, multi_label: bool = True,
                          frames: int = 30, codebooks: int = 4, seed: int = 0, size_limit: int = 1 << 13,
                          hashes: list[str] | None = None, shuffle_labels: bool = False) -> None:
    """One split of ``patterned_clips`` in ``out``. ``shuffle_labels``: the same clips, each written with the
    labels of another clip (a seeded permutation), so what a model learns from them is chance."""
    clips = list(patterned_clips(num_clips, split=split, num_classes=num_classes, multi_label=multi_label,
                                 frames=frames, codebooks=codebooks, seed=seed))
    if shuffle_labels:
        order = np.random.default_rng([seed, 0x5F]).permutation(num_clips)
        labels = [clips[j]["labels"] for j in order]
        clips = [{**clip, "labels": label} for clip, label in zip(clips, labels)]
    write_clips(out, clips, frames=frames, num_classes=num_classes, multi_label=multi_label,
                weights="synthetic (tests)", codebooks=codebooks, split=split, size_limit=size_limit, hashes=hashes)


def write_patterned_dataset(root: Path, *, multi_label: bool = True, sizes: dict[str, int] | None = None) -> Path:
    """``root/{train,val,test}`` of ``patterned_clips`` (256, 40 and 40 clips unless ``sizes`` says otherwise)."""
    for split, count in (sizes or {"train": 256, "val": 40, "test": 40}).items():
        write_patterned_split(root / split, count, split=split, multi_label=multi_label)
    return root
