"""``af-prepare``'s work on one rank: decode this rank's uncommitted chunks in worker processes and encode
them in batches on the rank's device, committing chunk after chunk.

The decoded clips reach the encoder through :func:`~af_train.prepare.decoding.ordered_map`, in input
order: a bounded prefetch queue, so the workers decode the next ``--prefetch-batches`` batches while a
batch is encoded; :class:`~af_train.prepare.writing.ChunkWriter` encodes each batch and commits each chunk. An
interruption (Ctrl-C, a failed upload) stops the workers and drops the partial chunk; the committed ones
stay for the rerun.
"""

from __future__ import annotations

import argparse
import functools
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from af_train.prepare.decoding import DecodeSettings, decode_item, ordered_map, prefetch_depth, start_pool
from af_train.prepare.parts import owns_chunk, part_summary
from af_train.prepare.planning import Reject, Task
from af_train.prepare.remote_output import RemoteOutput
from af_train.prepare.writing import ChunkWriter, chunk_name, committed_chunks
from af_train.tokenizers import Tokenizer

log = logging.getLogger(__name__)


def realtime_rate(seconds_of_audio: float, since: float | None) -> float:
    """Seconds of audio per second of wall time since ``since`` (0 before anything arrived)."""
    if since is None:
        return 0.0
    return seconds_of_audio / max(time.monotonic() - since, 1e-9)


@dataclass
class PartRun:
    """What one rank's pass over its chunks did: the timings of its summary line, the accepted audio (for the
    rate), the warnings, and how it ended (finished, interrupted or stopped by a failed upload)."""

    timings: dict[str, Any]
    elapsed: float
    audio_seconds: float
    first_seconds: float  # accepted audio taken in up to and with the first clip (left out of the rate)
    first_at: float | None  # when the first clip arrived (time.monotonic), None when none did
    warned: dict[str, int] = field(default_factory=dict)
    interrupted: bool = False
    upload_error: Exception | None = None

    @property
    def exit_code(self) -> int:
        """This rank's own outcome: 130 interrupted, 1 upload failed, 0 finished."""
        return 130 if self.interrupted else 1 if self.upload_error is not None else 0


def encode_part(args: argparse.Namespace, plans: dict[str, tuple[list[Task], list[Reject]]], states: dict[str, str],
                dirs: dict[str, Path], tokenizer: Tokenizer, clip_seconds: float, silence: float | None, frames: int,
                remote_out: RemoteOutput | None, rank: int, world: int) -> PartRun:
    """Decode, encode and commit every chunk of ``rank``'s part that is not committed yet (``states``: each
    split's state from :func:`~af_train.prepare.ranks.establish_outputs`). Ctrl-C and upload errors end
    the pass early (recorded in the result); other errors propagate after the workers are stopped."""
    from af_train.remote import RemoteError

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
            if not owns_chunk(k, rank, world):  # another rank's part
                total -= len(chunk)
                continue
            chunk_tasks[(split, k)] = chunk
            if k in committed:
                done_before += len(chunk)
            else:
                work += [(split, k, t) for t in chunk]
        if committed:
            log.info("%s: resuming, %d of %d chunks already committed", split, len(committed), len(chunks))

    settings = DecodeSettings(sample_rate=tokenizer.sample_rate, clip_seconds=clip_seconds, silence_dbfs=silence,
                              min_seconds=args.min_seconds)
    pool = start_pool(args.workers) if work else None

    from tqdm import tqdm

    bar = tqdm(total=total, initial=done_before, unit="clip", desc="preparing" if world == 1 else f"rank {rank}",
               disable=args.quiet or rank != 0, smoothing=0.1)
    provenance = {"rank": rank, "world_size": world, "host": socket.gethostname()}
    timings = {"decode_s": 0.0, "tokenize_s": 0.0, "write_s": 0.0, "clips": 0}
    start = time.monotonic()
    audio_seconds = 0.0
    rejected = 0
    warned: dict[str, int] = {}  # by reason, this run's files: used, but worth a word
    # the rate is measured from the first clip that arrives (the workers' start-up is not throughput)
    first_at: float | None = None
    first_seconds = 0.0
    writer: ChunkWriter | None = None
    interrupted = finished = False
    upload_error: RemoteError | None = None
    waited_from = time.perf_counter()
    cpu_from = time.process_time()
    try:
        for (split, k, task), outcome in ordered_map(
            functools.partial(decode_item, settings), iter(work), pool,
            max_in_flight=prefetch_depth(args.batch_size, args.prefetch_batches) + 1, timeout=args.decode_timeout,
        ):
            timings["decode_s"] += time.perf_counter() - waited_from  # decoding, or waiting for the workers
            timings["clips"] += 1
            if writer is None or (writer.split, writer.k) != (split, k):
                opened_at = time.perf_counter()
                writer = ChunkWriter(dirs[split], split, k, chunk_tasks[(split, k)], tokenizer, frames,
                                     args.batch_size, provenance)
                timings["write_s"] += time.perf_counter() - opened_at
            audio_seconds += writer.add(task, outcome)
            if first_at is None:
                first_at, first_seconds = time.monotonic(), audio_seconds
            if outcome[0] == "reject":
                rejected += 1
                if rejected <= 10:
                    bar.write(f"rejected {task.id}: {outcome[1][0]} ({outcome[1][1]})")
            else:
                for reason, message in outcome[1][2]:
                    warned[reason] = warned.get(reason, 0) + 1
                    log.warning("warning: %s (%s)", message, reason)
            if writer.remaining == 0:
                writer.commit()
                timings["tokenize_s"] += writer.encode_seconds
                timings["write_s"] += writer.write_seconds
                writer = None
                if remote_out:
                    remote_out.push_chunk(dirs[split] / chunk_name(k))
            # the rate counts accepted audio as it is taken in (decoded, queued for its batch), and is
            # set before update() so the line drawn shows it (it lagged one refresh behind before)
            rate = realtime_rate(audio_seconds - first_seconds, first_at)
            bar.set_postfix_str(f"{rate:.1f}x realtime, {rejected} rejected", refresh=False)
            bar.update(1)
            waited_from = time.perf_counter()
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
    elapsed = time.monotonic() - start
    timings["elapsed_s"] = elapsed
    timings["cpu_s"] = time.process_time() - cpu_from  # this process's CPU time in the loop (not its workers')
    # the rate after the first clip: start-up (imports, workers, the tokenizer's first batch) is not throughput
    timings["after_first_s"] = time.monotonic() - first_at if first_at is not None else 0.0
    log.info("%s", part_summary(rank, world, timings))

    return PartRun(timings=timings, elapsed=elapsed, audio_seconds=audio_seconds, first_seconds=first_seconds,
                   first_at=first_at, warned=warned, interrupted=interrupted, upload_error=upload_error)
