"""Sources: the label files of each supported data set layout, read into planned splits.

``--format``:

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

``add_source_arguments`` declares the options that select a source; ``af-prepare`` and
``af-fit-tokenizer`` share them, so both read exactly the same clips.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("csv", "audioset", "fsd50k", "esc50")
DEFAULT_CLIP_SECONDS = {"csv": 10.0, "audioset": 10.0, "fsd50k": 10.0, "esc50": 5.0}
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")


class LabelFileError(ValueError):
    """The label/metadata file itself is malformed (not a problem of one clip)."""




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


def check_split_name(name: str, where: str) -> str:
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
        split = check_split_name(r["split"], where) if has_split else args.split
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


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """The options that select the clips of a data set (shared by af-prepare and af-fit-tokenizer)."""
    p.add_argument("--format", required=True, choices=FORMATS, help="source layout")
    p.add_argument("--input", required=True, help="label file or data set root (see af_train.prepare.sources)")
    p.add_argument("--audio-dir", help="where the audio files are (default depends on the format)")
    p.add_argument("--labels", help="vocabulary file (csv: one name per line; audioset: class_labels_indices.csv)")
    p.add_argument("--split", default="train", help="split name for single-split sources (default train)")
    p.add_argument("--clip-seconds", type=float, help="clip length; default 10 (esc50: 5)")
    label_mode = p.add_mutually_exclusive_group()
    label_mode.add_argument("--multi-label", dest="multi_label", action="store_const", const=True, default=None,
                            help="csv: multi-hot targets (default: auto, multi-label when a row has several labels)")
    label_mode.add_argument("--single-label", dest="multi_label", action="store_const", const=False,
                            help="csv: exactly one class per clip")
    p.add_argument("--val-fold", type=int, default=5, help="esc50: fold used for validation (default 5)")
    p.add_argument("--test-fold", type=int, help="esc50: fold held out as test (default: none)")


def load_source(args: argparse.Namespace) -> Source:
    """The source ``args.format`` names, read from ``args.input``; raises :class:`LabelFileError`."""
    return LOADERS[args.format](args)
