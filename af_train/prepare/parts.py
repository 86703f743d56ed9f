"""``af-prepare`` on several ranks: which rank prepares which chunk, and what each rank reports.

The unit of work is the chunk of ``--chunk-size`` clips that single-process preparation already commits
atomically (:mod:`~af_train.prepare.writing`). Chunk ``k`` of a split belongs to rank ``k mod
world_size``: interleaved chunks balance the ranks even when the label file is sorted (long files last),
and with the same number of ranks a rerun gives every rank exactly its own unfinished chunks back. All
ranks write into the same output (a shared folder or ``s3://``), each chunk under its own name, so a
rerun with another number of ranks simply re-plans the chunks that are not committed yet: committed
chunks are never redone, whichever rank wrote them (``chunk.json`` records that rank, the world size
and the host; the manifest's ``extra.parts`` groups them). Rank 0 alone checks and creates the resume
state before any rank starts, and merges once every rank has finished.
"""

from __future__ import annotations

PART_RULE = "chunk k of each split belongs to rank k mod world_size"


class PrepareRefused(Exception):
    """A refusal to touch the output (another preparation's folder, other settings): the message says why."""


def owns_chunk(k: int, rank: int, world_size: int) -> bool:
    """Whether chunk ``k`` of a split is in ``rank``'s part."""
    return k % world_size == rank


def part_summary(rank: int, world_size: int, timings: dict) -> str:
    """One log line: this rank's clips, rate and where its time went (decode, tokenize, write)."""
    elapsed = max(timings.get("elapsed_s", 0.0), 1e-9)
    clips = timings.get("clips", 0)
    after_first = timings.get("after_first_s", 0.0)
    steady = f", {(clips - 1) / after_first:.2f} clips/s after the first" if clips > 1 and after_first > 0 else ""
    return (f"rank {rank} of {world_size}: {clips} clips in {elapsed:.1f} s ({clips / elapsed:.2f} clips/s{steady}); "
            f"decode {timings['decode_s']:.1f} s, tokenize {timings['tokenize_s']:.1f} s, "
            f"write {timings['write_s']:.1f} s; {timings.get('cpu_s', 0.0):.1f} CPU-s in this process")
