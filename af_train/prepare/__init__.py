"""Data preparation: audio data sets → tokenizer codes in MDS shards + ``manifest.json``.

One module per job:

* :mod:`~af_train.prepare.sources`: the label files of each data set layout (csv, audioset, fsd50k, esc50);
* :mod:`~af_train.prepare.planning`: entries → tasks and label-level rejects;
* :mod:`~af_train.prepare.decoding`: audio files → clips in worker processes;
* :mod:`~af_train.prepare.encoding`: one rank's part: decoded clips → encoded batches → committed chunks;
* :mod:`~af_train.prepare.writing`: chunked, atomic, resumable writing, merged index and manifest;
* :mod:`~af_train.prepare.remote_output`: ``--out s3://...`` through a staging folder;
* :mod:`~af_train.prepare.parts`, :mod:`~af_train.prepare.ranks`: several ranks (who owns which chunk; the
  resume state rank 0 sets up, the wait for every part; the launcher itself is af_train.launcher);
* :mod:`~af_train.prepare.merging`: the merged dataset of every split and the run's summary;
* :mod:`~af_train.prepare.cli`: ``af-prepare`` (also ``python3 -m af_train.prepare``);
* :mod:`~af_train.prepare.fit_tokenizer`: ``af-fit-tokenizer`` (fits mel-rvq on a source's train split).
"""

from af_train.prepare.cli import build_parser, main
from af_train.prepare.decoding import ordered_map
from af_train.prepare.planning import plan_splits
from af_train.prepare.sources import (
    LOADERS,
    LabelFileError,
    load_audioset_source,
    load_csv_source,
    load_esc50_source,
    load_fsd50k_source,
)
from af_train.prepare.writing import ChunkWriter

__all__ = [
    "LOADERS",
    "ChunkWriter",
    "LabelFileError",
    "build_parser",
    "load_audioset_source",
    "load_csv_source",
    "load_esc50_source",
    "load_fsd50k_source",
    "main",
    "ordered_map",
    "plan_splits",
]
