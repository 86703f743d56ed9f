"""Chunked writing with resume: output folders, atomic chunk commits, the merged index and manifest.

The clip list of a split is cut into chunks; each chunk is encoded and written as MDS shards into a
temporary folder that is renamed into place only when complete (``part-NNNNNN/``). A rerun with the
same settings (the fingerprint in ``.prepare/state.json``) skips the committed chunks and redoes the
partial one, so every accepted clip ends up in the shards exactly once. When all chunks of a split are
done, a merged ``index.json`` (streaming's merge_index layout), ``rejects.jsonl`` and finally
``manifest.json`` are written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from af_train.files import atomic_write
from af_train.prepare.planning import Reject, Task
from af_train.shards import MANIFEST_NAME, CodecInfo, Manifest, shard_columns
from af_train.tokenizers import Tokenizer, frames_for_samples

log = logging.getLogger(__name__)

STATE_DIR = ".prepare"
CHUNK_PREFIX = "part-"
CHUNK_DONE = "chunk.json"
REJECTS_NAME = "rejects.jsonl"
SHARD_HASHES = ["sha1", "xxh64"]  # recorded per shard in index.json


def codec_info(tokenizer: Tokenizer) -> CodecInfo:
    """The manifest's ``codec`` section for any tokenizer (``tokenizer`` holds its full identity)."""
    identity = tokenizer.identity()
    if tokenizer.kind == "encodec":
        model, bandwidth, weights = identity["model"], identity["bandwidth"], identity["weights"]
    else:
        file = Path(identity["file"]).name if identity.get("file") else "?"
        model, bandwidth, weights = tokenizer.kind, 0.0, f"fitted sha256:{identity['sha256'][:16]} ({file})"
    return CodecInfo(model=model, bandwidth=bandwidth, sample_rate=tokenizer.sample_rate,
                     frame_rate=tokenizer.frame_rate, codebooks=tokenizer.num_rows,
                     codebook_size=tokenizer.codebook_size, weights=weights)


def split_dirs(out: Path, splits: list[str], split_folders: bool) -> dict[str, Path]:
    if not split_folders and len(splits) == 1:
        return {splits[0]: out}
    return {s: out / s for s in splits}


def chunk_name(k: int) -> str:
    return f"{CHUNK_PREFIX}{k:06d}"


def committed_chunks(split_dir: Path) -> dict[int, dict]:
    done = {}
    for child in split_dir.glob(f"{CHUNK_PREFIX}*"):
        marker = child / CHUNK_DONE
        if child.is_dir() and marker.is_file():
            done[int(child.name[len(CHUNK_PREFIX) :])] = json.loads(marker.read_text(encoding="utf-8"))
    return done


def is_own_output(rel_path: str) -> bool:
    """Whether a path inside a split folder (relative, '/'-separated) is one af-prepare writes: the resume state,
    a chunk folder's contents, the merged index, the manifest or the rejects."""
    top, _, rest = rel_path.partition("/")
    return top == STATE_DIR or (top.startswith(CHUNK_PREFIX) and bool(rest)) or (
        not rest and top in ("index.json", MANIFEST_NAME, REJECTS_NAME))


def remove_own_output(split_dir: Path, shown: str | None = None) -> list[str]:
    """``--overwrite``: delete what af-prepare wrote in ``split_dir`` and nothing else; returns (and logs) the
    names of the files kept, e.g. a README the user added to the output."""
    kept = []
    for child in sorted(split_dir.iterdir()):
        if child.is_dir() and (child.name == STATE_DIR or child.name.startswith(CHUNK_PREFIX)):
            shutil.rmtree(child)
        elif not child.is_dir() and is_own_output(child.name):
            child.unlink()
        else:
            kept.append(child.name)
    if kept:
        log.warning("--overwrite: kept %d item(s) in %s that af-prepare did not write: %s", len(kept),
                    shown or split_dir, ", ".join(kept))
    return kept


def prepare_split_dir(split_dir: Path, fingerprint: dict, overwrite: bool, shown: str | None = None) -> str:
    """Check/establish the resume state. Returns "fresh", "resume" or "complete".

    ``shown``: how to name the output in messages (the remote URL when staging for a bucket).
    """
    shown = shown or str(split_dir)
    state_file = split_dir / STATE_DIR / "state.json"
    ours = state_file.is_file() or (split_dir / MANIFEST_NAME).is_file()
    if split_dir.exists() and any(split_dir.iterdir()):
        if not ours:
            raise SystemExit(
                f"af-prepare: error: {shown} exists, is not empty and is not the output of a previous "
                "preparation; choose another --out"
            )
        if overwrite:
            remove_own_output(split_dir, shown)
        elif state_file.is_file():
            previous = json.loads(state_file.read_text(encoding="utf-8"))
            if previous != fingerprint:
                diff = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
                raise SystemExit(
                    f"af-prepare: error: {shown} was prepared with different settings ({', '.join(diff)} "
                    "differ); rerun with the original arguments to resume, or pass --overwrite to start over"
                )
            if (split_dir / MANIFEST_NAME).is_file():
                return "complete"
        else:
            raise SystemExit(
                f"af-prepare: error: {shown} holds a manifest but no preparation state; pass --overwrite "
                "to rebuild it"
            )
    (split_dir / STATE_DIR).mkdir(parents=True, exist_ok=True)
    resumed = state_file.is_file()
    atomic_write(state_file, json.dumps(fingerprint, indent=2, sort_keys=True))
    for stale in (split_dir / STATE_DIR).glob("*.tmp"):  # partial chunks of an interrupted run
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
    return "resume" if resumed else "fresh"


class ChunkWriter:
    """Collects one chunk's clips, encodes them in batches and commits the chunk atomically."""

    def __init__(self, split_dir: Path, split: str, k: int, tasks: list[Task], tokenizer: Tokenizer, frames: int,
                 batch_size: int, provenance: dict | None = None):
        from streaming import MDSWriter

        self.final = split_dir / chunk_name(k)
        self.tmp = split_dir / STATE_DIR / (chunk_name(k) + ".tmp")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.split, self.k, self.tasks, self.tokenizer = split, k, tasks, tokenizer
        self.frames, self.batch_size = frames, batch_size
        self.remaining = len(tasks)
        # hashes: readers can verify every downloaded shard (data.validate_hash)
        self.writer = MDSWriter(out=str(self.tmp), columns=shard_columns(tokenizer.num_rows, frames),
                                hashes=SHARD_HASHES)
        self.batch: list[tuple[Task, np.ndarray, int]] = []
        self.rejects: list[Reject] = []
        self.written_ids: list[str] = []
        self.seconds = 0.0
        self.provenance = provenance or {}  # who wrote the chunk (rank, world size, host): recorded in chunk.json
        self.encode_seconds = self.write_seconds = 0.0  # where the time goes (tokenizer vs MDS writing)

    def add(self, task: Task, outcome: tuple[str, Any]) -> float:
        """Take one decoded clip (or its rejection); returns the seconds of real audio it holds (0 if refused)."""
        self.remaining -= 1
        status, payload = outcome
        if status == "reject":
            reason, detail = payload
            self.rejects.append(Reject(task.order, task.id, task.path, reason, detail))
        else:
            samples, valid, _ = payload  # warnings are counted by the caller
            self.batch.append((task, samples, valid))
        if len(self.batch) >= self.batch_size or (self.remaining == 0 and self.batch):
            self._flush()
        return 0.0 if status == "reject" else payload[1] / self.tokenizer.sample_rate

    def _flush(self) -> float:
        # Every clip is encoded in a batch of exactly batch_size clips (a chunk's last batch is zero-padded):
        # CPU kernels round differently for other batch sizes and a code can flip at a near-tie, so this
        # makes a clip's codes independent of where it falls in its chunk, and inference (AudioTagger)
        # reproduces them bit for bit by padding its batches the same way.
        clips = np.stack([s for _, s, _ in self.batch])
        if len(clips) < self.batch_size:
            clips = np.concatenate([clips, np.zeros((self.batch_size - len(clips), clips.shape[1]), clips.dtype)])
        started = time.perf_counter()
        codes = self.tokenizer.encode_batch(clips)[: len(self.batch)]
        encoded_at = time.perf_counter()
        self.encode_seconds += encoded_at - started
        if tuple(codes.shape[1:]) != (self.tokenizer.num_rows, self.frames):
            raise RuntimeError(f"tokenizer returned codes shaped {tuple(codes.shape[1:])}, expected "
                               f"({self.tokenizer.num_rows}, {self.frames})")
        encoded = 0.0
        for (task, _, valid), c in zip(self.batch, codes.numpy()):
            self.writer.write(
                {
                    "id": task.id,
                    "codes": np.ascontiguousarray(c, dtype=np.int16),
                    "length": np.int32(min(frames_for_samples(valid), self.frames)),
                    "labels": np.asarray(task.labels, dtype=np.int32),
                }
            )
            self.written_ids.append(task.id)
            encoded += valid / self.tokenizer.sample_rate
        self.seconds += encoded
        self.batch = []
        self.write_seconds += time.perf_counter() - encoded_at
        return encoded

    def commit(self) -> dict:
        assert self.remaining == 0 and not self.batch
        started = time.perf_counter()
        self.writer.finish()
        if not self.written_ids:  # nothing accepted: no shards, only the bookkeeping
            for f in self.tmp.iterdir():
                f.unlink()
        with open(self.tmp / REJECTS_NAME, "w", encoding="utf-8") as f:
            for r in self.rejects:
                f.write(json.dumps({"order": r.order, **r.record()}) + "\n")
        info = {"chunk": self.k, "written": len(self.written_ids), "rejected": len(self.rejects)}
        info["seconds"] = self.seconds
        info.update(self.provenance)
        atomic_write(self.tmp / CHUNK_DONE, json.dumps(info))
        if self.final.exists():  # a leftover from an earlier attempt that never got its marker
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)  # the commit point
        self.write_seconds += time.perf_counter() - started
        return info

    def abandon(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class DamagedChunk(RuntimeError):
    """A committed chunk whose shard is missing or not the size its index records (truncated, overwritten)."""


def check_chunk_shards(chunk: Path) -> None:
    """Raise ``DamagedChunk`` naming the shard, the chunk and the rank that wrote it when a shard file the
    chunk's index lists is absent or of another size. Sizes only (cheap); readers check hashes."""
    index = chunk / "index.json"
    if not index.is_file():
        return
    for shard in json.loads(index.read_text(encoding="utf-8"))["shards"]:
        for key in ("raw_data", "zip_data"):
            entry = shard.get(key)
            if not entry:
                continue
            path = chunk / entry["basename"]
            size = path.stat().st_size if path.is_file() else None
            if size != entry["bytes"]:
                info = json.loads((chunk / CHUNK_DONE).read_text(encoding="utf-8"))
                writer = f"rank {info['rank']} of {info['world_size']} on {info.get('host', '?')}" \
                    if "rank" in info else "a single process"
                found = "missing" if size is None else f"{size} bytes"
                raise DamagedChunk(f"{path}: {found}, its index records {entry['bytes']} bytes (chunk {chunk.name}, "
                                   f"written by {writer})")


def decommit_chunk(chunk: Path) -> None:
    """Take back a chunk's commit (its marker), so that the next run redoes exactly this chunk."""
    (chunk / CHUNK_DONE).unlink(missing_ok=True)


def parts_provenance(chunk_infos: list[dict]) -> list[dict]:
    """The manifest's ``extra.parts``: per (rank, world size, host) that committed chunks, which chunks
    and what they hold. A single-process run is one part of rank 0 of 1."""
    parts: dict[tuple, dict] = {}
    for info in chunk_infos:
        key = (info.get("rank", 0), info.get("world_size", 1), info.get("host"))
        part = parts.setdefault(key, {"rank": key[0], "world_size": key[1], "host": key[2], "chunks": [],
                                      "written": 0, "rejected": 0, "seconds": 0.0})
        part["chunks"].append(info["chunk"])
        part["written"] += info["written"]
        part["rejected"] += info["rejected"]
        part["seconds"] = round(part["seconds"] + info["seconds"], 3)
    return [parts[k] for k in sorted(parts, key=lambda k: (k[1], k[0], str(k[2])))]


def merge_chunk_indices(split_dir: Path, chunks: list[Path]) -> None:
    """``index.json`` of the split: streaming's ``merge_index`` over the chunks' indices, in chunk order."""
    indices = [str(c / "index.json") for c in chunks if (c / "index.json").is_file()]
    (split_dir / "index.json").unlink(missing_ok=True)  # merge_index moves its result in and refuses to overwrite
    if not indices:  # nothing accepted: an index with no shards (merge_index writes none)
        atomic_write(split_dir / "index.json", json.dumps({"version": 2, "shards": []}))
        return
    from streaming.base.util import merge_index

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # merge_index logs a root-level warning about its temporary folder
    try:
        merge_index(indices, str(split_dir), keep_local=True)
    finally:
        root.setLevel(level)


def finalize_split(
    split_dir: Path,
    split: str,
    tasks: list[Task],
    planned_rejects: list[Reject],
    num_chunks: int,
    manifest_base: dict,
    check_shards: bool = True,
) -> Manifest:
    """Check every chunk's shards, merge the chunk indices, write the rejects log, then the manifest (last,
    atomically). A damaged chunk loses its commit (a rerun redoes it) and raises ``DamagedChunk``.
    ``check_shards=False`` where the shards are not local (uploaded to object storage)."""
    chunks = [split_dir / chunk_name(k) for k in range(num_chunks)]
    if check_shards:
        for chunk in chunks:
            try:
                check_chunk_shards(chunk)
            except DamagedChunk:
                decommit_chunk(chunk)
                raise
    rejects, written, seconds, infos = [], 0, 0.0, []
    for chunk in chunks:
        info = json.loads((chunk / CHUNK_DONE).read_text(encoding="utf-8"))
        infos.append(info)
        written += info["written"]
        seconds += info["seconds"]
        with open(chunk / REJECTS_NAME, encoding="utf-8") as f:
            rejects += [json.loads(line) for line in f if line.strip()]
    merge_chunk_indices(split_dir, chunks)
    rejects += [{"order": r.order, **r.record()} for r in planned_rejects]
    rejects.sort(key=lambda r: r["order"])
    atomic_write(
        split_dir / REJECTS_NAME,
        "".join(json.dumps({k: v for k, v in r.items() if k != "order"}) + "\n" for r in rejects),
    )
    counts = Counter(r["reason"] for r in rejects)
    base = {**manifest_base, "extra": {**manifest_base.get("extra", {}), "parts": parts_provenance(infos)}}
    manifest = Manifest(
        **base,
        split=split,
        written=written,
        rejected=dict(sorted(counts.items())),
        rejects_log=REJECTS_NAME,
        seconds_of_audio=round(seconds, 3),
    )
    manifest.save(split_dir)
    return manifest
