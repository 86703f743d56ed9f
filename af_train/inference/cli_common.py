"""What af-predict and af-embed share: the model arguments, finding audio files, the failure summary.

Nothing here imports torch at module level: ``--help`` and argument errors are answered before the
model stack is imported (torch alone costs about two CPU-seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import os
import sys
from collections import Counter
from pathlib import Path

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".opus", ".w64", ".caf"}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a run directory, a model.pt (with --manifest) or an af-export-hf directory")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--checkpoint", help="a checkpoint directory of the run (default: the one selected on val)")
    group.add_argument("--weights", help="a module weights file of the run (e.g. RUN/final/model.pt)")
    parser.add_argument("--manifest", help="shard directory (or manifest.json) the model was trained on, when "
                                           "its recipe names shards that are not here (label names, tokenizer)")
    parser.add_argument("--tokenizer", help="weights of the tokenizer the model was trained with (file or folder), "
                                            "when they are not where the manifest says")
    parser.add_argument("--hop", type=float, help="seconds between windows (default: half the training clip)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per model batch (default 16)")
    parser.add_argument("--encode-batch-size", type=int,
                        help="clips per tokenizer batch (default: af-prepare's, so that codes equal the training "
                             "shards' bit for bit; partial batches are zero-padded to it)")
    # None: AudioTagger picks cuda when available, else cpu (resolved after parsing, so no torch import here)
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to the standard output (file descriptor 1, C libraries and loggers bound to it
    included) to the standard error: loading weights prints DeepSpeed's messages, and the standard output
    carries the results."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):  # print() to whatever sys.stdout is now
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def build_tagger(args: argparse.Namespace, **kwargs):
    from af_train.inference import AudioTagger, InferenceError
    from kernels.dispatch import backend_from_environment

    try:
        kernels = backend_from_environment(os.environ)  # AF_KERNELS (debugging): read once, here
    except ValueError as exc:
        raise InferenceError(str(exc)) from None
    with stdout_to_stderr():
        tagger = AudioTagger.load(args.model, checkpoint=args.checkpoint, weights=args.weights, manifest=args.manifest,
                                  tokenizer=args.tokenizer, device=args.device, hop_seconds=args.hop,
                                  batch_size=args.batch_size, encode_batch_size=args.encode_batch_size, **kwargs)
    if kernels is not None:
        tagger.encoder.kernels = kernels
    return tagger


def find_audio(arguments: list[str], recursive: bool) -> list[Path]:
    """Files as given (kept even when missing: they are reported), folders expanded to their audio files."""
    found: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found += sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
        else:
            found.append(path)
    return found


def read_csv_list(path: Path) -> tuple[list[Path], list[str]]:
    """(paths, ids) of a CSV with a ``path`` column (and optionally ``id``); relative paths are relative to
    the CSV's folder, as in af-prepare's csv format."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise SystemExit(f"{path}: needs a header with a 'path' column (and optionally 'id')")
        rows = list(reader)
    paths = [p if (p := Path(r["path"])).is_absolute() else path.parent / p for r in rows]
    ids = [r.get("id") or r["path"] for r in rows]
    return paths, ids


def progress(total: int, what: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc=what, disable=total < 2 or None, file=sys.stderr, dynamic_ncols=True)


class Failures:
    """Counts unusable inputs by reason and logs each one."""

    def __init__(self, log: logging.Logger):
        self.log = log
        self.by_reason: Counter[str] = Counter()

    def add(self, name: str, reason: str, message: str) -> None:
        self.by_reason[reason] += 1
        self.log.warning("skipped %s: %s (%s)", name, message, reason)

    @property
    def count(self) -> int:
        return sum(self.by_reason.values())

    def summary(self, done: int) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.by_reason.items())) or "none"
        return f"{done} file(s) processed, {self.count} skipped [{reasons}]"
