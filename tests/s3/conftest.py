"""Fixtures for the object-storage tests: a real S3-compatible server (moto) on loopback.

The server is moto's standalone server from PyPI, started as its own process on a free 127.0.0.1
port for this test package and stopped after it. Every test gets its own bucket and a credential
environment with a recognisable secret, so a test can grep run directories for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
SECRET = "af-test-secret-7f3a9c0e5d"  # must never show up in logs, run dirs or checkpoints
ACCESS_KEY = "AKIAAFTRAINTEST0001"


sys.path.insert(0, str(TESTS / "engine"))  # the launcher helpers and synthetic shards of the engine tests
import engine_helpers  # noqa: E402,F401  (re-exported for the tests here)
import engine_synthetic  # noqa: E402,F401


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, process: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/moto-api/", timeout=1):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="package")
def s3_endpoint(tmp_path_factory) -> str:
    """URL of a moto S3 server running in its own process for the duration of tests/s3."""
    pytest.importorskip("moto.server")
    pytest.importorskip("boto3")
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    for _ in range(3):  # the free port may be taken between probing and binding: try another
        port = _free_port()
        with open(log, "ab") as out:
            process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        if _wait_until_up(url, process, timeout=60):
            break
        process.kill()
        process.wait()
    else:
        pytest.fail(f"moto server did not start; log:\n{log.read_text(errors='replace')[-3000:]}")
    yield url
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def s3_environment(endpoint: str, home: Path) -> dict[str, str]:
    """AWS variables for the test server; no profile or config file of the machine leaks in."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
        "S3_ENDPOINT_URL": endpoint, "AWS_CONFIG_FILE": str(home / "aws_config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws_credentials"), "AWS_EC2_METADATA_DISABLED": "true",
    }


_BUCKETS = itertools.count()


@pytest.fixture
def s3(s3_endpoint, monkeypatch, tmp_path):
    """(boto3 client, a fresh bucket name); the AWS environment points at the test server."""
    import boto3

    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    for key, value in s3_environment(s3_endpoint, tmp_path).items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"af-test-{os.getpid()}-{next(_BUCKETS)}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


def upload_tree(client, local: Path, bucket: str, prefix: str) -> list[str]:
    """Upload every file under ``local`` to ``s3://bucket/prefix/...``; returns the keys."""
    keys = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        key = f"{prefix.strip('/')}/{path.relative_to(local).as_posix()}"
        client.upload_file(str(path), bucket, key)
        keys.append(key)
    return keys


def record_hashes(directory: Path) -> None:
    """Add sha1/xxh64 of every shard to ``index.json`` (what tools/prepare_dataset.py records)."""
    import xxhash

    index_path = directory / "index.json"
    index = json.loads(index_path.read_text())
    for shard in index["shards"]:
        data = (directory / shard["raw_data"]["basename"]).read_bytes()
        shard["raw_data"]["hashes"] = {"sha1": hashlib.sha1(data).hexdigest(), "xxh64": xxhash.xxh64(data).hexdigest()}
    index_path.write_text(json.dumps(index))
