"""af-predict: label audio files of any length with a trained model.

    af-predict MODEL AUDIO... [--recursive] [--top-k 5] [--threshold auto|X] [--format table|jsonl|csv]
               [--out FILE [--overwrite]] [--windows] [--aggregate mean|max] [--hop S] [--batch-size N] [--device DEV]
               [--checkpoint DIR | --weights FILE] [--manifest DIR] [--tokenizer PATH] [--keep-going]

MODEL: a run directory (the checkpoint selected on validation unless --checkpoint/--weights), a model.pt
with the manifest of its shards, or an af-export-hf directory. AUDIO: files or folders (audio files in
them; --recursive descends). Each file is cut into windows of the training clip length (hop: half of
it); the window probabilities are averaged (--aggregate max: their maximum) into the file's scores.

Predicted labels: for a multi-label model, the classes whose score reaches the threshold; ``auto`` (the
default) uses the per-class thresholds chosen for best F1 on the validation split during training
(0.5 for a class without one, or for all when the run stored none). For a single-label model: the top
class (if its probability reaches a threshold given as a number).

Unreadable, missing, silent or too-short files are reported with the reason, counted in the summary
and skipped; the exit status is 1 when any file was skipped, unless --keep-going. Files that are used
but look wrong (a WAV cut shorter than its header says, float samples beyond full scale) are warned
about and counted. --out is checked before the model loads: it is never one of the inputs, and an
existing file is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from af_train.files import output_problem
from af_train.inference.cli_common import (
    Failures,
    add_model_arguments,
    build_tagger,
    find_audio,
    positive_int,
    progress,
)

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="af-predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("audio", nargs="+", help="audio files or folders")
    parser.add_argument("--recursive", action="store_true", help="look for audio in sub-folders too")
    parser.add_argument("--top-k", type=positive_int, default=5, help="classes shown per file (default 5)")
    parser.add_argument("--threshold", default="auto", help="'auto' (per-class, chosen on val) or a probability")
    parser.add_argument("--format", choices=["table", "jsonl", "csv"], default="table")
    parser.add_argument("--out", help="write here instead of the standard output")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file (never an input)")
    parser.add_argument("--windows", action="store_true", help="also give every window's scores with its times")
    parser.add_argument("--aggregate", choices=["mean", "max"], default="mean", help="windows -> file scores")
    parser.add_argument("--keep-going", action="store_true", help="exit 0 even when files were skipped")
    args = parser.parse_args(argv)
    if args.threshold != "auto":
        try:
            value = float(args.threshold)
        except ValueError:
            parser.error(f"--threshold must be 'auto' or a number, got {args.threshold!r}")
        if not 0.0 <= value <= 1.0:
            parser.error(f"--threshold is a probability in [0, 1], got {value}")
    return args


def class_thresholds(tagger: Any, threshold: str) -> np.ndarray:
    """The threshold of every class for ``--threshold``."""
    count = len(tagger.labels)
    if threshold != "auto":
        return np.full(count, float(threshold))
    stored = tagger.thresholds
    if stored is None:
        if tagger.multi_label:
            log.warning("%s stores no per-class thresholds (chosen on validation); using %.1f for every class",
                        tagger.source, DEFAULT_THRESHOLD)
        return np.full(count, DEFAULT_THRESHOLD if tagger.multi_label else 0.0)
    return np.where(np.isnan(stored), DEFAULT_THRESHOLD, stored)


def predicted(scores: np.ndarray, thresholds: np.ndarray, multi_label: bool, labels: list[str]) -> list[str]:
    if multi_label:
        order = np.argsort(-scores, kind="stable")
        return [labels[c] for c in order if scores[c] >= thresholds[c]]
    best = int(np.argmax(scores))
    return [labels[best]] if scores[best] >= thresholds[best] else []


def top(scores: np.ndarray, k: int, labels: list[str]) -> list[tuple[str, float]]:
    order = np.argsort(-scores, kind="stable")[:k]
    return [(labels[c], float(scores[c])) for c in order]


class Writer:
    """One output format; ``add`` per file, ``close`` at the end."""

    def __init__(self, fmt: str, out: io.TextIOBase, labels: list[str], top_k: int, windows: bool):
        self.fmt, self.out, self.labels, self.top_k, self.windows = fmt, out, labels, top_k, windows
        self.csv = None
        if fmt == "csv":
            self.csv = csv.writer(out)
            head = ["file", "start_s", "end_s"] if windows else ["file", "duration_s"]
            self.csv.writerow([*head, "predicted", *labels])

    def add(self, result: Any, labels_predicted: list[str], thresholds: np.ndarray, multi_label: bool) -> None:
        if self.fmt == "jsonl":
            record: dict[str, Any] = {
                "file": result.name, "duration_s": round(result.seconds, 6), "predicted": labels_predicted,
                "top": [{"label": name, "score": score} for name, score in top(result.scores, self.top_k, self.labels)],
                "scores": dict(zip(self.labels, map(float, result.scores))),
                "logits": dict(zip(self.labels, map(float, result.logits))),
            }
            if self.windows:
                record["windows"] = [
                    {"start_s": float(a), "end_s": float(b), "predicted": predicted(s, thresholds, multi_label,
                                                                                    self.labels),
                     "scores": dict(zip(self.labels, map(float, s)))}
                    for (a, b), s in zip(result.windows, result.window_scores)
                ]
            self.out.write(json.dumps(record) + "\n")
        elif self.fmt == "csv":
            if self.windows:
                for (a, b), s in zip(result.windows, result.window_scores):
                    chosen = predicted(s, thresholds, multi_label, self.labels)
                    self.csv.writerow([result.name, f"{a:.3f}", f"{b:.3f}", ";".join(chosen),
                                       *(f"{v:.6g}" for v in s)])
            else:
                self.csv.writerow([result.name, f"{result.seconds:.3f}", ";".join(labels_predicted),
                                   *(f"{v:.6g}" for v in result.scores)])
        else:
            shown = "  ".join(f"{name} {score:.3f}" for name, score in top(result.scores, self.top_k, self.labels))
            self.out.write(f"{result.name}  ({result.seconds:.2f} s, {len(result.windows)} window(s))\n"
                           f"    predicted: {', '.join(labels_predicted) or '(none)'}\n    top: {shown}\n")
            if self.windows:
                for (a, b), s in zip(result.windows, result.window_scores):
                    best = "  ".join(f"{name} {score:.3f}" for name, score in top(s, min(self.top_k, 3), self.labels))
                    self.out.write(f"    {a:8.2f}-{b:8.2f} s  {best}\n")
        self.out.flush()


@contextlib.contextmanager
def _output(path: str | None):
    if path is None:
        yield sys.stdout
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        yield f


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from af_train.inference import InferenceError

    files = find_audio(args.audio, args.recursive)
    if not files:
        print(f"af-predict: error: no audio files in {' '.join(args.audio)}", file=sys.stderr)
        return 2
    if args.out is not None and (problem := output_problem(args.out, overwrite=args.overwrite, inputs=files)):
        print(f"af-predict: error: {problem}", file=sys.stderr)
        return 2
    try:
        tagger = build_tagger(args, aggregate=args.aggregate)
        if tagger.classifier is None:
            raise InferenceError(f"{tagger.source} has no classifier; af-predict needs a fine-tuned model "
                                 "(af-embed gives embeddings of any model)")
    except InferenceError as exc:
        print(f"af-predict: error: {exc}", file=sys.stderr)
        return 2
    log.info("%s; %d file(s)", tagger, len(files))
    thresholds = class_thresholds(tagger, args.threshold)
    failures = Failures(log)
    started, done, audio_seconds = time.perf_counter(), 0, 0.0
    with _output(args.out) as out, contextlib.closing(progress(len(files), "af-predict")) as bar:
        writer = Writer(args.format, out, tagger.labels, args.top_k, args.windows)
        for result in tagger.results(files, scores=True):
            bar.update(1)
            failures.warn_all(result.name, result.warnings)
            if not result.ok:
                failures.add(result.name, result.reason, result.message)
                continue
            done += 1
            audio_seconds += result.seconds
            writer.add(result, predicted(result.scores, thresholds, tagger.multi_label, tagger.labels), thresholds,
                       tagger.multi_label)
    elapsed = time.perf_counter() - started
    log.info("%s in %.1f s (%.2f files/s, %.1fx real time)", failures.summary(done), elapsed,
             done / max(elapsed, 1e-9), audio_seconds / max(elapsed, 1e-9))
    return 1 if failures.count and not args.keep_going else 0


if __name__ == "__main__":
    sys.exit(main())
