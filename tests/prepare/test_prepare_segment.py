"""af-prepare --segment: long files cut into consecutive clips FILE#k, read clip by clip, resumable."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
from af_train_tools import make_synthetic_audio as synth
from streaming import LocalDataset

from af_train import prepare as prep
from af_train.prepare import decoding
from af_train.shards import Manifest, segment_of
from af_train.tokenizers import audio_io

RATE = 16000
CLIP = 0.5  # seconds per clip in these tests
FAST = ["--codec-random-init", "0", "--workers", "0", "--threads", "1", "--quiet", "--clip-seconds", str(CLIP),
        "--batch-size", "4"]


@pytest.fixture(autouse=True)
def _one_thread(single_torch_thread):
    yield


def _write_long(path: Path, seconds: float, first_index: int = 0) -> np.ndarray:
    """A file of ``seconds`` made of different synthetic sounds one after another (each clip differs)."""
    parts, total, index = [], 0, first_index
    need = int(round(seconds * RATE))
    while total < need:
        audio, _ = synth.make_clip(index, seed=3, sample_rate=RATE, clip_seconds=0.4, multi_label_prob=0.0)
        parts.append(audio[: need - total, 0])  # [samples, 1] → mono
        total += len(parts[-1])
        index += 1
    data = np.concatenate(parts).astype(np.float32)
    sf.write(str(path), data, RATE, subtype="FLOAT")
    return data


def _read(directory: Path) -> list[dict]:
    ds = LocalDataset(local=str(directory))
    return [ds[i] for i in range(len(ds))]


def _run(tmp_path: Path, rows: list[str], out: str = "out", extra: tuple[str, ...] = ()) -> int:
    (tmp_path / "labels.csv").write_text("path,labels\n" + "".join(r + "\n" for r in rows))
    return prep.main(["--format", "csv", "--input", str(tmp_path / "labels.csv"), "--out", str(tmp_path / out),
                      *FAST, *extra])


def test_segment_starts_reach_the_end_of_the_file():
    # 3.1 s at 16 kHz, 1 s clips: 0, 1, 2 s end before 3.1 s, the clip from 3 s reaches the end
    assert audio_io.segment_starts(49600, 16000, 1.0, 1.0) == [0, 16000, 32000, 48000]
    # exactly three clips long: the third clip ends on the last sample, no fourth
    assert audio_io.segment_starts(48000, 16000, 1.0, 1.0) == [0, 16000, 32000]
    assert audio_io.segment_starts(8000, 16000, 1.0, 1.0) == [0]  # shorter than a clip: one clip
    assert audio_io.segment_starts(48000, 16000, 1.0, 0.5) == [0, 8000, 16000, 24000, 32000]  # overlapping
    # 30 minutes of 10 s clips at 44.1 kHz: 180 clips; a hop of 1/3 s does not drift over an hour
    assert len(audio_io.segment_starts(30 * 60 * 44100, 44100, 10.0, 10.0)) == 180
    starts = audio_io.segment_starts(3600 * 22050, 22050, 1.0, 1 / 3)
    assert starts[-1] == 3600 * 22050 - 22050 and starts[3 * 1000] == 1000 * 22050


def test_segment_ids_labels_remainder_and_codes(tmp_path, random_codec):
    long = _write_long(tmp_path / "long.wav", 1.6)  # clips from 0, 0.5, 1.0 s; 0.1 s left from 1.5 s
    _write_long(tmp_path / "short.wav", 0.3, first_index=7)  # one padded clip
    _write_long(tmp_path / "tiny.wav", 0.1, first_index=9)  # the whole file is too short
    rows = ["long.wav,dog;cat", "short.wav,cat", "tiny.wav,dog", "missing.wav,dog"]
    assert _run(tmp_path, rows, extra=("--segment",)) == 0
    out = tmp_path / "out"
    manifest = Manifest.load(out)
    samples = _read(out)
    assert [s["id"] for s in samples] == ["long#0", "long#1", "long#2", "short#0"]
    assert [s["labels"].tolist() for s in samples] == [[0, 1]] * 3 + [[0]]  # inherited from the file
    assert [int(s["length"]) for s in samples] == [38, 38, 38, 23]  # 0.3 s → 7200 samples → ceil(7200 / 320)
    assert manifest.written == 4
    assert manifest.rejected == {"missing_file": 1, "short_remainder": 1, "too_short": 1}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rejects] == [
        ("long#3", "short_remainder"), ("tiny#0", "too_short"), ("missing", "missing_file")]
    assert manifest.extra["prepare"]["segment"]["hop_seconds"] == CLIP
    assert segment_of("long#2", manifest) == ("long", 2, 1.0)
    assert manifest.seconds_of_audio == pytest.approx(1.5 + 0.3)

    # independent path: the file's audio from k × 0.5 s (one sample more, as a clip is read), resampled, cropped
    n_src, n_out = int(CLIP * RATE), int(CLIP * 24000)
    clips = [AF.resample(torch.from_numpy(long[k * n_src: (k + 1) * n_src + 1]), RATE, 24000)[:n_out]
             for k in range(3)]
    expected = random_codec.encode_batch(torch.stack(clips + [torch.zeros(n_out)]))[:3]
    for s, c in zip(samples, expected):
        assert np.array_equal(s["codes"], c.numpy()), s["id"]

    # clip 0 of a file is the clip af-prepare makes of it without --segment
    assert _run(tmp_path, ["long.wav,dog;cat"], out="plain") == 0
    [plain] = _read(tmp_path / "plain")
    assert plain["id"] == "long" and np.array_equal(plain["codes"], samples[0]["codes"])
    assert "segment" not in Manifest.load(tmp_path / "plain").extra["prepare"]


def test_segment_hop_overlaps(tmp_path):
    _write_long(tmp_path / "a.wav", 1.0)
    assert _run(tmp_path, ["a.wav,dog"], extra=("--segment", "--segment-hop", "0.25")) == 0
    manifest = Manifest.load(tmp_path / "out")
    assert [s["id"] for s in _read(tmp_path / "out")] == ["a#0", "a#1", "a#2"]  # from 0, 0.25, 0.5 s
    assert segment_of("a#1", manifest)[2] == 0.25 and manifest.rejected == {}


@pytest.mark.parametrize("extra, needle", [
    (("--segment-hop", "0.25"), "only with --segment"),
    (("--segment", "--segment-hop", "0.75"), "at most the clip"),
    (("--segment", "--segment-hop", "0"), "must be > 0"),
])
def test_segment_arguments_are_checked_first(tmp_path, capsys, extra, needle):
    with pytest.raises(SystemExit) as err:
        _run(tmp_path, ["a.wav,dog"], extra=extra)
    assert needle in str(err.value)


def test_interrupted_segment_run_resumes_without_duplicates(tmp_path, monkeypatch):
    _write_long(tmp_path / "a.wav", 2.4)  # 5 clips, the last 0.4 s long
    _write_long(tmp_path / "b.wav", 1.3, first_index=5)  # 3 clips
    rows = ["a.wav,dog", "b.wav,cat"]
    chunked = ("--segment", "--chunk-size", "3")
    assert _run(tmp_path, rows, out="whole", extra=chunked) == 0
    reference = _read(tmp_path / "whole")
    assert len(reference) == 8

    decoded: list[str] = []
    interrupt = {"at": "b#0"}  # first run: Ctrl-C in the middle of the second chunk (a#3, a#4, b#0)
    original_decode = decoding.decode

    def counting_decode(settings, task):
        decoded.append(task.id)
        if task.id == interrupt.get("at"):
            interrupt.clear()
            raise KeyboardInterrupt
        return original_decode(settings, task)

    monkeypatch.setattr(decoding, "decode", counting_decode)
    assert _run(tmp_path, rows, extra=chunked) == 130
    out = tmp_path / "out"
    committed = {p: p.stat().st_mtime_ns for p in out.glob("part-*/chunk.json")}
    assert len(committed) == 1 and not (out / "manifest.json").exists()
    decoded.clear()
    assert _run(tmp_path, rows, extra=chunked) == 0
    assert decoded == ["a#3", "a#4", "b#0", "b#1", "b#2"]  # only the clips of the unfinished chunks
    assert all(p.stat().st_mtime_ns == t for p, t in committed.items())
    resumed = _read(out)
    assert [s["id"] for s in resumed] == [s["id"] for s in reference]  # each clip once, in order
    for s, r in zip(resumed, reference):
        assert np.array_equal(s["codes"], r["codes"]) and s["labels"].tolist() == r["labels"].tolist()


def test_resume_over_a_file_whose_length_changed_is_refused(tmp_path, monkeypatch):
    _write_long(tmp_path / "a.wav", 2.2)
    original_add = prep.ChunkWriter.add

    def interrupting_add(self, task, outcome):
        if task.id == "a#3":
            raise KeyboardInterrupt
        return original_add(self, task, outcome)

    monkeypatch.setattr(prep.ChunkWriter, "add", interrupting_add)
    assert _run(tmp_path, ["a.wav,dog"], extra=("--segment", "--chunk-size", "2")) == 130
    monkeypatch.setattr(prep.ChunkWriter, "add", original_add)
    _write_long(tmp_path / "a.wav", 3.2)  # two more clips: the chunk boundaries would move
    with pytest.raises(SystemExit) as err:
        _run(tmp_path, ["a.wav,dog"], extra=("--segment", "--chunk-size", "2"))
    assert "segment" in str(err.value) and "--overwrite" in str(err.value)


def test_a_long_file_is_read_one_clip_at_a_time(tmp_path, monkeypatch):
    """Streaming: one read per clip, from the clip's start, of one clip's frames (plus one); never the whole file."""
    seconds = 6.0
    _write_long(tmp_path / "a.wav", seconds)
    reads: list[tuple[int, int]] = []  # (position, frames) of every read
    original_read = sf.SoundFile.read

    def read(self, frames=-1, *args, **kwargs):
        reads.append((self.tell(), frames))
        return original_read(self, frames, *args, **kwargs)

    def whole_file(*args, **kwargs):
        raise AssertionError("soundfile.read decodes the whole file")

    monkeypatch.setattr(sf.SoundFile, "read", read)
    monkeypatch.setattr(sf, "read", whole_file)
    assert _run(tmp_path, ["a.wav,dog"], extra=("--segment",)) == 0
    clips = int(seconds / CLIP)
    assert len(_read(tmp_path / "out")) == clips
    assert [position for position, _ in reads] == [k * int(CLIP * RATE) for k in range(clips)]
    assert all(0 < frames <= math.ceil(CLIP * RATE) + 1 for _, frames in reads)
