"""Session-wide fixtures: a small synthetic audio set, its prepared shards, a random-init codec and a
fitted mel-rvq tokenizer.

All are built lazily (only when a test asks) and once per session, because encoding costs real
CPU time. Other test packages may reuse ``prepared_shards`` for an end-to-end data set.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
from pathlib import Path

import pytest

# A whole-session bound: pytest-timeout's per-test alarm fires once, so a teardown that hangs after it
# (a thread that never stops) would otherwise hold CI until its own limit with nothing printed. Past
# this budget every thread's stack is printed and the run exits non-zero. (pytest's faulthandler_timeout
# ini option would cancel this timer: leave it unset.)
SESSION_BUDGET_S = float(os.environ.get("AF_TEST_SESSION_BUDGET_S", "2400"))


def _terminal_stderr(config):
    """A file on the real stderr: fd 2 is pytest's capture file by now, lost when the process exits."""
    capture = getattr(config.pluginmanager.getplugin("capturemanager"), "_global_capturing", None)
    saved_fd = getattr(getattr(capture, "err", None), "targetfd_save", None)
    return os.fdopen(os.dup(saved_fd), "w") if saved_fd is not None else sys.__stderr__


def pytest_configure(config) -> None:
    if SESSION_BUDGET_S > 0:
        config._af_watchdog_file = _terminal_stderr(config)  # kept alive: faulthandler holds only its fd
        faulthandler.dump_traceback_later(SESSION_BUDGET_S, exit=True, file=config._af_watchdog_file)


def pytest_unconfigure(config) -> None:
    faulthandler.cancel_dump_traceback_later()


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``cuda`` skip, with the reason, where no CUDA GPU is visible."""
    cuda_items = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_items:
        return
    import torch

    if not torch.cuda.is_available():
        for item in cuda_items:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with ``n`` torch threads: on a shared 2-core CI box, 2 threads fighting other
    processes made the codec's encoder 10x slower than 1 thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


SYNTH_CLIPS = 16
SYNTH_SECONDS = 1.0
SYNTH_RATE = 16000


@pytest.fixture(scope="session")
def synthetic_audio(tmp_path_factory) -> Path:
    """16 one-second 16 kHz wav files of the synthetic classes + labels.csv (train/val/test splits)."""
    from af_train_tools import make_synthetic_audio

    out = tmp_path_factory.mktemp("synthetic_audio")
    argv = ["--out", str(out), "--num-clips", str(SYNTH_CLIPS), "--clip-seconds", str(SYNTH_SECONDS),
            "--sample-rate", str(SYNTH_RATE), "--seed", "0", "--multi-label-prob", "0.4", "--quiet"]
    assert make_synthetic_audio.main(argv) == 0
    return out


@pytest.fixture(scope="session")
def prepared_shards(synthetic_audio, tmp_path_factory) -> Path:
    """``synthetic_audio`` prepared with a random-init codec (seed 0): DIR/{train,val,test} shards."""
    from af_train import prepare

    out = tmp_path_factory.mktemp("prepared") / "shards"
    argv = ["--format", "csv", "--input", str(synthetic_audio / "labels.csv"),
            "--labels", str(synthetic_audio / "vocabulary.txt"), "--out", str(out),
            "--codec-random-init", "0", "--clip-seconds", str(SYNTH_SECONDS),
            "--workers", "0", "--chunk-size", "4", "--batch-size", "4", "--quiet"]
    assert prepare.main([*argv, "--threads", "1"]) == 0
    return out


@pytest.fixture(scope="session")
def mel_rvq_file(synthetic_audio, tmp_path_factory) -> Path:
    """A small mel-rvq tokenizer (2 rows x 32 codes) fitted by af-fit-tokenizer on ``synthetic_audio``'s train
    split."""
    from af_train.prepare import fit_tokenizer

    out = tmp_path_factory.mktemp("tokenizer") / "mel_rvq.safetensors"
    argv = ["--kind", "mel-rvq", "--format", "csv", "--input", str(synthetic_audio / "labels.csv"),
            "--labels", str(synthetic_audio / "vocabulary.txt"), "--out", str(out), "--rows", "2", "--codes", "32",
            "--clip-seconds", str(SYNTH_SECONDS), "--workers", "0", "--threads", "1", "--quiet"]
    assert fit_tokenizer.main(argv) == 0
    return out


@pytest.fixture(scope="session")
def random_codec():
    """The seed-0 random-init codec at 3 kbps (the one ``prepared_shards`` uses), on the CPU."""
    from af_train.tokenizers.encodec import AcousticCodec

    with torch_threads(1):
        return AcousticCodec(random_init_seed=0, device="cpu")


@pytest.fixture
def single_torch_thread():
    """Use in codec-heavy tests (autouse in tests/tokenizers, tests/prepare and tests/inference)."""
    with torch_threads(1):
        yield


@pytest.fixture
def loaders():
    """Collects DataLoaders built in a test and releases their shared memory afterwards."""
    built: list = []
    yield built
    for loader in built:
        loader.dataset.close()
