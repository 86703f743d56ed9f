"""File helpers every layer shares: durable atomic writes, output path checks, content hashes (sha256, xxh64),
the source commit.

Standard library only, so any module (data preparation, model, engine, tools) can import it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

_CHUNK = 1 << 20


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    A reader sees the old file or the whole new one, also after a crash or power loss; on an
    exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    encoding = None if "b" in mode else "utf-8"
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically and durably (see ``atomic_open``)."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return Path(path)


def output_problem(path: str | Path, *, option: str = "--out", folder: bool = False, overwrite: bool = False,
                   inputs: Iterable[str | Path] = ()) -> str | None:
    """Why a command may not write its output at ``path``, or None. Checked before the long work starts.

    ``folder``: the output is a folder (it may exist; the command then names the files it would replace).
    A file output that is one of ``inputs`` is refused even with ``overwrite``; any other existing file is
    replaced only with ``overwrite`` (the command did not create it, or cannot tell). Missing parent
    folders are fine when the nearest existing one is a writable folder (the command creates them).
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        return f"{option} {path} is a file; give a folder (it is created when missing)"
    if not folder:
        if path.is_dir():
            return f"{option} {path} is a folder; give a file name, e.g. {option} {path / 'out'}"
        for given in inputs:
            with contextlib.suppress(OSError):
                if path.exists() and os.path.samefile(path, given):
                    return f"{option} {path} is also an input: writing it would destroy it; give another {option}"
        if path.exists() and not overwrite:
            return f"{option} {path} exists; give another {option}, or pass --overwrite to replace it"
    existing = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir() and existing != path:
        return f"{option} {path}: {existing} is not a folder; give an {option} in a folder"
    if not os.access(existing, os.W_OK) or (existing.is_dir() and not os.access(existing, os.X_OK)):
        return f"{option} {path}: {existing} is not writable (permission denied); give a writable {option}"
    return None


def sha256_files(paths: Iterable[str | Path]) -> str:
    """Hex sha256 of the concatenated contents of ``paths`` (read in chunks)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_CHUNK), b""):
                digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of one file's contents."""
    return sha256_files([path])


def xxh64_file(path: str | Path) -> str:
    """Hex xxh64 of one file's contents (fast; for integrity checks, not security)."""
    import xxhash  # installed with mosaicml-streaming

    digest = xxhash.xxh64()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit(directory: str | Path | None = None) -> dict[str, Any]:
    """``{"commit": full hash or None, "dirty": bool or None}`` of the git checkout holding ``directory``
    (default: this package's); None where git or the checkout is unavailable."""
    where = Path(directory) if directory is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        # experiments/results/ holds what af-experiment writes (to be committed): an earlier file's results there
        # do not make the code of the next runs "dirty"
        changes = git("status", "--porcelain", "--", ":(top)", ":(top,exclude)experiments/results")
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(changes)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
