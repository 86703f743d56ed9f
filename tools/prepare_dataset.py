#!/usr/bin/env python3
"""Turn an audio data set into EnCodec-code MDS shards + ``manifest.json`` (one directory per split).

    python tools/prepare_dataset.py --format csv --input data/labels.csv --out shards/ \
        --codec-random-init 0 --clip-seconds 2 --workers 4

Sources (``--format``):

* ``csv``: header with ``path`` and ``labels`` (class names separated by ';', or integer indices);
  optional ``id`` (default: the path without extension) and ``split`` (one output subfolder per
  split). Relative paths are relative to the CSV's folder (or ``--audio-dir``). ``--labels FILE``
  fixes the vocabulary (one name per line); otherwise it is the sorted set of names in the file.
* ``audioset``: a segments CSV (``YTID, start_seconds, end_seconds, "positive_labels"``) plus
  ``class_labels_indices.csv`` (``--labels``, default: beside the segments CSV); audio files named
  by YTID (``<YTID>.wav``/``Y<YTID>.flac``/…) anywhere under ``--audio-dir``.
* ``fsd50k``: the ``FSD50K.ground_truth`` folder (dev.csv, eval.csv, vocabulary.csv); dev is split
  into train/val by its ``split`` column, eval becomes test; audio in ``FSD50K.dev_audio`` and
  ``FSD50K.eval_audio`` under ``--audio-dir`` (default: the ground-truth folder's parent).
* ``esc50``: the ESC-50 root (``meta/esc50.csv``, ``audio/``); ``--val-fold`` (default 5) becomes
  val, ``--test-fold`` (optional) test, the other folds train.

How it works: the clip list is planned deterministically from the label file, cut into chunks of
``--chunk-size`` clips; worker processes decode/resample, the main process encodes equal-length
batches with the codec (GPU when present) and writes each chunk as MDS shards into a temporary
folder that is renamed into place only when complete (``part-NNNNNN/``). An interrupted run
(Ctrl-C, kill -9) rerun with the same arguments skips the committed chunks and redoes the partial
one, so every accepted clip ends up in the shards exactly once. When all chunks of a split are
done, a merged ``index.json`` (streaming's merge_index layout), ``rejects.jsonl`` and finally
``manifest.json`` are written atomically. Every refused clip is logged with its reason and counted.

Object storage: ``--out s3://bucket/prefix`` (endpoint and credentials from the AWS environment,
``S3_ENDPOINT_URL`` for MinIO/Ceph) works the same way in a local staging folder and uploads each
committed chunk, then the merged index and the manifest last; the bucket is the resume state, so a
rerun on any machine continues where the uploads stopped (see ``RemoteOutput``). Each shard's sha1
and xxh64 go into ``index.json`` (``data.validate_hash`` checks them when streaming).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a plain script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from af_train import audio_io  # noqa: E402
from af_train.files import atomic_write, sha256_files  # noqa: E402
from af_train.shards import MANIFEST_NAME, Manifest, shard_columns  # noqa: E402

log = logging.getLogger("af_train.prepare")

FORMATS = ("csv", "audioset", "fsd50k", "esc50")
DEFAULT_CLIP_SECONDS = {"csv": 10.0, "audioset": 10.0, "fsd50k": 10.0, "esc50": 5.0}
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")
STATE_DIR = ".prepare"
CHUNK_PREFIX = "part-"
CHUNK_DONE = "chunk.json"
REJECTS_NAME = "rejects.jsonl"
PREPARE_VERSION = 1
SHARD_HASHES = ["sha1", "xxh64"]  # recorded per shard in index.json

# Reasons decided while planning (from the label file); audio reasons live in af_train.audio_io.
UNKNOWN_LABEL = "unknown_label"
NO_LABELS = "no_labels"
MULTIPLE_LABELS = "multiple_labels"
DUPLICATE_ID = "duplicate_id"


class LabelFileError(ValueError):
    """The label/metadata file itself is malformed (not a problem of one clip)."""


# ==================================================================================================
# Sources: label files → planned splits
# ==================================================================================================


@dataclass
class Entry:
    """One row of the source's label file, before validation."""

    id: str
    path: Path | None  # None when the audio file could not be located at planning time
    labels: list[str]  # label tokens as written (names, mids or integer indices)
    where: str  # "file:line" for messages


@dataclass
class Source:
    format: str
    vocabulary: list[str]
    multi_label: bool
    splits: dict[str, list[Entry]]  # split name -> entries in file order
    label_files: list[Path]
    token_to_index: dict[str, int] = field(default_factory=dict)  # extra aliases (mids, indices)
    description: str = ""
    split_folders: bool = True  # False: a single split written straight into --out


def _read_csv(path: Path, *, required: Iterable[str], header: bool = True) -> tuple[list[str], list[dict]]:
    """Read a CSV strictly: a missing column or a row with the wrong number of fields is an error."""
    if not path.is_file():
        raise LabelFileError(f"label file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelFileError(f"cannot read label file {path}: {exc}") from None
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip() and not line.startswith("#")]
    if not lines:
        raise LabelFileError(f"{path}: empty label file")
    try:
        rows = list(csv.reader([line for _, line in lines], skipinitialspace=True))
    except csv.Error as exc:
        raise LabelFileError(f"{path}: not valid CSV ({exc})") from None
    if header:
        columns = [c.strip() for c in rows[0]]
        body, numbers = rows[1:], [n for n, _ in lines[1:]]
    else:
        columns = [str(i) for i in range(len(rows[0]))]
        body, numbers = rows, [n for n, _ in lines]
    missing = [c for c in required if c not in columns]
    if missing:
        raise LabelFileError(
            f"{path}: missing column(s) {', '.join(missing)} in the header {columns}; expected columns "
            f"{', '.join(required)}"
        )
    records = []
    for number, row in zip(numbers, body):
        if len(row) != len(columns):
            raise LabelFileError(
                f"{path}:{number}: {len(row)} fields where the header has {len(columns)} ({columns}); "
                "quote fields that contain commas"
            )
        record = {c: v.strip() for c, v in zip(columns, row)}
        record["__line__"] = number
        records.append(record)
    return columns, records


def _read_vocabulary(path: Path) -> list[str]:
    """A vocabulary file: one class name per line, or a CSV with a ``name``/``display_name`` column."""
    if not path.is_file():
        raise LabelFileError(f"vocabulary file not found: {path} (--labels)")
    if path.suffix.lower() == ".csv":
        columns, records = _read_csv(path, required=())
        name_col = next((c for c in ("display_name", "name", "label", "category") if c in columns), None)
        if name_col is None:
            raise LabelFileError(f"{path}: no name/display_name column in the header {columns}")
        if "index" in columns:
            try:
                records.sort(key=lambda r: int(r["index"]))
            except ValueError:
                raise LabelFileError(f"{path}: the index column must hold integers") from None
        names = [r[name_col] for r in records]
    else:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise LabelFileError(f"{path}: empty vocabulary")
    dupes = [n for n, c in Counter(names).items() if c > 1]
    if dupes:
        raise LabelFileError(f"{path}: class name(s) listed twice: {', '.join(dupes[:5])}")
    return names


def _check_split_name(name: str, where: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
        raise LabelFileError(f"{where}: split name {name!r} is not usable as a folder name")
    return name


def load_csv_source(args: argparse.Namespace) -> Source:
    path = Path(args.input)
    columns, records = _read_csv(path, required=("path", "labels"))
    base = Path(args.audio_dir) if args.audio_dir else path.parent
    has_split = "split" in columns
    splits: dict[str, list[Entry]] = {}
    tokens_seen: list[str] = []
    for r in records:
        where = f"{path}:{r['__line__']}"
        if not r["path"]:
            raise LabelFileError(f"{where}: empty path")
        audio = Path(r["path"])
        audio = audio if audio.is_absolute() else base / audio
        labels = [t.strip() for t in r["labels"].split(";") if t.strip()]
        tokens_seen += labels
        clip_id = r.get("id") or str(Path(r["path"]).with_suffix("").as_posix())
        split = _check_split_name(r["split"], where) if has_split else args.split
        if not split:
            raise LabelFileError(f"{where}: empty split")
        splits.setdefault(split, []).append(Entry(clip_id, audio, labels, where))
    all_int = bool(tokens_seen) and all(re.fullmatch(r"\d+", t) for t in tokens_seen)
    if args.labels:
        vocabulary = _read_vocabulary(Path(args.labels))
        label_files = [path, Path(args.labels)]
    elif all_int:
        vocabulary = [str(i) for i in range(max(int(t) for t in tokens_seen) + 1)]
        label_files = [path]
    else:
        vocabulary = sorted(set(tokens_seen))
        label_files = [path]
    if not vocabulary:
        raise LabelFileError(f"{path}: no labels at all; the labels column is empty everywhere")
    aliases = {str(i): i for i in range(len(vocabulary))} if all_int else {}
    if args.multi_label is None:
        multi = any(len(e.labels) > 1 for entries in splits.values() for e in entries)
    else:
        multi = args.multi_label
    return Source("csv", vocabulary, multi, splits, label_files, aliases, str(path), split_folders=has_split)


def _index_audio_dir(root: Path) -> dict[str, Path]:
    """stem → file for every audio file under ``root`` (first one wins, in sorted order)."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() in AUDIO_EXTENSIONS and stem not in found:
                found[stem] = Path(dirpath) / name
    return found


def load_audioset_source(args: argparse.Namespace) -> Source:
    segments = Path(args.input)
    labels_file = Path(args.labels) if args.labels else None
    if labels_file is None:
        candidates = [segments.parent / "class_labels_indices.csv", segments.parent.parent / "class_labels_indices.csv"]
        labels_file = next((c for c in candidates if c.is_file()), None)
        if labels_file is None:
            raise LabelFileError(
                f"class_labels_indices.csv not found next to {segments} (looked in "
                f"{', '.join(str(c) for c in candidates)}); pass it with --labels FILE"
            )
    _, classes = _read_csv(labels_file, required=("index", "mid", "display_name"))
    try:
        classes.sort(key=lambda r: int(r["index"]))
    except ValueError:
        raise LabelFileError(f"{labels_file}: the index column must hold integers") from None
    vocabulary = [r["display_name"] for r in classes]
    aliases = {r["mid"]: i for i, r in enumerate(classes)}
    if not segments.is_file():
        raise LabelFileError(f"segments file not found: {segments}")
    lines = segments.read_text(encoding="utf-8").splitlines()
    audio_root = Path(args.audio_dir) if args.audio_dir else segments.parent
    if not audio_root.is_dir():
        raise LabelFileError(f"audio directory not found: {audio_root} (--audio-dir)")
    audio_index = _index_audio_dir(audio_root)
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            fields = next(csv.reader([line], skipinitialspace=True))
        except csv.Error as exc:
            raise LabelFileError(f"{segments}:{number}: not valid CSV ({exc})") from None
        if len(fields) != 4:
            raise LabelFileError(
                f"{segments}:{number}: expected 4 fields (YTID, start_seconds, end_seconds, "
                f'"positive_labels"), got {len(fields)}'
            )
        ytid, start = fields[0].strip(), fields[1].strip()
        mids = [m.strip() for m in fields[3].split(",") if m.strip()]
        audio = None
        for stem in (ytid, "Y" + ytid, f"{ytid}_{start}", f"Y{ytid}_{start}"):
            if stem in audio_index:
                audio = audio_index[stem]
                break
        if audio is None:  # keep a path for the rejects log; the worker reports it missing
            audio = audio_root / f"{ytid}.wav"
        entries.append(Entry(ytid, audio, mids, f"{segments}:{number}"))
    return Source(
        "audioset", vocabulary, True, {args.split: entries}, [segments, labels_file], aliases, str(segments),
        split_folders=False,
    )


def load_fsd50k_source(args: argparse.Namespace) -> Source:
    root = Path(args.input)
    if (root / "FSD50K.ground_truth").is_dir():
        root = root / "FSD50K.ground_truth"
    vocab_file = root / "vocabulary.csv"
    _, vocab_rows = _read_csv(vocab_file, required=("0", "1", "2"), header=False)
    try:
        vocab_rows.sort(key=lambda r: int(r["0"]))
    except ValueError:
        raise LabelFileError(f"{vocab_file}: first column must be the class index") from None
    vocabulary = [r["1"] for r in vocab_rows]
    aliases = {r["2"]: i for i, r in enumerate(vocab_rows)}  # mids
    audio_root = Path(args.audio_dir) if args.audio_dir else root.parent
    splits: dict[str, list[Entry]] = {"train": [], "val": [], "test": []}
    _, dev = _read_csv(root / "dev.csv", required=("fname", "labels", "split"))
    for r in dev:
        split = {"train": "train", "val": "val"}.get(r["split"])
        if split is None:
            raise LabelFileError(f"{root / 'dev.csv'}:{r['__line__']}: split must be train or val, got {r['split']!r}")
        path = audio_root / "FSD50K.dev_audio" / f"{r['fname']}.wav"
        labels = [t for t in r["labels"].split(",") if t]
        splits[split].append(Entry(r["fname"], path, labels, f"{root / 'dev.csv'}:{r['__line__']}"))
    _, evl = _read_csv(root / "eval.csv", required=("fname", "labels"))
    for r in evl:
        path = audio_root / "FSD50K.eval_audio" / f"{r['fname']}.wav"
        labels = [t for t in r["labels"].split(",") if t]
        splits["test"].append(Entry(r["fname"], path, labels, f"{root / 'eval.csv'}:{r['__line__']}"))
    files = [vocab_file, root / "dev.csv", root / "eval.csv"]
    return Source("fsd50k", vocabulary, True, splits, files, aliases, str(root))


def load_esc50_source(args: argparse.Namespace) -> Source:
    root = Path(args.input)
    meta = root if root.is_file() else root / "meta" / "esc50.csv"
    if root.is_file():
        root = meta.parent.parent
    _, records = _read_csv(meta, required=("filename", "fold", "target", "category"))
    names: dict[int, str] = {}
    for r in records:
        try:
            target, fold = int(r["target"]), int(r["fold"])
        except ValueError:
            raise LabelFileError(f"{meta}:{r['__line__']}: fold and target must be integers") from None
        if names.setdefault(target, r["category"]) != r["category"]:
            raise LabelFileError(
                f"{meta}:{r['__line__']}: target {target} is '{r['category']}' here but '{names[target]}' earlier"
            )
        r["fold"] = fold
    vocabulary = [names.get(i, f"class_{i}") for i in range(max(names) + 1)]
    folds = sorted({r["fold"] for r in records})
    for flag, fold in (("--val-fold", args.val_fold), ("--test-fold", args.test_fold)):
        if fold is not None and fold not in folds:
            raise LabelFileError(f"{flag} {fold}: {meta} has folds {folds}")
    if args.test_fold is not None and args.test_fold == args.val_fold:
        raise LabelFileError("--test-fold and --val-fold must differ")
    audio_root = Path(args.audio_dir) if args.audio_dir else root / "audio"
    splits: dict[str, list[Entry]] = {"train": [], "val": []}
    if args.test_fold is not None:
        splits["test"] = []
    for r in records:
        split = "val" if r["fold"] == args.val_fold else "test" if r["fold"] == args.test_fold else "train"
        entry = Entry(Path(r["filename"]).stem, audio_root / r["filename"], [r["target"]], f"{meta}:{r['__line__']}")
        splits[split].append(entry)
    aliases = {str(i): i for i in range(len(vocabulary))}
    return Source("esc50", vocabulary, False, splits, [meta], aliases, str(root))


LOADERS = {
    "csv": load_csv_source,
    "audioset": load_audioset_source,
    "fsd50k": load_fsd50k_source,
    "esc50": load_esc50_source,
}


# ==================================================================================================
# Planning: entries → tasks (clips to decode) and label-level rejects
# ==================================================================================================


@dataclass
class Task:
    order: int  # position among the split's entries (rejects log order)
    id: str
    path: str
    labels: list[int]


@dataclass
class Reject:
    order: int
    id: str
    path: str
    reason: str
    detail: str

    def record(self) -> dict[str, str]:
        return {"id": self.id, "path": self.path, "reason": self.reason, "detail": self.detail}


def plan_splits(source: Source) -> dict[str, tuple[list[Task], list[Reject]]]:
    """Resolve labels and ids. Duplicate ids are checked across all splits (a clip in two splits leaks)."""
    index = {name: i for i, name in enumerate(source.vocabulary)}
    seen: dict[str, str] = {}
    plans = {}
    for split, entries in source.splits.items():
        tasks, rejects = [], []
        for order, e in enumerate(entries):
            path = str(e.path)
            if e.id in seen:
                rejects.append(Reject(order, e.id, path, DUPLICATE_ID, f"{e.where}: id already used at {seen[e.id]}"))
                continue
            seen[e.id] = e.where
            if not e.labels:
                rejects.append(Reject(order, e.id, path, NO_LABELS, f"{e.where}: no labels"))
                continue
            resolved = [index.get(t, source.token_to_index.get(t)) for t in e.labels]
            unknown = [t for t, i in zip(e.labels, resolved) if i is None]
            if unknown:
                rejects.append(
                    Reject(order, e.id, path, UNKNOWN_LABEL, f"{e.where}: not in the vocabulary: {', '.join(unknown)}")
                )
                continue
            labels = sorted(set(resolved))
            if not source.multi_label and len(labels) > 1:
                rejects.append(
                    Reject(order, e.id, path, MULTIPLE_LABELS, f"{e.where}: {len(labels)} labels in a single-label set")
                )
                continue
            tasks.append(Task(order, e.id, path, labels))
        plans[split] = (tasks, rejects)
    return plans


# ==================================================================================================
# Decoding in worker processes
# ==================================================================================================

_WORKER_SETTINGS: dict[str, Any] = {}


def _init_worker(settings: dict[str, Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the main process
    import torch

    torch.set_num_threads(1)
    _WORKER_SETTINGS.update(settings)


def _decode(task: Task) -> tuple[str, Any]:
    """Worker body: ("ok", (samples, valid_samples)) or ("reject", (reason, detail)); never raises."""
    s = _WORKER_SETTINGS
    try:
        clip = audio_io.load_clip(
            task.path, sample_rate=s["sample_rate"], clip_seconds=s["clip_seconds"], silence_dbfs=s["silence_dbfs"]
        )
    except audio_io.AudioRejected as exc:
        return "reject", (exc.reason, exc.message)
    except Exception as exc:  # noqa: BLE001 - a broken file must not stop the run; it is logged
        return "reject", (audio_io.UNREADABLE, f"{task.path}: {type(exc).__name__}: {exc}")
    return "ok", (clip.samples, clip.valid_samples)


def ordered_map(fn, items: Iterator, pool, max_in_flight: int, timeout: float | None = None) -> Iterator:
    """Like ``pool.imap`` but with bounded look-ahead, so decoded audio never piles up in memory.

    A task whose worker does not answer within ``timeout`` seconds (a worker killed by a crash in
    a decoder library loses its task; the pool replaces the worker) yields ``("reject", ...)``
    instead of hanging the run.
    """
    if pool is None:
        for item in items:
            yield item, fn(item)
        return

    def collect(head, result):
        try:
            return head, result.get(timeout)
        except multiprocessing.TimeoutError:
            detail = f"no answer from the decoding worker within {timeout:g} s (decoder hung or crashed)"
            return head, ("reject", (audio_io.UNREADABLE, detail))

    pending: deque = deque()
    for item in items:
        pending.append((item, pool.apply_async(fn, (item,))))
        if len(pending) >= max_in_flight:
            yield collect(*pending.popleft())
    while pending:
        yield collect(*pending.popleft())


# ==================================================================================================
# Output directories, chunks, resume state
# ==================================================================================================


def split_dirs(out: Path, splits: list[str], split_folders: bool) -> dict[str, Path]:
    if not split_folders and len(splits) == 1:
        return {splits[0]: out}
    return {s: out / s for s in splits}


def chunk_name(k: int) -> str:
    return f"{CHUNK_PREFIX}{k:06d}"


def committed_chunks(split_dir: Path) -> dict[int, dict]:
    done = {}
    for child in split_dir.glob(f"{CHUNK_PREFIX}*"):
        marker = child / CHUNK_DONE
        if child.is_dir() and marker.is_file():
            done[int(child.name[len(CHUNK_PREFIX) :])] = json.loads(marker.read_text(encoding="utf-8"))
    return done



def prepare_split_dir(split_dir: Path, fingerprint: dict, overwrite: bool, shown: str | None = None) -> str:
    """Check/establish the resume state. Returns "fresh", "resume" or "complete".

    ``shown``: how to name the output in messages (the remote URL when staging for a bucket).
    """
    shown = shown or str(split_dir)
    state_file = split_dir / STATE_DIR / "state.json"
    ours = state_file.is_file() or (split_dir / MANIFEST_NAME).is_file()
    if split_dir.exists() and any(split_dir.iterdir()):
        if not ours:
            raise SystemExit(
                f"af-prepare: error: {shown} exists, is not empty and is not the output of a previous "
                "preparation; choose another --out"
            )
        if overwrite:
            shutil.rmtree(split_dir)
        elif state_file.is_file():
            previous = json.loads(state_file.read_text(encoding="utf-8"))
            if previous != fingerprint:
                diff = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
                raise SystemExit(
                    f"af-prepare: error: {shown} was prepared with different settings ({', '.join(diff)} "
                    "differ); rerun with the original arguments to resume, or pass --overwrite to start over"
                )
            if (split_dir / MANIFEST_NAME).is_file():
                return "complete"
        else:
            raise SystemExit(
                f"af-prepare: error: {shown} holds a manifest but no preparation state; pass --overwrite "
                "to rebuild it"
            )
    (split_dir / STATE_DIR).mkdir(parents=True, exist_ok=True)
    resumed = state_file.is_file()
    atomic_write(state_file, json.dumps(fingerprint, indent=2, sort_keys=True))
    for stale in (split_dir / STATE_DIR).glob("*.tmp"):  # partial chunks of an interrupted run
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
    return "resume" if resumed else "fresh"


class ChunkWriter:
    """Collects one chunk's clips, encodes them in batches and commits the chunk atomically."""

    def __init__(self, split_dir: Path, split: str, k: int, tasks: list[Task], codec, frames: int, batch_size: int):
        from streaming import MDSWriter

        self.final = split_dir / chunk_name(k)
        self.tmp = split_dir / STATE_DIR / (chunk_name(k) + ".tmp")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.split, self.k, self.tasks, self.codec = split, k, tasks, codec
        self.frames, self.batch_size = frames, batch_size
        self.remaining = len(tasks)
        # hashes: readers can verify every downloaded shard (data.validate_hash)
        self.writer = MDSWriter(out=str(self.tmp), columns=shard_columns(codec.codebooks, frames), hashes=SHARD_HASHES)
        self.batch: list[tuple[Task, np.ndarray, int]] = []
        self.rejects: list[Reject] = []
        self.written_ids: list[str] = []
        self.seconds = 0.0

    def add(self, task: Task, outcome: tuple[str, Any]) -> float:
        """Take one decoded clip (or its rejection); returns seconds of audio encoded by this call."""
        self.remaining -= 1
        status, payload = outcome
        if status == "reject":
            reason, detail = payload
            self.rejects.append(Reject(task.order, task.id, task.path, reason, detail))
        else:
            samples, valid = payload
            self.batch.append((task, samples, valid))
        encoded = 0.0
        if len(self.batch) >= self.batch_size or (self.remaining == 0 and self.batch):
            encoded = self._flush()
        return encoded

    def _flush(self) -> float:
        from af_train.codec import frames_for_samples

        codes = self.codec.encode_batch(np.stack([s for _, s, _ in self.batch]))
        if codes.shape[-1] != self.frames:
            raise RuntimeError(f"codec returned {codes.shape[-1]} frames, expected {self.frames}")
        encoded = 0.0
        for (task, _, valid), c in zip(self.batch, codes.numpy()):
            self.writer.write(
                {
                    "id": task.id,
                    "codes": np.ascontiguousarray(c, dtype=np.int16),
                    "length": np.int32(min(frames_for_samples(valid), self.frames)),
                    "labels": np.asarray(task.labels, dtype=np.int32),
                }
            )
            self.written_ids.append(task.id)
            encoded += valid / self.codec.sample_rate
        self.seconds += encoded
        self.batch = []
        return encoded

    def commit(self) -> dict:
        assert self.remaining == 0 and not self.batch
        self.writer.finish()
        if not self.written_ids:  # nothing accepted: no shards, only the bookkeeping
            for f in self.tmp.iterdir():
                f.unlink()
        with open(self.tmp / REJECTS_NAME, "w", encoding="utf-8") as f:
            for r in self.rejects:
                f.write(json.dumps({"order": r.order, **r.record()}) + "\n")
        info = {"chunk": self.k, "written": len(self.written_ids), "rejected": len(self.rejects)}
        info["seconds"] = self.seconds
        atomic_write(self.tmp / CHUNK_DONE, json.dumps(info))
        if self.final.exists():  # a leftover from an earlier attempt that never got its marker
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)  # the commit point
        return info

    def abandon(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def finalize_split(
    split_dir: Path,
    split: str,
    tasks: list[Task],
    planned_rejects: list[Reject],
    num_chunks: int,
    manifest_base: dict,
) -> Manifest:
    """Merge chunk indices, write the rejects log, then the manifest (last, atomically)."""
    shards, rejects, written, seconds = [], [], 0, 0.0
    for k in range(num_chunks):
        chunk = split_dir / chunk_name(k)
        info = json.loads((chunk / CHUNK_DONE).read_text(encoding="utf-8"))
        written += info["written"]
        seconds += info["seconds"]
        index = chunk / "index.json"
        if index.is_file():
            for shard in json.loads(index.read_text(encoding="utf-8"))["shards"]:
                for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                    if shard.get(key):
                        shard[key]["basename"] = f"{chunk.name}/{shard[key]['basename']}"
                shards.append(shard)
        with open(chunk / REJECTS_NAME, encoding="utf-8") as f:
            rejects += [json.loads(line) for line in f if line.strip()]
    rejects += [{"order": r.order, **r.record()} for r in planned_rejects]
    rejects.sort(key=lambda r: r["order"])
    atomic_write(split_dir / "index.json", json.dumps({"version": 2, "shards": shards}))
    atomic_write(
        split_dir / REJECTS_NAME,
        "".join(json.dumps({k: v for k, v in r.items() if k != "order"}) + "\n" for r in rejects),
    )
    counts = Counter(r["reason"] for r in rejects)
    manifest = Manifest(
        **manifest_base,
        split=split,
        written=written,
        rejected=dict(sorted(counts.items())),
        rejects_log=REJECTS_NAME,
        seconds_of_audio=round(seconds, 3),
    )
    manifest.save(split_dir)
    return manifest


class RemoteOutput:
    """``--out s3://bucket/prefix``: work in a local staging folder, upload every committed chunk.

    The bucket is the authority on what is done. Per split, ``.prepare/state.json`` (the settings
    fingerprint) is uploaded first; a chunk's shards are uploaded before its ``chunk.json``, which
    marks it committed in the bucket; ``index.json`` and ``rejects.jsonl`` follow when all chunks are
    in, ``manifest.json`` last (readers take a split without a manifest as unfinished). A rerun
    pulls that bookkeeping (small files, never shards) into the staging folder, so it resumes from
    what the bucket holds, on this machine or any other; a chunk committed locally whose upload was
    cut off is uploaded then. Uploaded shards are deleted locally: staging needs about one chunk.
    """

    def __init__(self, url: str, staging: Path, timeout: float = 120.0, retries: int = 2):
        self.url = url.rstrip("/")
        self.staging = staging
        self.timeout, self.retries = timeout, retries

    @staticmethod
    def default_staging(url: str) -> Path:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "af_train" / "prepare"
        return root / hashlib.sha1(url.rstrip("/").encode()).hexdigest()[:12]

    def remote_for(self, split_dir: Path):
        from af_train.remote import RemoteDir, join

        rel = split_dir.relative_to(self.staging).as_posix()
        return RemoteDir(join(self.url, "" if rel == "." else rel), timeout=self.timeout, retries=self.retries)

    def check(self) -> None:
        from af_train.remote import RemoteDir

        RemoteDir(self.url, timeout=self.timeout, retries=self.retries).check_bucket()

    def pull(self, split_dir: Path, overwrite: bool) -> None:
        """Make the staging folder of one split agree with the bucket (see the class docstring)."""
        remote = self.remote_for(split_dir)
        state_rel = f"{STATE_DIR}/state.json"
        if overwrite:
            deleted = remote.delete_tree()
            shutil.rmtree(split_dir, ignore_errors=True)
            log.info("--overwrite: deleted %d objects under %s", deleted, remote.url)
            return
        names = set(remote.list())
        if not names:  # nothing uploaded yet: local leftovers belong to an output that no longer exists
            shutil.rmtree(split_dir, ignore_errors=True)
            return
        if state_rel not in names:
            raise SystemExit(
                f"af-prepare: error: {remote.url} is not empty and holds no preparation state (.prepare/state.json)"
                "; choose another --out, or pass --overwrite to delete what is there"
            )
        local_state = split_dir / state_rel
        remote_state = remote.read_bytes(state_rel)
        if local_state.is_file() and local_state.read_bytes() != remote_state:
            shutil.rmtree(split_dir)  # staged for other settings: the bucket decides
        split_dir.joinpath(STATE_DIR).mkdir(parents=True, exist_ok=True)
        local_state.write_bytes(remote_state)
        if MANIFEST_NAME in names:
            remote.download(MANIFEST_NAME, split_dir / MANIFEST_NAME)
        else:
            (split_dir / MANIFEST_NAME).unlink(missing_ok=True)
        uploaded = {n.split("/", 1)[0] for n in names if n.startswith(CHUNK_PREFIX) and n.endswith(f"/{CHUNK_DONE}")}
        for chunk in sorted(split_dir.glob(f"{CHUNK_PREFIX}*")):
            if chunk.name in uploaded:
                continue
            if (chunk / CHUNK_DONE).is_file() and all((chunk / f).is_file() for f in _chunk_shard_files(chunk)):
                log.info("%s: uploading chunk %s (committed locally, upload cut off)", remote.url, chunk.name)
                self.push_chunk(chunk)
            else:
                shutil.rmtree(chunk)
        for name in sorted(uploaded):
            chunk = split_dir / name
            if (chunk / CHUNK_DONE).is_file():
                continue
            for rel in (f"{name}/index.json", f"{name}/{REJECTS_NAME}", f"{name}/{CHUNK_DONE}"):  # marker last
                if rel in names:
                    remote.download(rel, split_dir / rel)

    def push_state(self, split_dir: Path) -> None:
        self.remote_for(split_dir).upload(split_dir / STATE_DIR / "state.json", f"{STATE_DIR}/state.json")

    def push_chunk(self, chunk: Path) -> None:
        """Upload a committed chunk (shards first, chunk.json last), then drop its local shards."""
        remote = self.remote_for(chunk.parent)
        files = sorted(p for p in chunk.rglob("*") if p.is_file() and p.name != CHUNK_DONE)
        for path in [*files, chunk / CHUNK_DONE]:
            remote.upload(path, f"{chunk.name}/{path.relative_to(chunk).as_posix()}")
        for name in _chunk_shard_files(chunk):
            (chunk / name).unlink()

    def push_final(self, split_dir: Path) -> None:
        remote = self.remote_for(split_dir)
        for name in ("index.json", REJECTS_NAME, MANIFEST_NAME):  # manifest last: it marks the split complete
            remote.upload(split_dir / name, name)


def _chunk_shard_files(chunk: Path) -> list[str]:
    index = chunk / "index.json"
    if not index.is_file():
        return []
    shards = json.loads(index.read_text(encoding="utf-8"))["shards"]
    return [s[key]["basename"] for s in shards for key in ("raw_data", "zip_data") if s.get(key)]


# ==================================================================================================
# Command line
# ==================================================================================================


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="af-prepare",
        description="Encode an audio data set into EnCodec-code MDS shards (resumable; rerun the same "
        "command after an interruption).",
    )
    p.add_argument("--format", required=True, choices=FORMATS, help="source layout")
    p.add_argument("--input", required=True, help="label file or data set root (see the module doc)")
    p.add_argument("--out", required=True, help="output directory or object-store URL (s3://bucket/prefix; "
                   "endpoint and credentials from the AWS environment); one subfolder per split when there are several")
    p.add_argument("--audio-dir", help="where the audio files are (default depends on the format)")
    p.add_argument("--labels", help="vocabulary file (csv: one name per line; audioset: class_labels_indices.csv)")
    p.add_argument("--split", default="train", help="split name for single-split sources (default train)")
    p.add_argument("--clip-seconds", type=float, help="clip length; default 10 (esc50: 5)")
    codec = p.add_mutually_exclusive_group()
    codec.add_argument("--codec-checkpoint", help="EnCodec 24 kHz checkpoint file (default: torch hub cache)")
    codec.add_argument(
        "--codec-random-init", type=int, metavar="SEED", help="random codec from SEED (tests and demos only)"
    )
    p.add_argument("--bandwidth", type=float, default=3.0, help="kbps: 1.5/3/6/12/24 → 2/4/8/16/32 codebooks")
    p.add_argument("--device", help="codec device (default: cuda when available, else cpu)")
    p.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 1)),
                   help="decoding processes; 0 decodes in the main process")
    p.add_argument("--threads", type=int,
                   help="torch threads for encoding on the CPU (default: CPU cores minus --workers, at least 1)")
    p.add_argument("--batch-size", type=int, default=16, help="clips per codec batch")
    p.add_argument("--decode-timeout", type=float, default=600.0,
                   help="seconds a worker may spend on one file before it is rejected (default 600)")
    p.add_argument("--chunk-size", type=int, default=1024, help="clips per committed chunk (the resume unit)")
    p.add_argument("--silence-threshold-db", type=float, default=audio_io.DEFAULT_SILENCE_DBFS,
                   help="reject clips whose peak is below this level in dBFS (default -80)")
    p.add_argument("--keep-silent", action="store_true", help="keep all-silent clips")
    label_mode = p.add_mutually_exclusive_group()
    label_mode.add_argument("--multi-label", dest="multi_label", action="store_const", const=True, default=None,
                            help="csv: multi-hot targets (default: auto, multi-label when a row has several labels)")
    label_mode.add_argument("--single-label", dest="multi_label", action="store_const", const=False,
                            help="csv: exactly one class per clip")
    p.add_argument("--val-fold", type=int, default=5, help="esc50: fold used for validation (default 5)")
    p.add_argument("--test-fold", type=int, help="esc50: fold held out as test (default: none)")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier output in --out and start over")
    p.add_argument("--staging-dir", help="with --out s3://...: local working folder (default: under "
                   "~/.cache/af_train); it holds about one chunk of shards at a time")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _validate_args(args: argparse.Namespace) -> None:
    if args.workers < 0:
        raise SystemExit("af-prepare: error: --workers must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise SystemExit("af-prepare: error: --threads must be >= 1")
    if args.batch_size < 1 or args.chunk_size < 1:
        raise SystemExit("af-prepare: error: --batch-size and --chunk-size must be >= 1")
    if args.clip_seconds is not None and args.clip_seconds <= 0:
        raise SystemExit("af-prepare: error: --clip-seconds must be > 0")
    if not Path(args.input).exists():
        raise SystemExit(f"af-prepare: error: --input {args.input} does not exist")
    _check_split_name(args.split, "--split")


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _validate_args(args)
    import torch

    # Oversubscribed CPUs (encoder threads + decoding workers + anything else) make torch's
    # intra-op threads spin against each other: 10x slower encoding was seen on a busy 2-core box.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) - args.workers))
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace) -> int:
    try:
        source = LOADERS[args.format](args)
    except LabelFileError as exc:
        print(f"af-prepare: error: {exc}", file=sys.stderr)
        return 2
    clip_seconds = args.clip_seconds or DEFAULT_CLIP_SECONDS[args.format]
    plans = plan_splits(source)

    from af_train.codec import SAMPLE_RATE, AcousticCodec, CodecWeightsError, frames_for_samples

    try:
        codec = AcousticCodec(
            bandwidth=args.bandwidth,
            checkpoint=args.codec_checkpoint,
            random_init_seed=args.codec_random_init,
            device=args.device,
        )
    except (CodecWeightsError, ValueError) as exc:
        print(f"af-prepare: error: {exc}", file=sys.stderr)
        return 2
    frames = frames_for_samples(audio_io.clip_length(clip_seconds, SAMPLE_RATE))
    silence = None if args.keep_silent else args.silence_threshold_db
    fingerprint = {
        "version": PREPARE_VERSION,
        "format": args.format,
        "input": str(Path(args.input).resolve()),
        "audio_dir": str(Path(args.audio_dir).resolve()) if args.audio_dir else None,
        "label_files_sha256": sha256_files([f for f in source.label_files if f.is_file()])[:16],
        "clip_seconds": clip_seconds,
        "codec": asdict(codec.info()),
        "silence_threshold_db": silence,
        "multi_label": source.multi_label,
        "chunk_size": args.chunk_size,
        "batch_size": args.batch_size,
        "val_fold": args.val_fold if args.format == "esc50" else None,
        "test_fold": args.test_fold if args.format == "esc50" else None,
    }
    from af_train.remote import RemoteError, is_remote

    remote_out = None
    if is_remote(args.out):
        staging = Path(args.staging_dir) if args.staging_dir else RemoteOutput.default_staging(args.out)
        remote_out = RemoteOutput(args.out, staging)
        logging.getLogger("botocore").setLevel(logging.WARNING)  # not one line per credential lookup
        log.info("writing to %s through the staging folder %s", args.out, staging)
    out = remote_out.staging if remote_out else Path(args.out)
    dirs = split_dirs(out, list(plans), source.split_folders)
    shown = {split: remote_out.remote_for(d).url if remote_out else str(d) for split, d in dirs.items()}
    log.info("%s: %s → %s (%s)", args.format, source.description, args.out, codec)
    try:
        if remote_out:
            remote_out.check()
            for d in dirs.values():
                remote_out.pull(d, args.overwrite)
        states = {split: prepare_split_dir(d, fingerprint, args.overwrite, shown[split]) for split, d in dirs.items()}
        if remote_out:
            for split, d in dirs.items():
                if states[split] != "complete":
                    remote_out.push_state(d)
    except RemoteError as exc:
        print(f"af-prepare: error: {exc}", file=sys.stderr)
        return 2

    manifest_base = {
        "codec": codec.info(),
        "clip_seconds": clip_seconds,
        "frames": frames,
        "labels": source.vocabulary,
        "multi_label": source.multi_label,
        "source_format": args.format,
        "extra": {"source": source.description, "prepare": {k: v for k, v in fingerprint.items() if k != "codec"}},
    }

    # Work list: every task of every chunk not yet committed, in a deterministic order.
    work: list[tuple[str, int, Task]] = []
    chunk_tasks: dict[tuple[str, int], list[Task]] = {}
    total = done_before = 0
    for split, (tasks, _) in plans.items():
        chunks = [tasks[i : i + args.chunk_size] for i in range(0, len(tasks), args.chunk_size)]
        total += len(tasks)
        if states[split] == "complete":
            done_before += len(tasks)
            continue
        committed = committed_chunks(dirs[split])
        for k, chunk in enumerate(chunks):
            chunk_tasks[(split, k)] = chunk
            if k in committed:
                done_before += len(chunk)
            else:
                work += [(split, k, t) for t in chunk]
        if committed:
            log.info("%s: resuming, %d of %d chunks already committed", split, len(committed), len(chunks))

    settings = {"sample_rate": SAMPLE_RATE, "clip_seconds": clip_seconds, "silence_dbfs": silence}
    pool = None
    if args.workers > 0 and work:
        pool = multiprocessing.get_context("spawn").Pool(args.workers, initializer=_init_worker, initargs=(settings,))
    else:
        _WORKER_SETTINGS.update(settings)

    from tqdm import tqdm

    bar = tqdm(total=total, initial=done_before, unit="clip", desc="preparing", disable=args.quiet, smoothing=0.1)
    start = time.monotonic()
    audio_seconds = 0.0
    shown_rejects = 0
    writer: ChunkWriter | None = None
    interrupted = finished = False
    upload_error: RemoteError | None = None
    try:
        for (split, k, task), outcome in ordered_map(
            _decode_item, iter(work), pool, max_in_flight=max(4, 4 * max(args.workers, 1)), timeout=args.decode_timeout
        ):
            if writer is None or (writer.split, writer.k) != (split, k):
                writer = ChunkWriter(dirs[split], split, k, chunk_tasks[(split, k)], codec, frames, args.batch_size)
            audio_seconds += writer.add(task, outcome)
            if outcome[0] == "reject" and shown_rejects < 10:
                shown_rejects += 1
                bar.write(f"rejected {task.id}: {outcome[1][0]} ({outcome[1][1]})")
            if writer.remaining == 0:
                writer.commit()
                writer = None
                if remote_out:
                    remote_out.push_chunk(dirs[split] / chunk_name(k))
            elapsed = max(time.monotonic() - start, 1e-9)
            bar.update(1)
            clips_per_s = (bar.n - done_before) / elapsed
            bar.set_postfix_str(f"{clips_per_s:.1f} clips/s, {audio_seconds / elapsed:.1f}x realtime", refresh=False)
        finished = True
    except KeyboardInterrupt:
        interrupted = True
    except RemoteError as exc:
        upload_error = exc
    finally:  # on any failure: stop the workers, drop the partial chunk, keep the committed ones
        bar.close()
        if pool is not None:
            pool.close() if finished else pool.terminate()
            pool.join()
        if writer is not None:
            writer.abandon()
    if interrupted:
        print("\ninterrupted: committed chunks are kept; rerun the same command to continue", file=sys.stderr)
        return 130
    if upload_error is not None:
        print(f"af-prepare: error: {upload_error}\ncommitted chunks are kept; rerun the same command to continue",
              file=sys.stderr)
        return 1

    elapsed = time.monotonic() - start
    exit_code = 0
    print(f"\nsummary ({elapsed:.1f} s, {audio_seconds / max(elapsed, 1e-9):.1f}x realtime this run):")
    for split, (tasks, planned_rejects) in plans.items():
        num_chunks = (len(tasks) + args.chunk_size - 1) // args.chunk_size
        if states[split] == "complete":
            manifest = Manifest.load(dirs[split])
            note = " (already complete)"
        else:
            manifest = finalize_split(dirs[split], split, tasks, planned_rejects, num_chunks, manifest_base)
            note = ""
            if remote_out:
                try:
                    remote_out.push_final(dirs[split])
                except RemoteError as exc:
                    print(f"af-prepare: error: {exc}; rerun the same command to finish the upload", file=sys.stderr)
                    return 1
        print(
            f"  {split:>6}: written {manifest.written}, rejected {sum(manifest.rejected.values())} "
            f"[{_format_counts(manifest.rejected)}], {manifest.seconds_of_audio / 3600:.3f} h of audio "
            f"→ {shown[split]}{note}"
        )
        if manifest.written == 0:
            print(
                f"af-prepare: error: split '{split}' has no usable clip; see {dirs[split] / REJECTS_NAME}",
                file=sys.stderr,
            )
            exit_code = 1
    return exit_code


def _decode_item(item: tuple[str, int, Task]) -> tuple[str, Any]:
    return _decode(item[2])


if __name__ == "__main__":
    sys.exit(main())
