"""``af-prepare``'s last step: merge every split's committed chunks into one dataset (the merged ``index.json``,
``rejects.jsonl`` and ``manifest.json``, :func:`~af_train.prepare.writing.finalize_split`), upload it with
``--out s3://...``, and print the summary. With several ranks rank 0 alone does this, once every rank has
finished its part.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from af_train.prepare.encoding import PartRun, realtime_rate
from af_train.prepare.planning import Reject, Task
from af_train.prepare.remote_output import RemoteOutput
from af_train.prepare.writing import REJECTS_NAME, DamagedChunk, finalize_split
from af_train.shards import Manifest
from af_train.tokenizers import Tokenizer


def format_counts(counts: dict[str, int]) -> str:
    """``reason count, ...`` sorted by reason, or ``none``."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def merge_and_report(part: PartRun, plans: dict[str, tuple[list[Task], list[Reject]]], states: dict[str, str],
                     dirs: dict[str, Path], shown: dict[str, str], manifest_base: dict[str, Any],
                     tokenizer: Tokenizer, workers: int, chunk_size: int, remote_out: RemoteOutput | None) -> int:
    """Merge (or, for a split already complete, load) every split, print the run's summary and each split's
    counts; the exit code: 1 for a damaged chunk, a failed upload or a split with no usable clip, else 0."""
    from af_train.remote import RemoteError

    exit_code = 0
    import torch

    cores = max(1, min(os.cpu_count() or 1, torch.get_num_threads() + workers))
    rate = realtime_rate(part.audio_seconds - part.first_seconds, part.first_at)
    print(f"\nsummary ({part.elapsed:.1f} s, {rate:.1f}x realtime this run with {tokenizer.kind} after the first clip, "
          f"{rate / cores:.1f}x per core on {cores} cores):")
    if part.warned:
        print(f"  used with a warning this run: {sum(part.warned.values())} [{format_counts(part.warned)}] "
              "(see the log above)")
    for split, (tasks, planned_rejects) in plans.items():
        num_chunks = (len(tasks) + chunk_size - 1) // chunk_size
        if states[split] == "complete":
            manifest = Manifest.load(dirs[split])
            note = " (already complete)"
        else:
            try:
                manifest = finalize_split(dirs[split], split, tasks, planned_rejects, num_chunks, manifest_base,
                                          check_shards=remote_out is None)
            except DamagedChunk as exc:
                print(f"af-prepare: error: damaged output: {exc}\nits commit was taken back: rerun the same command "
                      "to redo that chunk", file=sys.stderr)
                return 1
            note = ""
            if remote_out:
                try:
                    remote_out.push_final(dirs[split])
                except RemoteError as exc:
                    print(f"af-prepare: error: {exc}; rerun the same command to finish the upload", file=sys.stderr)
                    return 1
        print(
            f"  {split:>6}: written {manifest.written}, rejected {sum(manifest.rejected.values())} "
            f"[{format_counts(manifest.rejected)}], {manifest.seconds_of_audio / 3600:.3f} h of audio "
            f"→ {shown[split]}{note}"
        )
        if manifest.written == 0:
            print(
                f"af-prepare: error: split '{split}' has no usable clip; see {dirs[split] / REJECTS_NAME}",
                file=sys.stderr,
            )
            exit_code = 1
    return exit_code
