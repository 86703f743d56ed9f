"""Planning: a source's entries become tasks (clips to decode) and label-level rejects.

Deterministic: the same label files give the same tasks in the same order, which chunked writing
and resume rely on.
"""

from __future__ import annotations

from dataclasses import dataclass

from af_train.prepare.sources import Source

# Reasons decided while planning (from the label file); audio reasons live in af_train.tokenizers.audio_io.
UNKNOWN_LABEL = "unknown_label"
NO_LABELS = "no_labels"
MULTIPLE_LABELS = "multiple_labels"
DUPLICATE_ID = "duplicate_id"


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
