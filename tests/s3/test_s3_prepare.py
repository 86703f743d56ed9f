"""af-prepare --out s3://...: interrupted uploads resume from what the bucket holds."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from af_train import prepare as prep
from af_train.remote import RemoteDir, RemoteError

pytestmark = pytest.mark.slow


def prepare_argv(synthetic_audio: Path, out: str, staging: Path) -> list[str]:
    """The arguments of the session's ``prepared_shards`` fixture, writing to ``out``."""
    return ["--format", "csv", "--input", str(synthetic_audio / "labels.csv"),
            "--labels", str(synthetic_audio / "vocabulary.txt"), "--out", out, "--staging-dir", str(staging),
            "--codec-random-init", "0", "--clip-seconds", "1.0", "--workers", "0", "--chunk-size", "4",
            "--batch-size", "4", "--quiet", "--threads", "1"]


def keys(client, bucket: str, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {obj["Key"][len(prefix):] for page in pages for obj in page.get("Contents", [])}


def test_prepare_to_s3_survives_cut_uploads_and_a_new_machine(s3, synthetic_audio, prepared_shards, tmp_path,
                                                              monkeypatch, caplog):
    client, bucket = s3
    url = f"s3://{bucket}/synth"
    real_upload = RemoteDir.upload

    def failing_at(chunk_file: str, error: BaseException):
        def upload(self, local, rel):
            if self.url.endswith("/train") and rel == chunk_file:
                raise error
            return real_upload(self, local, rel)
        return upload

    # 1) the network drops while train's second chunk is uploaded: its shards are in, its marker is not
    monkeypatch.setattr(RemoteDir, "upload", failing_at("part-000001/chunk.json", RemoteError("connection reset")))
    assert prep.main(prepare_argv(synthetic_audio, url, tmp_path / "staging_a")) == 1
    train = keys(client, bucket, "synth/train/")
    assert "part-000000/chunk.json" in train and "part-000001/shard.00000.mds" in train
    assert "part-000001/chunk.json" not in train and "manifest.json" not in train
    assert not (tmp_path / "staging_a" / "train" / "part-000000" / "shard.00000.mds").exists()  # uploaded: dropped

    # 2) rerun on the same machine: the chunk committed locally is uploaded first; then Ctrl-C during chunk 3
    monkeypatch.setattr(RemoteDir, "upload", failing_at("part-000002/chunk.json", KeyboardInterrupt()))
    caplog.set_level(logging.INFO, logger="af_train.prepare")
    assert prep.main(prepare_argv(synthetic_audio, url, tmp_path / "staging_a")) == 130
    assert "uploading chunk part-000001 (committed locally, upload cut off)" in caplog.text
    train = keys(client, bucket, "synth/train/")
    assert "part-000001/chunk.json" in train and "part-000002/chunk.json" not in train

    # 3) finish on "another machine" (empty staging folder): the bucket says what is done
    monkeypatch.setattr(RemoteDir, "upload", real_upload)
    caplog.clear()
    assert prep.main(prepare_argv(synthetic_audio, url, tmp_path / "staging_b")) == 0
    assert "train: resuming, 2 of 3 chunks already committed" in caplog.text

    # The bucket now holds exactly what an uninterrupted local preparation wrote, shard for shard.
    for split in ("train", "val", "test"):
        local = prepared_shards / split
        remote = keys(client, bucket, f"synth/{split}/")
        expected = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
        assert remote == expected, split
        for name in sorted(expected):
            if name.endswith((".mds", "index.json", "manifest.json", "chunk.json", "rejects.jsonl")):
                body = client.get_object(Bucket=bucket, Key=f"synth/{split}/{name}")["Body"].read()
                assert body == (local / name).read_bytes(), (split, name)
        index = json.loads((local / "index.json").read_text())
        assert all(set(s["raw_data"]["hashes"]) == {"sha1", "xxh64"} for s in index["shards"])

    # 4) a rerun finds everything complete; other settings are refused, naming the bucket
    assert prep.main(prepare_argv(synthetic_audio, url, tmp_path / "staging_c")) == 0
    changed = f"{url}/(train|val|test) was prepared with different settings \\(batch_size differ\\)"
    with pytest.raises(SystemExit, match=changed):
        prep.main([*prepare_argv(synthetic_audio, url, tmp_path / "staging_c"), "--batch-size", "2"])
    # a prefix with foreign data is not taken over
    client.put_object(Bucket=bucket, Key="other/test/notes.txt", Body=b"x")
    with pytest.raises(SystemExit, match=f"s3://{bucket}/other/test is not empty and holds no preparation state"):
        prep.main(prepare_argv(synthetic_audio, f"s3://{bucket}/other", tmp_path / "staging_d"))


def test_overwrite_deletes_only_af_prepares_objects_in_the_bucket(s3, tmp_path):
    from af_train.prepare.remote_output import RemoteOutput

    client, bucket = s3
    own = [".prepare/state.json", "part-000000/chunk.json", "part-000000/shard.00000.mds", "index.json",
           "manifest.json", "rejects.jsonl"]
    users = ["README.md", "plots/loss.png", "part-notes.txt"]
    for rel in own + users:
        client.put_object(Bucket=bucket, Key=f"synth/train/{rel}", Body=rel.encode())
    staging = tmp_path / "staging"
    (staging / "train" / ".prepare").mkdir(parents=True)
    RemoteOutput(f"s3://{bucket}/synth", staging).pull(staging / "train", overwrite=True)
    assert keys(client, bucket, "synth/train/") == set(users)
