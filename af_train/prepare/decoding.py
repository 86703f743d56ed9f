"""Decoding audio files into fixed-length clips, in worker processes, in a bounded ordered stream.

The stream is af-prepare's prefetch queue: while the main process encodes batch n, the workers decode the
clips after it, at most ``--prefetch-batches`` x ``--batch-size`` of them (:func:`prefetch_depth`). Decoded
audio in memory is therefore bounded by the queue depth plus the batch being filled, whatever the input's
length; ``--prefetch-batches 0`` decodes one clip at a time, only when the encoder asks for it (no overlap).
With ``--workers 0`` the main process decodes, so decoding and encoding take turns.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from af_train.prepare.planning import Task
from af_train.tokenizers import audio_io


@dataclass(frozen=True)
class DecodeSettings:
    """How every file becomes a clip (sent to the workers with each task: a few bytes)."""

    sample_rate: int
    clip_seconds: float
    silence_dbfs: float | None
    min_seconds: float = 0.0


def init_worker() -> None:
    """Pool initializer: Ctrl-C is handled by the main process; one torch thread per decoding process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(1)


def decode(settings: DecodeSettings, task: Task) -> tuple[str, Any]:
    """Worker body: ("ok", (samples, valid_samples, warnings)) or ("reject", (reason, detail)); never raises.
    ``warnings``: (reason, message) pairs of a file that is used but looks wrong (``Clip.warnings``)."""
    try:
        clip = audio_io.load_clip(task.path, sample_rate=settings.sample_rate, clip_seconds=settings.clip_seconds,
                                  silence_dbfs=settings.silence_dbfs, min_seconds=settings.min_seconds,
                                  start_frame=task.start_frame)
    except audio_io.AudioRejected as exc:
        return "reject", (exc.reason, exc.message)
    except Exception as exc:  # noqa: BLE001 - a broken file must not stop the run; it is logged
        return "reject", (audio_io.UNREADABLE, f"{task.path}: {type(exc).__name__}: {exc}")
    return "ok", (clip.samples, clip.valid_samples, clip.warnings)


def decode_item(settings: DecodeSettings, item: tuple[Any, ...]) -> tuple[str, Any]:
    """``decode`` for work items whose last element is the task (``(split, chunk, task)``)."""
    return decode(settings, item[-1])


def start_pool(workers: int):
    """A spawn pool of ``workers`` decoding processes, or None for decoding in this process."""
    if workers <= 0:
        return None
    return multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker)


DEFAULT_PREFETCH_BATCHES = 2


def prefetch_depth(batch_size: int, prefetch_batches: int) -> int:
    """Clips decoded (or being decoded) ahead of the one the encoder holds: ``prefetch_batches`` batches."""
    return max(0, prefetch_batches) * batch_size


def ordered_map(fn, items: Iterator, pool, max_in_flight: int, timeout: float | None = None) -> Iterator:
    """Like ``pool.imap`` but with bounded look-ahead, so decoded audio never piles up in memory.

    At most ``max_in_flight`` items are submitted and not yet taken by the consumer, the one it holds
    included: while the consumer works on an item (e.g. encodes a batch), the workers decode at most
    ``max_in_flight - 1`` items after it. ``pool.imap`` would instead submit the whole input at once and
    keep every finished result in memory until it is taken. Results come in input order.

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
