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

Several ranks (``--num_cpu_ranks N``, ``--num_gpus N``, ``--hostfile``; torchrun and srun work too; see
:mod:`af_train.inference.ranks`) need --out. Input k belongs to rank k mod world_size; each rank scores
its inputs on its own device into ``OUT.parts/rank-R.jsonl`` (created by rank 0, refused when it already
exists), and rank 0 merges the parts into --out in input order, byte for byte what one process writes,
then removes ``OUT.parts/``. Rank 0 logs the rule and each rank's host, device and counts. When a rank
fails, rank 0 names it and exits 1; --out is then not written (nor replaced) and the parts are removed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import heapq
import io
import json
import logging
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from af_train.files import atomic_open, output_problem
from af_train.inference.cli_common import (
    Failures,
    add_model_arguments,
    build_tagger,
    find_audio,
    positive_int,
    progress,
)
from af_train.inference.ranks import (
    RANK_RULE,
    add_rank_arguments,
    failed_ranks_message,
    join_ranks,
    launch_requested,
    leave_ranks,
    rank_indices,
    report_to_rank0,
    wait_for_rank0,
)
from af_train.launcher import start_launcher, wants_launcher

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5


def build_parser() -> argparse.ArgumentParser:
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
    add_rank_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    parser = parser or build_parser()
    args = parser.parse_intermixed_args(argv)  # options may come between the audio files
    if wants_launcher(args) and args.out is None:
        parser.error("several ranks (--num_cpu_ranks, --num_gpus, --hostfile) merge their parts into a file: "
                     "give --out FILE")
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


def parts_folder(out: str | Path) -> Path:
    """Where the ranks of a several-rank run keep their parts while it runs: ``OUT.parts/`` beside --out."""
    return Path(f"{out}.parts")


def _parts_problem(out: str | Path) -> str | None:
    folder = parts_folder(out)
    if folder.exists():
        return (f"{folder} exists: several ranks keep their parts there while they run, and af-predict did not "
                "create it in this run (a run that was killed leaves it); remove it, or give another --out")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parse_args(argv, parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    files = find_audio(args.audio, args.recursive)
    if not files:
        print(f"af-predict: error: no audio files in {' '.join(args.audio)}", file=sys.stderr)
        return 2
    if args.out is not None and (problem := output_problem(args.out, overwrite=args.overwrite, inputs=files)):
        print(f"af-predict: error: {problem}", file=sys.stderr)
        return 2
    if wants_launcher(args) and (problem := _parts_problem(args.out)):
        print(f"af-predict: error: {problem}", file=sys.stderr)
        return 2
    if launch_requested(parser, args):
        return start_launcher("af-predict", "af_train.inference.predict", argv, sys.stderr)
    placement = join_ranks(args, "af-predict")
    try:
        return _run(args, files, placement)
    finally:
        leave_ranks(placement)


def _run(args: argparse.Namespace, files: list[Path], placement) -> int:
    from af_train.inference import InferenceError

    if placement.world_size > 1 and args.out is None:
        if placement.rank == 0:
            print(f"af-predict: error: {placement.world_size} ranks ({placement.launcher} launcher) merge their parts "
                  "into a file: give --out FILE", file=sys.stderr)
        return 2
    try:
        tagger = build_tagger(args, aggregate=args.aggregate)
        if tagger.classifier is None:
            raise InferenceError(f"{tagger.source} has no classifier; af-predict needs a fine-tuned model "
                                 "(af-embed gives embeddings of any model)")
    except InferenceError as exc:
        print(f"af-predict: error: {exc}", file=sys.stderr)
        return 2
    if placement.rank == 0:
        log.info("%s; %d file(s)", tagger, len(files))
    thresholds = class_thresholds(tagger, args.threshold)
    if placement.world_size > 1:
        return _run_ranks(args, files, tagger, thresholds, placement)
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


def _make_parts_folder(out: str | Path) -> str | None:
    """Rank 0: create the parts folder of --out (None), or say why not."""
    if problem := _parts_problem(out):
        return problem
    parts_folder(out).mkdir(parents=True)
    return None


def _predict_part(args: argparse.Namespace, tagger: Any, files: list[Path], mine: list[int], thresholds: np.ndarray,
                  part: Path, failures: Failures, bar: Any) -> tuple[int, float]:
    """This rank's inputs into ``part``: one JSON line per input, in input order, with its index ``at`` and
    either ``text`` (exactly what one process writes for it) or ``skipped`` (the reason); (files done, seconds)."""
    done, audio_seconds = 0, 0.0
    buffer = io.StringIO()
    writer = Writer(args.format, buffer, tagger.labels, args.top_k, args.windows)  # the CSV header: rank 0's job
    with atomic_open(part, "w") as f:
        for at, result in zip(mine, tagger.results([files[i] for i in mine], scores=True)):
            bar.update(1)
            failures.warn_all(result.name, result.warnings)
            record: dict[str, Any] = {"at": at, "warnings": [reason for reason, _ in result.warnings]}
            if result.ok:
                done += 1
                audio_seconds += result.seconds
                buffer.seek(0)
                buffer.truncate()
                writer.add(result, predicted(result.scores, thresholds, tagger.multi_label, tagger.labels),
                           thresholds, tagger.multi_label)
                record["text"] = buffer.getvalue()
            else:
                failures.add(result.name, result.reason, result.message)
                record["skipped"] = result.reason
            f.write(json.dumps(record) + "\n")
    return done, audio_seconds


def _read_part(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _merge_parts(args: argparse.Namespace, tagger: Any, parts: list[Path], total: int) -> tuple[Failures, int]:
    """The ranks' parts into --out, in input order, atomically (a failure leaves --out as it was); (the skips and
    warnings of every rank, files written). RuntimeError when the parts do not hold every input exactly once."""
    failures = Failures(log)
    header = io.StringIO()
    Writer(args.format, header, tagger.labels, args.top_k, args.windows)
    written = expected = 0
    with atomic_open(args.out, "wb") as out:
        out.write(header.getvalue().encode("utf-8"))
        for record in heapq.merge(*map(_read_part, parts), key=lambda r: r["at"]):
            if record["at"] != expected:
                raise RuntimeError(f"the parts in {parts[0].parent} hold input {record['at']} where input {expected} "
                                   "belongs: not every input once; run again")
            expected += 1
            failures.warned.update(record["warnings"])
            if "text" in record:
                out.write(record["text"].encode("utf-8"))
                written += 1
            else:
                failures.by_reason[record["skipped"]] += 1
        if expected != total:
            raise RuntimeError(f"the parts in {parts[0].parent} hold {expected} of {total} inputs; run again")
    return failures, written


def _run_ranks(args: argparse.Namespace, files: list[Path], tagger: Any, thresholds: np.ndarray, placement) -> int:
    """One rank of several: its part into ``OUT.parts/rank-R.jsonl``; rank 0 then merges every part into --out."""
    from af_train import distributed

    rank, world = placement.rank, placement.world_size
    folder = parts_folder(args.out)
    problem = distributed.broadcast_from_rank0(
        distributed.result_or_exception(_make_parts_folder, args.out) if rank == 0 else None)
    if problem:
        if rank == 0:
            print(f"af-predict: error: {problem}", file=sys.stderr)
        return 2
    mine = rank_indices(len(files), rank, world)
    log.info("rank %d of %d (%s): %d of %d inputs (%s)", rank, world, tagger.device, len(mine), len(files), RANK_RULE)
    parts = [folder / f"rank-{r:05d}.jsonl" for r in range(world)]
    failures = Failures(log)
    started = time.perf_counter()
    status = {"rank": rank, "code": 0, "error": None, "inputs": len(mine), "done": 0, "seconds": 0.0,
              "device": str(tagger.device)}
    bar = progress(len(mine) if rank == 0 else 0, f"af-predict rank 0 of {world}")
    try:
        done, seconds = _predict_part(args, tagger, files, mine, thresholds, parts[rank], failures, bar)
        status.update(done=done, seconds=seconds, skipped=dict(failures.by_reason))
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which names this rank
        log.exception("rank %d failed", rank)
        status.update(code=1, error=f"{type(exc).__name__}: {exc}")
    finally:
        bar.close()
    statuses = report_to_rank0(status)
    if statuses is None or (problem := failed_ranks_message("af-predict", statuses)):
        if rank == 0:
            if statuses is None:
                missing = [r for r, part in enumerate(parts) if not part.is_file()]
                problem = (f"af-predict: error: a rank stopped without reporting: rank(s) "
                           f"{', '.join(map(str, missing))} did not write their part")
            shutil.rmtree(folder, ignore_errors=True)
            print(f"{problem}; {args.out} was not written", file=sys.stderr)
        if statuses is not None:
            wait_for_rank0()
        return 1 if rank == 0 or status["code"] or statuses is None else 0
    with distributed.ranks_leave_together(world):  # rank 0 merges; the others wait for it
        if rank != 0:
            return 0
        try:
            failures, written = _merge_parts(args, tagger, parts, len(files))
        except RuntimeError as exc:
            print(f"af-predict: error: {exc}", file=sys.stderr)
            return 1
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        elapsed = time.perf_counter() - started
        for s in statuses:
            log.info("rank %d on %s (%s): %d inputs, %d scored, %d skipped", s["rank"], s["host"], s["device"],
                     s["inputs"], s["done"], s["inputs"] - s["done"])
        done, seconds = sum(s["done"] for s in statuses), sum(s["seconds"] for s in statuses)
        log.info("%d ranks (%s): %s in %.1f s (%.2f files/s, %.1fx real time) -> %s", world, RANK_RULE,
                 failures.summary(written), elapsed, done / max(elapsed, 1e-9), seconds / max(elapsed, 1e-9), args.out)
        return 1 if failures.count and not args.keep_going else 0


if __name__ == "__main__":
    sys.exit(main())
