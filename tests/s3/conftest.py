"""Fixtures for the object-storage tests: a real S3-compatible server (moto) on loopback.

The server is moto's standalone server from PyPI, started as its own process on a free 127.0.0.1
port for this test package and stopped after it. Every test gets its own bucket and a credential
environment with a recognisable secret, so a test can grep run directories for it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from s3_helpers import s3_environment  # noqa: E402


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
