"""af-prepare --out s3://... on two CPU ranks (the real launcher): each rank stages and uploads its own chunks,
rank 0 merges from the bucket; the bucket then holds what one process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def keys(client, bucket: str, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {obj["Key"][len(prefix):] for page in pages for obj in page.get("Contents", [])}


def test_two_ranks_to_s3_equal_one_local_process(s3, synthetic_audio, prepared_shards, tmp_path):
    client, bucket = s3
    url = f"s3://{bucket}/synth"
    # the arguments of the session's prepared_shards fixture (one process, local), on two ranks into the bucket
    argv = ["--format", "csv", "--input", str(synthetic_audio / "labels.csv"),
            "--labels", str(synthetic_audio / "vocabulary.txt"), "--out", url, "--staging-dir", str(tmp_path / "st"),
            "--codec-random-init", "0", "--clip-seconds", "1.0", "--workers", "0", "--chunk-size", "4",
            "--batch-size", "4", "--quiet", "--threads", "1", "--num_cpu_ranks", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run([sys.executable, "-m", "af_train.prepare", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert {p.name for p in (tmp_path / "st").iterdir()} == {"rank-00000", "rank-00001"}  # one staging per rank
    for split in ("train", "val", "test"):
        local = prepared_shards / split
        expected = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
        assert keys(client, bucket, f"synth/{split}/") == expected, split
        for name in sorted(expected):
            body = client.get_object(Bucket=bucket, Key=f"synth/{split}/{name}")["Body"].read()
            if name.endswith((".mds", "index.json", "rejects.jsonl")):
                assert body == (local / name).read_bytes(), (split, name)
            elif name.endswith("chunk.json"):  # the same counts; written by the rank that owns the chunk
                mine, theirs = json.loads(body), json.loads((local / name).read_text())
                assert mine.pop("rank") == mine["chunk"] % 2 and mine.pop("world_size") == 2
                assert {k: v for k, v in theirs.items() if k not in ("rank", "world_size")} == mine
            elif name == "manifest.json":
                mine, theirs = json.loads(body), json.loads((local / name).read_text())
                parts = mine["extra"].pop("parts")
                theirs["extra"].pop("parts")
                assert mine == theirs
                assert sum(p["written"] for p in parts) == mine["written"]
