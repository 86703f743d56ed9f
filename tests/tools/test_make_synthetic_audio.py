"""make_synthetic_audio: real, deterministic, distinct classes, labels CSV and splits."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
from af_train_tools import make_synthetic_audio as synth

REPO = Path(__file__).resolve().parents[2]


def _rows(folder: Path) -> list[dict]:
    with open(folder / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_files_labels_and_splits(synthetic_audio):
    rows = _rows(synthetic_audio)
    assert len(rows) == 16 and set(rows[0]) == {"path", "labels", "split", "id"}
    vocabulary = (synthetic_audio / "vocabulary.txt").read_text().split()
    assert vocabulary == synth.CLASSES
    assert {r["split"] for r in rows} <= {"train", "val", "test"}
    assert any(";" in r["labels"] for r in rows)  # multi-label mixtures exist
    for i, r in enumerate(rows):
        labels = r["labels"].split(";")
        assert synth.CLASSES[i % len(synth.CLASSES)] in labels  # the primary class cycles
        assert set(labels) <= set(vocabulary) and len(set(labels)) == len(labels)
        data, rate = sf.read(str(synthetic_audio / r["path"]))
        assert rate == 16000 and data.shape == (16000,)
        assert 10 ** (-21 / 20) < np.abs(data).max() < 10 ** (-2.9 / 20)  # level drawn in [-20, -3] dBFS


def test_same_seed_same_bytes_and_prefix_stable(tmp_path):
    common = ["--clip-seconds", "0.3", "--sample-rate", "8000", "--quiet"]
    assert synth.main(["--out", str(tmp_path / "a"), "--num-clips", "5", "--seed", "3", *common]) == 0
    assert synth.main(["--out", str(tmp_path / "b"), "--num-clips", "3", "--seed", "3", *common]) == 0
    assert synth.main(["--out", str(tmp_path / "c"), "--num-clips", "3", "--seed", "4", *common]) == 0
    rows_a, rows_b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert rows_a[:3] == rows_b
    for r in rows_b:
        assert (tmp_path / "a" / r["path"]).read_bytes() == (tmp_path / "b" / r["path"]).read_bytes()
        assert (tmp_path / "c" / r["path"]).read_bytes() != (tmp_path / "b" / r["path"]).read_bytes()


def _band_energy(x: np.ndarray, rate: int, lo: float, hi: float) -> float:
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    return float(spectrum[(freqs >= lo) & (freqs < hi)].sum() / spectrum.sum())


def test_classes_are_acoustically_distinct():
    rate, n = 16000, 16000
    rng = np.random.default_rng(0)
    src = {name: synth.synthesize(name, n, rate, rng) for name in synth.CLASSES}
    assert _band_energy(src["tone"], rate, 200, 460) > 0.95
    assert _band_energy(src["low_rumble"], rate, 0, 160) > 0.95
    assert _band_energy(src["noise_burst"], rate, 2000, 8000) > 0.95
    assert _band_energy(src["am_tone"], rate, 950, 1650) > 0.95
    assert _band_energy(src["fm_tone"], rate, 2000, 4000) > 0.95
    assert _band_energy(src["chirp"], rate, 550, 5500) > 0.9
    assert _band_energy(src["harmonic_stack"], rate, 50, 2000) > 0.9
    clicks = src["clicks"]
    assert np.count_nonzero(np.abs(clicks) > 0.5) < 40  # sparse impulses, not a sustained sound
    # temporal structure: bursts are gated (many near-silent stretches), a tone is not
    frames = np.abs(src["noise_burst"][: n // 160 * 160]).reshape(-1, 160).max(axis=1)
    assert 0.2 < float(np.mean(frames < 1e-3)) < 0.9


def test_stereo_and_bad_arguments(tmp_path, capsys):
    out = tmp_path / "st"
    assert synth.main(["--out", str(out), "--num-clips", "2", "--clip-seconds", "0.2", "--channels", "2",
                       "--sample-rate", "44100", "--quiet"]) == 0
    data, rate = sf.read(str(out / _rows(out)[0]["path"]))
    assert data.shape == (8820, 2) and rate == 44100
    assert synth.main(["--out", str(tmp_path / "x"), "--num-clips", "0", "--val-fraction", "0.9"]) == 2
    err = capsys.readouterr().err
    assert "--num-clips" in err and "--val-fraction" in err


def test_runs_as_a_plain_script():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "make_synthetic_audio.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--num-clips" in result.stdout
