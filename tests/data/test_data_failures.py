"""A shard that fails to download must end in an error, never in a hang.

streaming's download threads report their exit to the epoch's iterator only when they end normally;
one that dies with an exception never did, so the next epoch or ``close()`` waited forever (CI hung
for 85 minutes on it). These tests pin the repair: dead threads report, ``close()`` is bounded, and a
corrupt shard read from a remote fails the same way whichever thread meets it first.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import pytest
from data_shards import write_shards
from streaming.base.dataset import _Iterator

from af_train.data import dataset as dataset_module
from af_train.data.dataset import AudioCodeDataset, DataError, load_manifest


def _dataset(local, *, remote=None, **kwargs) -> AudioCodeDataset:
    source = remote if remote is not None else local
    return AudioCodeDataset(manifest=load_manifest(source), local=str(local), remote=remote and str(remote),
                            batch_size=4, shuffle=False, max_length=24, **kwargs)


def _run_bounded(fn, seconds: float):
    """fn() in a thread; fails the test (instead of hanging it) if fn has not returned after ``seconds``."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} still running after {seconds} s (hang)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@pytest.mark.parametrize("thread_name", ["_prepare_thread", "_ready_thread"])
def test_a_download_thread_that_dies_still_reports_its_exit(tmp_path, thread_name):
    shards = tmp_path / "shards"
    write_shards(shards, 9, frames=20, num_classes=3, seed=11)
    ds = _dataset(shards)
    try:
        ds._event = threading.Event()
        it = _Iterator(np.arange(ds.size, dtype=np.int64))

        def broken_should_exit() -> bool:
            raise OSError("simulated failure inside the download thread")

        it.should_exit = broken_should_exit
        with pytest.raises(OSError, match="simulated failure"):
            getattr(ds, thread_name)(it)
        assert it._num_exited == 1  # 0 before the repair: iterator.exit() then waited forever
    finally:
        ds.close()


def test_close_gives_up_on_threads_that_never_stop(tmp_path, monkeypatch, caplog):
    shards = tmp_path / "shards"
    write_shards(shards, 9, frames=20, num_classes=3, seed=12)
    ds = _dataset(shards)
    ds._iterator = _Iterator(np.arange(ds.size, dtype=np.int64))  # an epoch whose threads never report
    monkeypatch.setattr(dataset_module, "THREAD_EXIT_TIMEOUT_S", 0.3)
    with caplog.at_level(logging.WARNING, logger="af_train.data.dataset"):
        _run_bounded(ds.close, 20)
    assert "download threads did not stop within 0.3 s; left running" in caplog.text


@pytest.mark.filterwarnings("ignore:predownload < batch_size")  # small on purpose
@pytest.mark.parametrize("predownload", [1, 2, 64])
def test_corrupt_remote_shard_fails_cleanly_whichever_thread_meets_it(tmp_path, predownload):
    """predownload=1 makes the main thread and the download thread race for the bad shard."""
    import xxhash

    remote = tmp_path / "remote"  # streaming copies from a plain directory as from a bucket
    stored = write_shards(remote, 40, frames=20, num_classes=3, seed=13, size_limit=1 << 10)
    index = json.loads((remote / "index.json").read_text())
    for shard in index["shards"]:
        shard["raw_data"]["hashes"] = {"xxh64": xxhash.xxh64((remote / shard["raw_data"]["basename"]).read_bytes())
                                       .hexdigest()}
    (remote / "index.json").write_text(json.dumps(index))
    assert len(index["shards"]) >= 4
    victim = index["shards"][1]["raw_data"]["basename"]
    data = bytearray((remote / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (remote / victim).write_bytes(bytes(data))

    for attempt in range(3):  # different interleavings of the threads each time
        cache = tmp_path / f"cache{attempt}"
        ds = _dataset(cache, remote=remote, validate_hash="xxh64", predownload=predownload, download_retry=1)
        seen = []

        def read_epoch(ds=ds, seen=seen):
            with pytest.raises(DataError, match=rf"shard '{victim}' of '{remote}' failed its xxh64 check"):
                for sample in ds:
                    seen.append(sample["id"])

        _run_bounded(read_epoch, 60)
        assert len(seen) < len(stored)
        started = time.monotonic()
        _run_bounded(ds.close, 60)
        assert time.monotonic() - started < 30
        assert not (cache / victim).exists()
