"""Every clip of one local shard directory in memory, in a fixed order (no streaming partitioning).

For work that needs a whole, small labelled split at once and the same clips on every rank: the
baselines (label prior, bag of codes) and the frozen-embedding probes. Training and evaluation read
shards through ``af_train.data.loader`` instead (streamed, partitioned over ranks).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from af_train.shards import Manifest


@dataclass
class Clips:
    """Clips of one split in the order stored: ``codes[i]`` is int16 [codebooks, valid frames]."""

    ids: list[str]
    codes: list[np.ndarray]
    labels: list[list[int]]
    manifest: Manifest

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: list[int] | np.ndarray) -> Clips:
        picked = [int(i) for i in indices]
        return Clips([self.ids[i] for i in picked], [self.codes[i] for i in picked],
                     [self.labels[i] for i in picked], self.manifest)


def read_clips(directory: str | os.PathLike) -> Clips:
    """All clips of a local shard directory (``af-prepare`` output), in the order stored.

    Raises ``DataError`` naming the directory when it is remote, missing, or holds a clip id twice.
    """
    from streaming import LocalDataset

    from af_train import remote as remote_io
    from af_train.data.dataset import DataError, load_manifest

    if remote_io.is_remote(str(directory)):
        raise DataError(f"'{directory}' is remote; this reads a local shard directory (copy it here first)")
    manifest = load_manifest(directory)
    dataset = LocalDataset(local=str(Path(directory)))
    rows = []
    for i in range(len(dataset)):
        sample = dataset[i]
        codes = np.asarray(sample["codes"])[:, : int(sample["length"])]
        labels = [int(v) for v in np.asarray(sample["labels"]).reshape(-1).tolist()]
        rows.append((str(sample["id"]), codes, labels))
    ids = [row[0] for row in rows]
    repeated = sorted(clip for clip, count in Counter(ids).items() if count > 1)
    if repeated:
        raise DataError(f"'{directory}' holds clip id(s) {repeated[:5]} more than once; re-run af-prepare")
    return Clips(ids, [row[1] for row in rows], [row[2] for row in rows], manifest)
