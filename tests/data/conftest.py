"""Fixtures for the data tests: synthetic shards and streaming shared-memory hygiene."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # data_rank_worker, also for spawned ranks

from af_train_tools.synthetic_shards import write_random_shards  # noqa: E402

from af_train.data.shm import clean_stale_streaming_shm  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _streaming_shm_cleanup():
    """Drop leftovers of killed streaming processes before and after the data tests."""
    clean_stale_streaming_shm()
    yield
    clean_stale_streaming_shm(min_age_s=0)  # ours are all closed by now; live segments are kept anyway


@pytest.fixture(scope="module")
def multi_label_shards(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shards_multi")
    stored = write_random_shards(out, 37, frames=30, num_classes=6, multi_label=True, seed=1, min_length=0)
    return out, stored


@pytest.fixture(scope="module")
def single_label_shards(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shards_single")
    stored = write_random_shards(out, 20, frames=30, num_classes=4, multi_label=False, seed=2)
    return out, stored
