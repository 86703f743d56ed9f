"""``af-prepare --out s3://...``: chunked writing through a local staging folder, resumable from the bucket."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from af_train.prepare.writing import CHUNK_DONE, CHUNK_PREFIX, MANIFEST_NAME, REJECTS_NAME, STATE_DIR, is_own_output

log = logging.getLogger(__name__)


class RemoteOutput:
    """``--out s3://bucket/prefix``: work in a local staging folder, upload every committed chunk.

    The bucket is the authority on what is done. Per split, ``.prepare/state.json`` (the settings
    fingerprint) is uploaded first; a chunk's shards are uploaded before its ``chunk.json``, which
    marks it committed in the bucket; ``index.json`` and ``rejects.jsonl`` follow when all chunks are
    in, ``manifest.json`` last (readers take a split without a manifest as unfinished). A rerun
    pulls that bookkeeping (small files, never shards) into the staging folder, so it resumes from
    what the bucket holds, on this machine or any other; a chunk committed locally whose upload was
    cut off is uploaded then. Uploaded shards are deleted locally: staging needs about one chunk.
    """

    def __init__(self, url: str, staging: Path, timeout: float = 120.0, retries: int = 2):
        self.url = url.rstrip("/")
        self.staging = staging
        self.timeout, self.retries = timeout, retries

    @staticmethod
    def default_staging(url: str) -> Path:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "af_train" / "prepare"
        return root / hashlib.sha1(url.rstrip("/").encode()).hexdigest()[:12]

    def remote_for(self, split_dir: Path):
        from af_train.remote import RemoteDir, join

        rel = split_dir.relative_to(self.staging).as_posix()
        return RemoteDir(join(self.url, "" if rel == "." else rel), timeout=self.timeout, retries=self.retries)

    def check(self) -> None:
        from af_train.remote import RemoteDir

        RemoteDir(self.url, timeout=self.timeout, retries=self.retries).check_bucket()

    def pull(self, split_dir: Path, overwrite: bool) -> None:
        """Make the staging folder of one split agree with the bucket (see the class docstring)."""
        remote = self.remote_for(split_dir)
        state_rel = f"{STATE_DIR}/state.json"
        if overwrite:
            deleted = remote.delete_tree(keep=lambda name: not is_own_output(name))
            shutil.rmtree(split_dir, ignore_errors=True)  # the staging folder: af-prepare's own
            kept = [name for name in remote.list() if not is_own_output(name)]
            log.info("--overwrite: deleted %d objects under %s%s", deleted, remote.url,
                     f"; kept {len(kept)} that af-prepare did not write: {', '.join(kept[:10])}" if kept else "")
            return
        names = set(remote.list())
        if not names:  # nothing uploaded yet: local leftovers belong to an output that no longer exists
            shutil.rmtree(split_dir, ignore_errors=True)
            return
        if state_rel not in names:
            raise SystemExit(
                f"af-prepare: error: {remote.url} is not empty and holds no preparation state (.prepare/state.json)"
                "; choose another --out, or pass --overwrite to delete what is there"
            )
        local_state = split_dir / state_rel
        remote_state = remote.read_bytes(state_rel)
        if local_state.is_file() and local_state.read_bytes() != remote_state:
            shutil.rmtree(split_dir)  # staged for other settings: the bucket decides
        split_dir.joinpath(STATE_DIR).mkdir(parents=True, exist_ok=True)
        local_state.write_bytes(remote_state)
        if MANIFEST_NAME in names:
            remote.download(MANIFEST_NAME, split_dir / MANIFEST_NAME)
        else:
            (split_dir / MANIFEST_NAME).unlink(missing_ok=True)
        uploaded = {n.split("/", 1)[0] for n in names if n.startswith(CHUNK_PREFIX) and n.endswith(f"/{CHUNK_DONE}")}
        for chunk in sorted(split_dir.glob(f"{CHUNK_PREFIX}*")):
            if chunk.name in uploaded:
                continue
            if (chunk / CHUNK_DONE).is_file() and all((chunk / f).is_file() for f in _chunk_shard_files(chunk)):
                log.info("%s: uploading chunk %s (committed locally, upload cut off)", remote.url, chunk.name)
                self.push_chunk(chunk)
            else:
                shutil.rmtree(chunk)
        for name in sorted(uploaded):
            chunk = split_dir / name
            if (chunk / CHUNK_DONE).is_file():
                continue
            for rel in (f"{name}/index.json", f"{name}/{REJECTS_NAME}", f"{name}/{CHUNK_DONE}"):  # marker last
                if rel in names:
                    remote.download(rel, split_dir / rel)

    def push_state(self, split_dir: Path) -> None:
        self.remote_for(split_dir).upload(split_dir / STATE_DIR / "state.json", f"{STATE_DIR}/state.json")

    def push_chunk(self, chunk: Path) -> None:
        """Upload a committed chunk (shards first, chunk.json last), then drop its local shards."""
        remote = self.remote_for(chunk.parent)
        files = sorted(p for p in chunk.rglob("*") if p.is_file() and p.name != CHUNK_DONE)
        for path in [*files, chunk / CHUNK_DONE]:
            remote.upload(path, f"{chunk.name}/{path.relative_to(chunk).as_posix()}")
        for name in _chunk_shard_files(chunk):
            (chunk / name).unlink()

    def push_final(self, split_dir: Path) -> None:
        remote = self.remote_for(split_dir)
        for name in ("index.json", REJECTS_NAME, MANIFEST_NAME):  # manifest last: it marks the split complete
            remote.upload(split_dir / name, name)


def _chunk_shard_files(chunk: Path) -> list[str]:
    index = chunk / "index.json"
    if not index.is_file():
        return []
    shards = json.loads(index.read_text(encoding="utf-8"))["shards"]
    return [s[key]["basename"] for s in shards for key in ("raw_data", "zip_data") if s.get(key)]
