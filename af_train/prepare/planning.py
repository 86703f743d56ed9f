"""Planning: a source's entries become tasks (clips to decode) and label-level rejects.

Deterministic: the same label files give the same tasks in the same order, which chunked writing
and resume rely on.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from af_train.prepare.sources import Source
from af_train.shards import segment_id
from af_train.tokenizers import audio_io

# Reasons decided while planning (from the label file); audio reasons live in af_train.tokenizers.audio_io.
UNKNOWN_LABEL = "unknown_label"
NO_LABELS = "no_labels"
MULTIPLE_LABELS = "multiple_labels"
DUPLICATE_ID = "duplicate_id"
SHORT_REMAINDER = "short_remainder"  # --segment: the end of a file, shorter than --min-seconds


@dataclass
class Task:
    order: int  # position among the split's entries (rejects log order)
    id: str
    path: str
    labels: list[int]
    start_frame: int = 0  # --segment: where the clip starts in the file, in frames at the file's own rate


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


def segment_tasks(
    tasks: list[Task], *, clip_seconds: float, hop_seconds: float, min_seconds: float
) -> tuple[list[Task], list[Reject]]:
    """``af-prepare --segment``: every file becomes its consecutive clips ``FILE#k`` (labels inherited).

    Only each file's header is read here (its length decides the clips, see
    ``audio_io.segment_starts``); the clips are decoded one by one later. A file that cannot be read is
    rejected once under its own id; a trailing clip with less than ``min_seconds`` of audio is rejected
    as ``short_remainder`` (a whole file that short stays ``too_short``, as without --segment).
    Deterministic for unchanged files, which chunked writing and resume rely on.
    """
    out: list[Task] = []
    rejects: list[Reject] = []
    for task in tasks:
        try:
            info = audio_io.probe(task.path)
        except audio_io.AudioRejected as exc:
            rejects.append(Reject(task.order, task.id, task.path, exc.reason, exc.message))
            continue
        starts = audio_io.segment_starts(info.frames, info.sample_rate, clip_seconds, hop_seconds)
        for k, start in enumerate(starts):
            clip_id = segment_id(task.id, k)
            remaining = (info.frames - start) / info.sample_rate
            if k > 0 and remaining < min_seconds:
                rejects.append(Reject(task.order, clip_id, task.path, SHORT_REMAINDER,
                                      f"{task.path}: the last {remaining:.3f} s from {start / info.sample_rate:.3f} s "
                                      f"are shorter than --min-seconds {min_seconds:g}"))
                continue
            out.append(Task(task.order, clip_id, task.path, task.labels, start_frame=start))
    return out, rejects


def add_segment_arguments(parser: argparse.ArgumentParser) -> None:
    """``--segment`` / ``--segment-hop``: the same clips for af-prepare and af-fit-tokenizer."""
    parser.add_argument("--segment", action="store_true",
                        help="cut every file into consecutive clips FILE#k of --clip-seconds (long recordings) "
                        "instead of keeping its first clip only")
    parser.add_argument("--segment-hop", type=float, metavar="SECONDS",
                        help="--segment: seconds between clip starts (default: the clip length; smaller overlaps)")


def segment_hop_problem(segment: bool, hop_seconds: float | None, clip_seconds: float) -> str | None:
    """Why ``--segment-hop`` cannot be used with these settings, or None."""
    if hop_seconds is None:
        return None
    if not segment:
        return "--segment-hop applies only with --segment"
    if not 0 < hop_seconds <= clip_seconds:
        return (f"--segment-hop {hop_seconds:g} must be > 0 and at most the clip ({clip_seconds:g} s, "
                "--clip-seconds): a longer hop never reads the audio between")
    return None
