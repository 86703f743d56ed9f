"""af-synth-speech: deterministic spoken words, speakers disjoint between splits, balanced, audible, readable."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from af_train_tools import make_speech_audio as speech

from af_train.prepare.cli import build_parser as prepare_parser
from af_train.prepare.planning import plan_splits
from af_train.prepare.sources import load_csv_source

WORDS = ["yes", "no", "stop"]
SMALL = ["--words", ",".join(WORDS), "--train-speakers", "2", "--val-speakers", "1", "--test-speakers", "1",
         "--repeats", "2", "--clip-seconds", "0.8", "--quiet"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("speech") / "a"
    assert speech.main(["--out", str(out), "--workers", "2", *SMALL]) == 0
    return out


def test_same_seed_same_files_whatever_the_worker_count(small_set, tmp_path):
    again = tmp_path / "b"
    assert speech.main(["--out", str(again), "--workers", "1", *SMALL]) == 0
    first = digests(small_set)
    assert len([k for k in first if k.endswith(".wav")]) == 4 * len(WORDS) * 2
    assert digests(again) == first
    other = tmp_path / "c"
    assert speech.main(["--out", str(other), "--workers", "1", "--seed", "1", *SMALL]) == 0
    changed = digests(other)
    assert changed["vocabulary.txt"] == first["vocabulary.txt"] and changed["speakers.csv"] != first["speakers.csv"]


def test_speakers_are_disjoint_between_splits(small_set):
    speakers = read_csv(small_set / "speakers.csv")
    assert Counter(s["split"] for s in speakers) == {"train": 2, "val": 1, "test": 1}
    split_of = {s["speaker"]: s["split"] for s in speakers}
    seen: dict[str, set[str]] = {}
    for split in speech.SPLITS:
        for row in read_csv(small_set / f"{split}.csv"):
            speaker = Path(row["path"]).parent.name
            assert split_of[speaker] == split, row
            seen.setdefault(split, set()).add(speaker)
    assert not (seen["train"] & seen["val"] or seen["train"] & seen["test"] or seen["val"] & seen["test"])
    # at scale: every (voice, variant) pair is one speaker, so no voice of the test split was heard in training
    planned = speech.plan_speakers(0, {"train": 120, "val": 30, "test": 30}, speech.available_variants())
    pairs = [(s.voice, s.variant) for s in planned]
    assert len(set(pairs)) == len(pairs) == 180
    assert {s.split for s in planned[:120]} == {"train"} and {s.split for s in planned[150:]} == {"test"}
    assert any(s.voice in speech.ACCENT_VOICES for s in planned[150:])  # accents reach the test split too
    assert len({s.variant for s in planned}) > 50


def test_every_split_is_balanced_over_the_words(small_set):
    for split, speakers in (("train", 2), ("val", 1), ("test", 1)):
        rows = read_csv(small_set / f"{split}.csv")
        assert list(rows[0]) == ["path", "labels"]
        assert Counter(r["labels"] for r in rows) == {w: speakers * 2 for w in WORDS}
    combined = read_csv(small_set / "labels.csv")
    assert len(combined) == 4 * len(WORDS) * 2 and (small_set / "vocabulary.txt").read_text().split() == WORDS


def windowed_rms(x: np.ndarray, size: int) -> np.ndarray:
    frames = x[: len(x) // size * size].reshape(-1, size)
    return np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1))


def test_a_clip_is_audible_speech_over_a_quieter_background(small_set):
    for row in read_csv(small_set / "test.csv"):
        x, rate = sf.read(small_set / row["path"])
        assert rate == 16000 and x.ndim == 1 and len(x) == int(0.8 * rate)
        assert 10 ** (-26 / 20) <= np.abs(x).max() <= 10 ** (-2.9 / 20)  # peak within the drawn -25..-3 dBFS
        rms = windowed_rms(x, 320)  # 20 ms windows
        loud = rms > 0.25 * rms.max()
        assert 0.05 <= loud.mean() <= 0.9, row  # a word: part of the clip, not all of it, not a click
        assert 20 * np.log10(rms.max() / np.median(np.sort(rms)[: len(rms) // 4])) > 8, row  # above the noise floor
        spectrum = np.abs(np.fft.rfft(x)) ** 2
        freqs = np.fft.rfftfreq(len(x), 1 / rate)
        voiced_band = spectrum[(freqs >= 100) & (freqs <= 4000)].sum() / spectrum.sum()
        assert voiced_band > 0.5, row  # most energy where voices are
    # different words of one speaker are different sounds
    speaker_dir = small_set / Path(read_csv(small_set / "test.csv")[0]["path"]).parent
    a, _ = sf.read(speaker_dir / "yes_0.wav")
    b, _ = sf.read(speaker_dir / "stop_0.wav")
    assert not np.allclose(a, b)


def test_af_prepare_reads_the_csvs(small_set):
    for name, split in (("labels.csv", None), ("test.csv", "test")):
        argv = ["--format", "csv", "--input", str(small_set / name), "--labels", str(small_set / "vocabulary.txt"),
                "--out", "unused"] + (["--split", split] if split else [])
        source = load_csv_source(prepare_parser().parse_args(argv))
        assert source.vocabulary == WORDS and not source.multi_label
        plans = plan_splits(source)
        assert set(plans) == ({"train", "val", "test"} if split is None else {"test"})
        for tasks, rejects in plans.values():
            assert rejects == [] and all(Path(t.path).is_file() for t in tasks)
        assert len(plans["test"][0]) == len(WORDS) * 2


def test_bad_arguments_are_refused(tmp_path, capsys):
    assert speech.main(["--out", str(tmp_path), "--words", "yes", "--quiet"]) == 2
    assert "at least two distinct words" in capsys.readouterr().err
    assert speech.main(["--out", str(tmp_path), "--repeats", "0", "--clip-seconds", "0.1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--repeats" in err and "--clip-seconds" in err
    with pytest.raises(speech.SpeechSynthesisError, match="English and"):
        speech.plan_speakers(0, {"train": 100000, "val": 0, "test": 0}, ["f1"])


PAIR_WORDS = ["yes", "no", "up", "down"]
PAIRS = ["--words", ",".join(PAIR_WORDS), "--words-per-clip", "2", "--train-speakers", "2", "--val-speakers", "1",
         "--test-speakers", "1", "--repeats", "2", "--clip-seconds", "1.6", "--quiet"]


def test_two_words_per_clip_make_a_balanced_multi_label_set_of_disjoint_speakers(tmp_path):
    out = tmp_path / "pairs"
    assert speech.main(["--out", str(out), "--workers", "2", *PAIRS]) == 0
    again = tmp_path / "again"
    assert speech.main(["--out", str(again), "--workers", "1", *PAIRS]) == 0
    assert digests(again) == digests(out)  # deterministic whatever the worker count
    speakers = {s["speaker"]: s["split"] for s in read_csv(out / "speakers.csv")}
    pairs_seen = set()
    for split, count in (("train", 2), ("val", 1), ("test", 1)):
        rows = read_csv(out / f"{split}.csv")
        assert len(rows) == count * 2 * len(PAIR_WORDS) // 2  # every take: each word once, two to a clip
        words = [r["labels"].split(";") for r in rows]
        assert all(len(w) == 2 and w[0] != w[1] and set(w) <= set(PAIR_WORDS) for w in words)
        assert Counter(w for pair in words for w in pair) == {w: count * 2 for w in PAIR_WORDS}  # balanced
        assert {speakers[Path(r["path"]).parent.name] for r in rows} == {split}  # speakers stay in their split
        pairs_seen |= {tuple(w) for w in words}
        for row in rows:
            x, rate = sf.read(out / row["path"])
            assert rate == 16000 and len(x) == int(1.6 * rate)
            rms = windowed_rms(x, 320)
            halves = np.array_split(rms, 2)
            floor = np.median(np.sort(rms)[: len(rms) // 4])
            assert all(20 * np.log10(h.max() / floor) > 8 for h in halves), row  # a word in each half
    assert len(pairs_seen) > 2  # the pairing is shuffled, not fixed
    argv = ["--format", "csv", "--input", str(out / "labels.csv"), "--labels", str(out / "vocabulary.txt"),
            "--out", "unused"]
    assert load_csv_source(prepare_parser().parse_args(argv)).multi_label


def test_words_per_clip_must_divide_the_words_and_fit_the_clip(tmp_path, capsys):
    assert speech.main(["--out", str(tmp_path), "--words", "yes,no,up", "--words-per-clip", "2", "--quiet"]) == 2
    assert "divide the number of words (3)" in capsys.readouterr().err
    assert speech.main(["--out", str(tmp_path), "--words", "yes,no", "--words-per-clip", "2", "--clip-seconds", "0.5",
                        "--quiet"]) == 2
    assert "less than 0.3 s" in capsys.readouterr().err
