"""Cleaning up shared memory that mosaicml-streaming leaked, without touching live jobs.

streaming keeps per-dataset state in POSIX shared memory named ``/dev/shm/NNNNNN_<what>`` and
file locks ``<tmp>/NNNNNN_*_filelock``. A process killed by a signal leaks them; a later run that
streams from a remote into the same local cache then fails with "Reused local directory".

``streaming.base.util.clean_stale_shared_memory()`` unlinks *every* such segment on the host,
including those of other jobs that are still running (on a shared node that breaks them). This
module removes only segments that no live process has mapped or open, which are safe to drop.
Linux only (it reads /proc); elsewhere it does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
_STREAMING_SHM = re.compile(
    r"^\d{6}_(locals|barrier|next_epoch|cache_usage|shard_states|shard_access_times|resume|"
    r"epoch_shape|epoch_data)$"
)
_STREAMING_FILELOCK = re.compile(r"^(\d{6})_(barrier|cache)_filelock$")


def _paths_in_use() -> set[str]:
    """Files mapped or held open by any process we can inspect."""
    in_use: set[str] = set()
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            with open(pid_dir / "maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6:
                        in_use.add(fields[5].strip().removesuffix(" (deleted)"))
            for fd in (pid_dir / "fd").iterdir():
                with contextlib.suppress(OSError):
                    in_use.add(os.readlink(fd))
        except OSError:  # the process ended meanwhile, or it is not ours to read
            continue
    return in_use


def streaming_shm_segments() -> list[str]:
    """Names of mosaicml-streaming shared-memory segments present on this host."""
    if not SHM_DIR.is_dir():
        return []
    return sorted(p.name for p in SHM_DIR.iterdir() if _STREAMING_SHM.match(p.name))


def clean_stale_streaming_shm(min_age_s: float = 5.0) -> list[str]:
    """Unlink streaming segments and file locks that no live process uses; returns what was removed.

    Segments younger than ``min_age_s`` are kept (a process may be between creating and mapping).
    """
    if not Path("/proc/self/maps").exists() or not SHM_DIR.is_dir():
        return []
    in_use = _paths_in_use()
    now = time.time()
    removed: list[str] = []
    live_prefixes: set[str] = set()
    for name in streaming_shm_segments():
        path = SHM_DIR / name
        try:
            young = now - path.stat().st_mtime < min_age_s
        except FileNotFoundError:
            continue
        if young or str(path) in in_use:
            live_prefixes.add(name[:6])
            continue
        try:
            path.unlink()
            removed.append(str(path))
        except FileNotFoundError:
            pass
        except PermissionError:
            live_prefixes.add(name[:6])
    lock_dir = Path(tempfile.gettempdir())
    for lock in lock_dir.iterdir():
        match = _STREAMING_FILELOCK.match(lock.name)
        if not match or match.group(1) in live_prefixes or str(lock) in in_use:
            continue
        try:
            if now - lock.stat().st_mtime >= min_age_s:
                lock.unlink()
                removed.append(str(lock))
        except (FileNotFoundError, PermissionError):
            pass
    if removed:
        logger.info("removed %d stale streaming shared-memory objects: %s", len(removed), ", ".join(removed))
    return removed
