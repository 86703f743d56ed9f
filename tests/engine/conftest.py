"""Fixtures for the engine tests: synthetic shards and /dev/shm cleanup after launched jobs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from af_train_tools.synthetic_shards import write_patterned_dataset

sys.path.insert(0, str(Path(__file__).parent))
from engine_helpers import USED_PORTS, release_shm  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_shm():
    yield
    while USED_PORTS:
        release_shm(USED_PORTS.pop())


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    return write_patterned_dataset(tmp_path_factory.mktemp("engine_data"))
