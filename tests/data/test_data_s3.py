"""Streaming from S3 (a moto server on loopback) into the private cache, manifest included."""

from __future__ import annotations

import pytest
from data_shards import write_shards

from af_train.config import DataConfig
from af_train.data.dataset import load_manifest
from af_train.data.loader import build_dataloader
from af_train.shards import ManifestError

pytestmark = pytest.mark.slow


@pytest.fixture
def s3_bucket(monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "S3_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="audio")
    yield client
    server.stop()


def test_remote_s3_split_streams_every_clip_through_the_cache(s3_bucket, tmp_path, loaders):
    stored = write_shards(tmp_path / "shards", 30, frames=20, num_classes=4, seed=9)
    for path in (tmp_path / "shards").iterdir():
        s3_bucket.upload_file(str(path), "audio", f"as20k/train/{path.name}")

    manifest = load_manifest("s3://audio/as20k/train")
    assert manifest.written == 30 and manifest.num_classes == 4

    cache = tmp_path / "cache"
    cfg = DataConfig(remote="s3://audio/as20k", local_cache=str(cache), max_length=24, download_retry=1)
    loaders.append(loader := build_dataloader(cfg, "train", 4, mask=True, seed=0, drop_last=False))
    ids = [clip for batch in loader for clip in batch["ids"]]
    assert sorted(ids) == sorted(stored)
    (split_cache,) = cache.iterdir()
    assert split_cache.name.startswith("train-") and (split_cache / "index.json").is_file()

    with pytest.raises(ManifestError, match="could not fetch manifest.json from 's3://audio/missing'"):
        load_manifest("s3://audio/missing")
