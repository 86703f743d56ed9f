"""Helpers for the object-storage tests (a module with a unique name: every test folder has a conftest)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "engine"))  # the launcher helpers of the engine tests
import engine_helpers  # noqa: E402,F401  (re-exported for the tests here)

SECRET = "af-test-secret-7f3a9c0e5d"  # must never show up in logs, run dirs or checkpoints
ACCESS_KEY = "AKIAAFTRAINTEST0001"


def s3_environment(endpoint: str, home: Path) -> dict[str, str]:
    """AWS variables for the test server; no profile or config file of the machine leaks in."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
        "S3_ENDPOINT_URL": endpoint, "AWS_CONFIG_FILE": str(home / "aws_config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws_credentials"), "AWS_EC2_METADATA_DISABLED": "true",
    }


def upload_tree(client, local: Path, bucket: str, prefix: str) -> list[str]:
    """Upload every file under ``local`` to ``s3://bucket/prefix/...``; returns the keys."""
    keys = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        key = f"{prefix.strip('/')}/{path.relative_to(local).as_posix()}"
        client.upload_file(str(path), bucket, key)
        keys.append(key)
    return keys


def record_hashes(directory: Path) -> None:
    """Add sha1/xxh64 of every shard to ``index.json`` (what af-prepare records)."""
    import xxhash

    index_path = directory / "index.json"
    index = json.loads(index_path.read_text())
    for shard in index["shards"]:
        data = (directory / shard["raw_data"]["basename"]).read_bytes()
        shard["raw_data"]["hashes"] = {"sha1": hashlib.sha1(data).hexdigest(), "xxh64": xxhash.xxh64(data).hexdigest()}
    index_path.write_text(json.dumps(index))
