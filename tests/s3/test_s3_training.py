"""Two ranks train from shards in S3 with a small cache: killed, resumed, same batches as from disk.

One local-disk reference run and one remote run (kill -9 mid-run, then resume) through the real
``deepspeed`` launcher, the moto server standing in for S3 (the resume and the reference one after the
other in one launch). The remote run's cache holds only a few
of the shards at a time, so streaming evicts and re-downloads while training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from af_train_tools.synthetic_shards import write_patterned_split
from s3_helpers import ACCESS_KEY, SECRET, engine_helpers, upload_tree

from af_train.checkpoint import latest_complete, step_of
from af_train.run_logging import read_metrics

pytestmark = pytest.mark.slow

STEPS = 24
SHARD_BYTES = 1 << 12  # ~14 clips per shard: the training split has 19 shards
CACHE_LIMIT = "48kb"  # index.json (9 kB) + about 9 of the 19 shards
# Streaming waits forever (it does not re-download) when a shard it waits for is evicted meanwhile:
# the cache must hold the shards of one shuffle block and the look-ahead (see README).
SHUFFLE_BLOCK = 48


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.endswith("}")),
               default=0)


@pytest.fixture
def launcher(s3, monkeypatch):
    """Start/wait helpers of tests/engine with the S3 environment. Afterwards: no launched job is left
    running (also when the test failed while waiting) and DeepSpeed's /dev/shm buffers are released."""
    started = []
    real_start = engine_helpers.start

    def start(*args, **kwargs):
        started.append(process := real_start(*args, **kwargs))
        return process

    monkeypatch.setattr(engine_helpers, "start", start)
    yield engine_helpers
    for process in started:
        if process.poll() is None or engine_helpers._live_members(process.pid):
            engine_helpers.signal_group(process, missing_ok=True)
    while engine_helpers.USED_PORTS:
        engine_helpers.release_shm(engine_helpers.USED_PORTS.pop())


def test_two_ranks_stream_from_s3_with_eviction_kill_and_resume(s3, launcher, tmp_path):
    client, bucket = s3
    data = tmp_path / "shards"
    # small shards (eviction needs more shards than the cache holds), hashes recorded as by af-prepare
    for split, count in (("train", 256), ("val", 24)):
        write_patterned_split(data / split, count, split=split, size_limit=SHARD_BYTES, hashes=["sha1", "xxh64"])
        upload_tree(client, data / split, bucket, f"sets/synth/{split}")
    shards = json.loads((data / "train" / "index.json").read_text())["shards"]
    assert len(shards) >= 15
    shard_of = dict(enumerate(np.repeat(np.arange(len(shards)), [s["samples"] for s in shards])))

    reference = tmp_path / "local_run"
    common = ["train.save_every=4", "train.keep_last=3", "train.zero_stage=2",
              f"data.shuffle_block_size={SHUFFLE_BLOCK}"]

    # -- remote: s3 with a small cache, kill -9, resume ------------------------------------------
    run_dir = tmp_path / "s3_run"
    run_dir.mkdir()
    log = run_dir / "launcher.log"
    remote = [f"data.remote=s3://{bucket}/sets/synth", "data.train=train", "data.val=val",
              f"data.cache_limit={CACHE_LIMIT}", "data.validate_hash=xxh64", "data.predownload=4",
              "data.download_retry=2", "data.download_timeout=30"]
    overrides = engine_helpers.base_overrides(data, run_dir)
    overrides = [o for o in overrides if not o.startswith(("data.train=", "data.val="))] + remote + common
    process = launcher.start(2, overrides + ["train.max_steps=100000"], log)
    root = run_dir / "checkpoints"
    deadline = time.monotonic() + 240
    while not (latest_complete(root) is not None and logged_step(run_dir) >= 10):  # steps take ~30 ms: poll fast
        assert process.poll() is None, log.read_text(errors="replace")[-4000:]
        assert time.monotonic() < deadline, "timed out waiting for a checkpoint and step 10"
        time.sleep(0.01)
    launcher.signal_group(process)
    resumed_from = step_of(latest_complete(root).name)
    assert 4 <= resumed_from <= logged_step(run_dir) < STEPS  # killed mid-run

    cache_dirs = list((run_dir / "cache").glob("train-*"))
    assert len(cache_dirs) == 1
    # the resume (first, in fresh ranks), then in the same launch the reference from local disk
    launcher.run_sequence(2, [
        {"overrides": overrides + [f"train.max_steps={STEPS}"], "log": log},
        {"overrides": engine_helpers.base_overrides(data, reference) + [f"train.max_steps={STEPS}", *common],
         "log": tmp_path / "local.log"},
    ], run_dir / "sequence_launcher.log", timeout=600)  # checked for credentials below, as the run's log
    resumed = log.read_text(errors="replace").split("resumed from")[-1]
    assert f"step_{resumed_from:08d} at step {resumed_from}" in resumed

    # same batches, bit-identical losses as the local-disk run
    assert engine_helpers.batch_ids(run_dir) == engine_helpers.batch_ids(reference)
    mine, theirs = losses(run_dir), losses(reference)
    assert sorted(mine) == list(range(1, STEPS + 1))
    assert all(mine[s] == theirs[s] for s in mine), [(s, mine[s], theirs[s]) for s in mine if mine[s] != theirs[s]]
    assert (run_dir / "final" / "model.pt").is_file()

    # the cache stayed under its limit although more shards were read than it holds: shards were evicted
    touched = {shard_of[int(clip[len("train"):])] for ids in engine_helpers.batch_ids(run_dir).values() for clip in ids}
    cached = {int(p.name.split(".")[1]) for p in cache_dirs[0].rglob("shard.*.mds")}
    assert cached and len(touched) > len(cached) + 4, (sorted(touched), sorted(cached))
    assert sum(shards[i]["raw_data"]["bytes"] for i in cached) <= 48 * 1024

    # credentials never reach logs, run files or checkpoints (the access key id is not a secret, but
    # it is not recorded either)
    for path in [log, *run_dir.rglob("*")]:
        if path.is_file():
            blob = path.read_bytes()
            assert SECRET.encode() not in blob and ACCESS_KEY.encode() not in blob, path
    assert f"s3://{bucket}/sets/synth" in (run_dir / "config.yaml").read_text()

