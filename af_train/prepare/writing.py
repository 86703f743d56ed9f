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
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from af_train.files import atomic_write
from af_train.prepare.planning import Reject, Task
from af_train.shards import MANIFEST_NAME, CodecInfo, Manifest, shard_columns
from af_train.tokenizers import Tokenizer, frames_for_samples

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
            shutil.rmtree(split_dir)
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
                 batch_size: int):
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
        codes = self.tokenizer.encode_batch(clips)[: len(self.batch)]
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
        return encoded

    def commit(self) -> dict:
        assert self.remaining == 0 and not self.batch
        self.writer.finish()
        if not self.written_ids:  # nothing accepted: no shards, only the bookkeeping
            for f in self.tmp.iterdir():
                f.unlink()
        with open(self.tmp / REJECTS_NAME, "w", encoding="utf-8") as f:
            for r in self.rejects:
                f.write(json.dumps({"order": r.order, **r.record()}) + "\n")
        info = {"chunk": self.k, "written": len(self.written_ids), "rejected": len(self.rejects)}
        info["seconds"] = self.seconds
        atomic_write(self.tmp / CHUNK_DONE, json.dumps(info))
        if self.final.exists():  # a leftover from an earlier attempt that never got its marker
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)  # the commit point
        return info

    def abandon(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def finalize_split(
    split_dir: Path,
    split: str,
    tasks: list[Task],
    planned_rejects: list[Reject],
    num_chunks: int,
    manifest_base: dict,
) -> Manifest:
    """Merge chunk indices, write the rejects log, then the manifest (last, atomically)."""
    shards, rejects, written, seconds = [], [], 0, 0.0
    for k in range(num_chunks):
        chunk = split_dir / chunk_name(k)
        info = json.loads((chunk / CHUNK_DONE).read_text(encoding="utf-8"))
        written += info["written"]
        seconds += info["seconds"]
        index = chunk / "index.json"
        if index.is_file():
            for shard in json.loads(index.read_text(encoding="utf-8"))["shards"]:
                for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                    if shard.get(key):
                        shard[key]["basename"] = f"{chunk.name}/{shard[key]['basename']}"
                shards.append(shard)
        with open(chunk / REJECTS_NAME, encoding="utf-8") as f:
            rejects += [json.loads(line) for line in f if line.strip()]
    rejects += [{"order": r.order, **r.record()} for r in planned_rejects]
    rejects.sort(key=lambda r: r["order"])
    atomic_write(split_dir / "index.json", json.dumps({"version": 2, "shards": shards}))
    atomic_write(
        split_dir / REJECTS_NAME,
        "".join(json.dumps({k: v for k, v in r.items() if k != "order"}) + "\n" for r in rejects),
    )
    counts = Counter(r["reason"] for r in rejects)
    manifest = Manifest(
        **manifest_base,
        split=split,
        written=written,
        rejected=dict(sorted(counts.items())),
        rejects_log=REJECTS_NAME,
        seconds_of_audio=round(seconds, 3),
    )
    manifest.save(split_dir)
    return manifest
