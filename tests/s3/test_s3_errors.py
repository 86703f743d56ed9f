"""What a user sees when the remote is wrong: bucket, prefix, credentials, endpoint, a corrupt shard."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest
from s3_helpers import record_hashes, upload_tree

from af_train.config import DataConfig
from af_train.data.dataset import DataError, load_manifest
from af_train.data.loader import build_dataloader
from af_train.remote import RemoteDir, RemoteError
from af_train.shards import ManifestError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from data_shards import write_shards  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def remote_shards(s3, tmp_path):
    """30 clips in ~6 shards with sha1/xxh64 recorded, uploaded to s3://<bucket>/set/train."""
    client, bucket = s3
    local = tmp_path / "local"
    stored = write_shards(local, 30, frames=20, num_classes=4, seed=3, size_limit=1 << 10)
    record_hashes(local)
    upload_tree(client, local, bucket, "set/train")
    return client, bucket, local, stored


def test_wrong_bucket_prefix_and_missing_credentials_name_the_problem(remote_shards, monkeypatch, tmp_path):
    client, bucket, _, _ = remote_shards
    manifest = load_manifest(f"s3://{bucket}/set/train")
    assert manifest.written == 30

    with pytest.raises(ManifestError, match=f"bucket 'no-such-{bucket}' does not exist at the S3 endpoint http://127"):
        load_manifest(f"s3://no-such-{bucket}/set/train")
    with pytest.raises(ManifestError, match=rf"nothing is stored under 's3://{bucket}/set/trian' \(wrong prefix\?\); "
                                            "prefixes there: train/"):
        load_manifest(f"s3://{bucket}/set/trian")
    # the split exists but its preparation never finished: the message says so
    client.delete_object(Bucket=bucket, Key="set/train/manifest.json")
    with pytest.raises(ManifestError, match="manifest.json' does not exist .*unfinished upload or preparation"):
        load_manifest(f"s3://{bucket}/set/train")

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(RemoteError, match="no AWS credentials are configured .*AWS_ACCESS_KEY_ID and "
                                          "AWS_SECRET_ACCESS_KEY"):
        RemoteDir(f"s3://{bucket}/set/train").read_bytes("index.json")


def test_unreachable_endpoint_fails_fast_with_bounded_retries(s3, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("S3_ENDPOINT_URL", dead)
    cfg = DataConfig(remote="s3://audio/set", download_retry=1, download_timeout=5)
    started = time.monotonic()
    with pytest.raises(ManifestError, match=f"cannot reach the S3 endpoint {dead} .*2 attempts, timeout 5 s.*"
                                            "Check S3_ENDPOINT_URL"):
        build_dataloader(cfg, "train", 4, mask=False, seed=0)
    assert time.monotonic() - started < 15


def test_corrupt_remote_shard_is_named_and_not_kept(remote_shards, tmp_path, loaders):
    client, bucket, local, stored = remote_shards
    index = json.loads((local / "index.json").read_text())
    assert len(index["shards"]) >= 4
    victim = index["shards"][2]["raw_data"]["basename"]
    data = bytearray((local / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the sample data
    client.put_object(Bucket=bucket, Key=f"set/train/{victim}", Body=bytes(data))

    cache = tmp_path / "cache"
    cfg = DataConfig(remote=f"s3://{bucket}/set", local_cache=str(cache), max_length=24, shuffle=False,
                     validate_hash="xxh64", download_retry=1, download_timeout=7, cache_limit="64kb", predownload=6)
    loaders.append(loader := build_dataloader(cfg, "train", 4, mask=False, seed=0, drop_last=False))
    stream = loader.dataset.streams[0]  # the recipe's settings reach streaming
    assert (stream.remote, stream.download_retry, stream.download_timeout, stream.validate_hash) == (
        f"s3://{bucket}/set/train", 1, 7, "xxh64")
    assert (loader.dataset.cache_limit, loader.dataset.predownload) == (64 * 1024, 6)
    seen = []
    with pytest.raises(DataError, match=rf"shard '{victim}' of 's3://{bucket}/set/train' failed its xxh64 check"):
        for batch in loader:
            seen += batch["ids"]
    assert len(seen) < len(stored)
    (split_cache,) = cache.iterdir()
    assert not (split_cache / victim).exists()  # the bad copy is gone: a restart cannot read it unchecked

    # Without hashes in the index, asking for validation is refused with the fix.
    (local / "index.json").write_text(json.dumps({**index, "shards": [
        {**s, "raw_data": {**s["raw_data"], "hashes": {}}} for s in index["shards"]]}))
    client.upload_file(str(local / "index.json"), bucket, "set/val/index.json")
    client.upload_file(str(local / "manifest.json"), bucket, "set/val/manifest.json")
    for shard in index["shards"]:
        name = shard["raw_data"]["basename"]
        client.upload_file(str(local / name), bucket, f"set/val/{name}")
    loaders.append(loader := build_dataloader(cfg, "val", 4, mask=False, seed=0))
    with pytest.raises(DataError, match="data.validate_hash=xxh64 but shard 'shard.00000.mds' .* records no such hash"):
        next(iter(loader))


def test_restart_reuses_the_cache_unless_the_remote_data_set_changed(remote_shards, tmp_path, loaders, caplog):
    client, bucket, local, stored = remote_shards
    cfg = DataConfig(remote=f"s3://{bucket}/set", local_cache=str(tmp_path / "cache"), max_length=24,
                     validate_hash="sha1")

    def read_all() -> dict[str, list[int]]:
        """clip id -> the codes of row 0 as read (between BOA and EOA)."""
        loaders.append(loader := build_dataloader(cfg, "train", 4, mask=False, seed=0, drop_last=False))
        out = {}
        for batch in loader:
            for clip, row in zip(batch["ids"], batch["input_ids"][:, 0]):
                out[clip] = row[1:21].tolist()
        loader.dataset.close()
        return out

    def codes(samples: dict) -> dict[str, list[int]]:
        return {clip: sample["codes"][0, :20].tolist() for clip, sample in samples.items()}

    assert read_all() == codes(stored)
    # A restart reads from the cache: the shard objects are not needed any more.
    index = json.loads((local / "index.json").read_text())
    for shard in index["shards"]:
        client.delete_object(Bucket=bucket, Key=f"set/train/{shard['raw_data']['basename']}")
    assert read_all() == codes(stored)
    assert "changed since they were cached" not in caplog.text

    # The data set in the bucket is re-prepared: the stale cache is dropped and the new clips are read.
    newer = tmp_path / "newer"
    new_stored = write_shards(newer, 12, frames=20, num_classes=4, seed=4, size_limit=1 << 10)
    record_hashes(newer)
    upload_tree(client, newer, bucket, "set/train")
    with caplog.at_level("WARNING", logger="af_train.data.loader"):
        assert read_all() == codes(new_stored)
    assert f"the shards in s3://{bucket}/set/train changed since they were cached" in caplog.text


def test_each_node_gets_its_own_default_cache_folder(monkeypatch, tmp_path):
    from af_train.data.loader import cache_dir_for

    run_cache = str(tmp_path / "run" / "cache")
    folders = {}
    for rank in range(4):  # two nodes of two ranks, the run directory shared between them
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank % 2))
        folders[rank] = cache_dir_for(DataConfig(remote="s3://a/set"), "train", "s3://a/set/train", run_cache)
    assert folders[0] == folders[1] != folders[2] == folders[3]
    assert Path(folders[2]).parent.name == "node1" and Path(folders[2]).name.startswith("train-")
    # an explicit node-local cache is used as given
    nvme = tmp_path / "nvme"
    assert Path(cache_dir_for(DataConfig(remote="s3://a/set", local_cache=str(nvme)), "train", "s3://a/set/train",
                              run_cache)).parent == nvme
