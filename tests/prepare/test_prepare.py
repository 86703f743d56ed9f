"""af-prepare (af_train.prepare): every source format, rejects, label-file errors, resume after kill -9 / Ctrl-C."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
from af_train_tools import make_synthetic_audio as synth
from streaming import LocalDataset

from af_train import prepare as prep
from af_train.shards import Manifest

REPO = Path(__file__).resolve().parents[2]
FAST = ["--codec-random-init", "0", "--workers", "0", "--threads", "1", "--quiet"]


@pytest.fixture(autouse=True)
def _one_thread(single_torch_thread):
    yield


def _read_split(directory: Path) -> list[dict]:
    ds = LocalDataset(local=str(directory))
    return [ds[i] for i in range(len(ds))]


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_clip(path: Path, index: int, seconds: float = 0.5, rate: int = 16000, channels: int = 1) -> Path:
    audio, _ = synth.make_clip(index, seed=9, sample_rate=rate, clip_seconds=seconds, multi_label_prob=0.0,
                               channels=channels)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, rate)
    return path


def _expected_codes(codec, paths: list[Path], clip_seconds: float,
                    batch_size: int = 16) -> tuple[torch.Tensor, list[int]]:
    """Independent path: soundfile → mean over channels → torchaudio resample → zero pad → codec.

    The clips are encoded together in one batch zero-padded to the tool's --batch-size, as the tool
    encodes them: CPU kernels round differently for other batch sizes, and near-silent frames of a
    random codec sit close to several codebook entries, so only the same batch size reproduces the
    codes bit for bit.
    """
    waves, lengths = [], []
    n = int(round(clip_seconds * 24000))
    for path in paths:
        data, rate = sf.read(str(path), dtype="float64", always_2d=True)
        wav = AF.resample(torch.from_numpy(data.mean(axis=1)).float(), rate, 24000)
        valid = min(n, wav.shape[0])
        waves.append(torch.nn.functional.pad(wav[:n], (0, n - valid)))
        lengths.append(-(-valid // 320))
    waves += [torch.zeros(n)] * (batch_size - len(waves))
    return codec.encode_batch(torch.stack(waves))[: len(paths)], lengths


# ------------------------------------------------------------------------------------------ csv
def test_csv_splits_manifest_and_round_trip(prepared_shards, synthetic_audio, random_codec):
    rows = _csv_rows(synthetic_audio / "labels.csv")
    vocabulary = synth.CLASSES
    for split in ("train", "val", "test"):
        expected = [r for r in rows if r["split"] == split]
        manifest = Manifest.load(prepared_shards / split)
        assert manifest.split == split and manifest.written == len(expected) and manifest.rejected == {}
        assert manifest.labels == vocabulary and manifest.multi_label and manifest.source_format == "csv"
        assert manifest.codec.weights == "random-init seed 0" and manifest.codec.codebooks == 4
        assert manifest.frames == 75 and manifest.clip_seconds == 1.0
        assert manifest.seconds_of_audio == pytest.approx(len(expected) * 1.0)
        samples = _read_split(prepared_shards / split)
        assert [s["id"] for s in samples] == [r["id"] for r in expected]  # file order, each once
        for s, r in zip(samples, expected):
            assert s["labels"].tolist() == sorted(vocabulary.index(n) for n in r["labels"].split(";"))
            assert s["codes"].dtype == np.int16 and s["codes"].shape == (4, 75) and int(s["length"]) == 75
        for start in range(0, len(expected), 4):  # the fixture's chunks (and batches) of 4 clips
            batch = expected[start : start + 4]
            codes, _ = _expected_codes(random_codec, [synthetic_audio / r["path"] for r in batch], 1.0, 4)
            for s, c in zip(samples[start : start + 4], codes):
                assert np.array_equal(s["codes"], c.numpy())


def test_short_clip_length_and_single_split_layout(tmp_path, random_codec):
    _write_clip(tmp_path / "a.wav", 0, seconds=0.5, rate=22050, channels=2)
    _write_clip(tmp_path / "sub" / "b.flac", 1, seconds=1.3, rate=8000)
    (tmp_path / "labels.csv").write_text("path,labels\na.wav,dog\nsub/b.flac,cat;dog\n")
    out = tmp_path / "out"
    assert prep.main(["--format", "csv", "--input", str(tmp_path / "labels.csv"), "--out", str(out),
                      "--clip-seconds", "1", *FAST]) == 0
    manifest = Manifest.load(out)  # one split: straight into --out
    assert manifest.labels == ["cat", "dog"] and manifest.multi_label and manifest.split == "train"
    samples = {s["id"]: s for s in _read_split(out)}
    assert set(samples) == {"a", "sub/b"}
    assert int(samples["a"]["length"]) == 38  # 0.5 s → 12000 samples → ceil(12000 / 320)
    assert int(samples["sub/b"]["length"]) == 75  # cropped to the clip
    assert samples["sub/b"]["labels"].tolist() == [0, 1]
    expected, lengths = _expected_codes(random_codec, [tmp_path / "a.wav", tmp_path / "sub" / "b.flac"], 1.0)
    assert lengths == [38, 75]
    assert np.array_equal(samples["a"]["codes"], expected[0].numpy())
    assert np.array_equal(samples["sub/b"]["codes"], expected[1].numpy())
    assert manifest.seconds_of_audio == pytest.approx(1.5)


def test_every_bad_input_is_rejected_with_its_reason(tmp_path):
    for name, index in (("good1.wav", 0), ("good2.wav", 1), ("dup.wav", 2), ("unknown.wav", 3), ("nolab.wav", 4)):
        _write_clip(tmp_path / name, index)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage" + bytes(64))
    sf.write(str(tmp_path / "empty.wav"), np.zeros((0, 1)), 16000)
    sf.write(str(tmp_path / "silent.wav"), np.zeros(8000), 16000)
    sf.write(str(tmp_path / "one_sample.wav"), np.full(1, 0.5), 16000)  # was a clip of 1 valid frame
    sf.write(str(tmp_path / "short.wav"), np.sin(np.arange(3999) / 5.0) * 0.3, 16000)  # 0.25 s less a sample
    sf.write(str(tmp_path / "just_enough.wav"), np.sin(np.arange(4000) / 5.0) * 0.3, 16000)  # 0.25 s
    nan = np.sin(np.arange(8000) / 5.0) * 0.3
    nan[77] = np.nan
    sf.write(str(tmp_path / "nan.wav"), nan, 16000, subtype="FLOAT")
    (tmp_path / "vocab.txt").write_text("tone\nchirp\nnoise_burst\n")
    lines = ["id,path,labels", "g1,good1.wav,tone", "g2,good2.wav,chirp;tone", "gone,missing.wav,tone",
             "bad,corrupt.wav,tone", "empty,empty.wav,tone", "quiet,silent.wav,chirp", "nan,nan.wav,tone",
             "unk,unknown.wav,tone;elephant", "g1,dup.wav,tone", "nolab,nolab.wav,", "one,one_sample.wav,tone",
             "short,short.wav,tone", "enough,just_enough.wav,tone"]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    argv = ["--format", "csv", "--input", str(tmp_path / "labels.csv"), "--labels", str(tmp_path / "vocab.txt"),
            "--clip-seconds", "0.5", *FAST]
    assert prep.main([*argv, "--out", str(tmp_path / "out")]) == 0
    manifest = Manifest.load(tmp_path / "out")
    expected = {"missing_file": 1, "unreadable_audio": 1, "zero_length": 1, "silent": 1, "non_finite_samples": 1,
                "unknown_label": 1, "duplicate_id": 1, "no_labels": 1, "too_short": 2}
    assert manifest.rejected == expected and manifest.written == 3
    log = [json.loads(x) for x in (tmp_path / "out" / manifest.rejects_log).read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in log] == [
        ("gone", "missing_file"), ("bad", "unreadable_audio"), ("empty", "zero_length"), ("quiet", "silent"),
        ("nan", "non_finite_samples"), ("unk", "unknown_label"), ("g1", "duplicate_id"), ("nolab", "no_labels"),
        ("one", "too_short"), ("short", "too_short")]
    assert "--min-seconds" in log[-1]["detail"]
    assert all(set(r) >= {"id", "path", "reason"} for r in log)
    assert log[0]["path"].endswith("missing.wav") and "elephant" in log[5]["detail"]
    written = {s["id"]: s for s in _read_split(tmp_path / "out")}
    assert list(written) == ["g1", "g2", "enough"]
    assert int(written["enough"]["length"]) == 19  # 0.25 s → 6000 samples at 24 kHz → ceil(6000 / 320)
    # --keep-silent keeps the silent clip; a threshold change is a different preparation (new --out)
    assert prep.main([*argv, "--out", str(tmp_path / "keep"), "--keep-silent"]) == 0
    kept = Manifest.load(tmp_path / "keep")
    assert kept.written == 4 and "silent" not in kept.rejected
    # --min-seconds 0 turns the check off: the one-sample file is a clip again, of one valid frame
    assert prep.main([*argv, "--out", str(tmp_path / "any_length"), "--min-seconds", "0"]) == 0
    assert Manifest.load(tmp_path / "any_length").written == 5
    lengths = {s["id"]: int(s["length"]) for s in _read_split(tmp_path / "any_length")}
    assert lengths["one"] == 1 and lengths["short"] == 19


def test_nothing_written_exits_non_zero(tmp_path, capsys):
    (tmp_path / "labels.csv").write_text("path,labels\nnope1.wav,a\nnope2.wav,b\n")
    code = prep.main(["--format", "csv", "--input", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "o"), *FAST])
    assert code == 1
    assert "no usable clip" in capsys.readouterr().err
    manifest = Manifest.load(tmp_path / "o")
    assert manifest.written == 0 and manifest.rejected == {"missing_file": 2}


@pytest.mark.parametrize(
    "content,needle",
    [("file,labels\na.wav,x\n", "missing column(s) path"),
     ("path,labels\na.wav,x,extra\n", "labels.csv:2: 3 fields"),
     ("", "empty label file"),
     ("path,labels\n,x\n", "labels.csv:2: empty path"),
     ("path,labels,split\na.wav,x,../up\n", "not usable as a folder name")],
)
def test_malformed_label_file_is_a_clear_error(tmp_path, capsys, content, needle):
    (tmp_path / "labels.csv").write_text(content)
    argv = ["--format", "csv", "--input", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "o"), *FAST]
    assert prep.main(argv) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_label_vocabularies_and_indices(tmp_path):
    (tmp_path / "l.csv").write_text("path,labels\na.wav,2\nb.wav,0;1\nc.wav,7\n")
    (tmp_path / "v.txt").write_text("zero\none\ntwo\n")
    (tmp_path / "dup.txt").write_text("a\nb\na\n")
    args = prep.build_parser().parse_args(["--format", "csv", "--input", str(tmp_path / "l.csv"), "--out", "x"])
    source = prep.load_csv_source(args)
    assert source.vocabulary == [str(i) for i in range(8)] and source.multi_label
    args.labels = str(tmp_path / "v.txt")
    plans = prep.plan_splits(prep.load_csv_source(args))
    tasks, rejects = plans["train"]
    assert [(t.id, t.labels) for t in tasks] == [("a", [2]), ("b", [0, 1])]
    assert [(r.id, r.reason) for r in rejects] == [("c", "unknown_label")]
    args.multi_label = False  # --single-label: two labels on one clip is refused, not truncated
    tasks, rejects = prep.plan_splits(prep.load_csv_source(args))["train"]
    assert [r.reason for r in rejects] == ["multiple_labels", "unknown_label"]
    args.labels = str(tmp_path / "dup.txt")
    with pytest.raises(prep.LabelFileError, match="listed twice: a"):
        prep.load_csv_source(args)


# ------------------------------------------------------------------------------------------ other formats
def test_audioset_format(tmp_path):
    (tmp_path / "class_labels_indices.csv").write_text(
        'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/04rlf,Music\n2,/m/0jbk,"Animal"\n')
    audio = tmp_path / "audio"
    _write_clip(audio / "aaa.wav", 0)
    _write_clip(audio / "part2" / "Ybbb.flac", 1)
    _write_clip(audio / "ccc.wav", 2)
    (tmp_path / "segs.csv").write_text(
        "# Segments csv created Sun Mar  5 10:54:31 2017\n"
        "# num_ytids=4, num_segs=4, num_unique_labels=3, num_positive_labels=5\n"
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        'aaa, 30.000, 40.000, "/m/09x0r,/m/04rlf"\n'
        'bbb, 0.000, 10.000, "/m/0jbk"\n'
        'ccc, 10.000, 20.000, "/m/nope"\n'
        'ddd, 0.000, 10.000, "/m/04rlf"\n')
    out = tmp_path / "out"
    assert prep.main(["--format", "audioset", "--input", str(tmp_path / "segs.csv"), "--audio-dir", str(audio),
                      "--out", str(out), "--clip-seconds", "0.5", "--split", "balanced", *FAST]) == 0
    manifest = Manifest.load(out)
    assert manifest.labels == ["Speech", "Music", "Animal"] and manifest.multi_label
    assert manifest.split == "balanced" and manifest.source_format == "audioset"
    assert manifest.rejected == {"unknown_label": 1, "missing_file": 1}
    assert {s["id"]: s["labels"].tolist() for s in _read_split(out)} == {"aaa": [0, 1], "bbb": [2]}
    (tmp_path / "bad.csv").write_text("aaa, 30.000, 40.000\n")
    with pytest.raises(prep.LabelFileError, match=r"bad.csv:1: expected 4 fields"):
        prep.load_audioset_source(prep.build_parser().parse_args(
            ["--format", "audioset", "--input", str(tmp_path / "bad.csv"), "--out", "x"]))


def test_fsd50k_format(tmp_path):
    gt = tmp_path / "FSD50K.ground_truth"
    gt.mkdir()
    (gt / "vocabulary.csv").write_text("0,Bark,/m/05tny_\n1,Guitar,/m/042v_gx\n2,Rain,/m/06mb1\n")
    (gt / "dev.csv").write_text('fname,labels,mids,split\n11,"Bark,Rain","/m/05tny_,/m/06mb1",train\n'
                                "12,Guitar,/m/042v_gx,train\n13,Rain,/m/06mb1,val\n")
    (gt / "eval.csv").write_text("fname,labels,mids\n21,Bark,/m/05tny_\n")
    for split_dir, names in (("FSD50K.dev_audio", (11, 12, 13)), ("FSD50K.eval_audio", (21,))):
        for n in names:
            _write_clip(tmp_path / split_dir / f"{n}.wav", n)
    out = tmp_path / "out"
    assert prep.main(["--format", "fsd50k", "--input", str(tmp_path), "--out", str(out), "--clip-seconds", "0.5",
                      *FAST]) == 0
    got = {split: {s["id"]: s["labels"].tolist() for s in _read_split(out / split)}
           for split in ("train", "val", "test")}
    assert got == {"train": {"11": [0, 2], "12": [1]}, "val": {"13": [2]}, "test": {"21": [0]}}
    assert Manifest.load(out / "val").labels == ["Bark", "Guitar", "Rain"]


def test_esc50_format(tmp_path):
    (tmp_path / "meta").mkdir()
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for i in range(6):
        target = i % 3
        name = f"{i // 2 + 1}-{100 + i}-A-{target}.wav"
        rows.append(f"{name},{i // 2 + 1},{target},{['dog', 'rain', 'clock'][target]},False,{100 + i},A")
        _write_clip(tmp_path / "audio" / name, i, rate=44100)
    (tmp_path / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert prep.main(["--format", "esc50", "--input", str(tmp_path), "--out", str(out), "--val-fold", "2",
                      "--test-fold", "3", "--clip-seconds", "0.5", *FAST]) == 0
    manifest = Manifest.load(out / "train")
    assert manifest.labels == ["dog", "rain", "clock"] and not manifest.multi_label
    splits = {s: [(x["id"], x["labels"].tolist()) for x in _read_split(out / s)] for s in ("train", "val", "test")}
    assert splits == {"train": [("1-100-A-0", [0]), ("1-101-A-1", [1])],
                      "val": [("2-102-A-2", [2]), ("2-103-A-0", [0])],
                      "test": [("3-104-A-1", [1]), ("3-105-A-2", [2])]}
    args = prep.build_parser().parse_args(["--format", "esc50", "--input", str(tmp_path), "--out", "x",
                                           "--val-fold", "9"])
    with pytest.raises(prep.LabelFileError, match="--val-fold 9"):
        prep.load_esc50_source(args)


# ------------------------------------------------------------------------------------------ resume
def _assert_same_shards(a: Path, b: Path) -> None:
    for split in ("train", "val", "test"):
        left, right = _read_split(a / split), _read_split(b / split)
        assert [s["id"] for s in left] == [s["id"] for s in right]
        assert len({s["id"] for s in left}) == len(left)
        for x, y in zip(left, right):
            assert np.array_equal(x["codes"], y["codes"]) and int(x["length"]) == int(y["length"])
            assert np.array_equal(x["labels"], y["labels"])
        ma, mb = Manifest.load(a / split), Manifest.load(b / split)
        assert (ma.written, ma.rejected, ma.seconds_of_audio) == (mb.written, mb.rejected, mb.seconds_of_audio)


def _kill_9_after_first_chunk(command: list[str], out: Path, chunk_pattern: str) -> None:
    """Run a real prepare process (its own session, from the repository root) and SIGKILL its whole
    group as soon as ``out`` holds a committed chunk matching ``chunk_pattern``."""
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while not list(out.glob(chunk_pattern)):
        assert proc.poll() is None, f"prepare exited early: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "no chunk committed within 240 s"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()


def test_kill_9_then_ctrl_c_then_rerun_gives_the_uninterrupted_result(prepared_shards, synthetic_audio, tmp_path,
                                                                       monkeypatch):
    out = tmp_path / "shards"
    argv = ["--format", "csv", "--input", str(synthetic_audio / "labels.csv"),
            "--labels", str(synthetic_audio / "vocabulary.txt"), "--out", str(out),
            "--codec-random-init", "0", "--clip-seconds", "1.0", "--chunk-size", "4", "--batch-size", "4",
            "--threads", "1", "--quiet"]
    # 1. a real process with a decoding worker, killed with SIGKILL right after its first chunk commit
    _kill_9_after_first_chunk([sys.executable, str(REPO / "tools" / "prepare_dataset.py"), *argv, "--workers", "1"],
                              out, "*/part-*/chunk.json")
    committed = sorted(out.glob("*/part-*/chunk.json"))
    assert not all((out / s / "manifest.json").exists() for s in ("train", "val", "test")), "finished before kill"
    first_commit = {p: p.stat().st_mtime_ns for p in committed}

    # 2. resumed in-process, interrupted by Ctrl-C in the middle of a chunk
    original_add, calls = prep.ChunkWriter.add, {"n": 0}

    def interrupting_add(self, task, outcome):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original_add(self, task, outcome)

    monkeypatch.setattr(prep.ChunkWriter, "add", interrupting_add)
    assert prep.main([*argv, "--workers", "0"]) == 130
    assert not list(out.glob("*/.prepare/*.tmp")), "the partial chunk must be discarded"
    monkeypatch.setattr(prep.ChunkWriter, "add", original_add)

    # 3. the final rerun completes; committed chunks were kept, the result equals an uninterrupted run
    assert prep.main([*argv, "--workers", "0"]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in first_commit.items())
    _assert_same_shards(out, prepared_shards)


def test_rerun_of_finished_output_and_changed_arguments(prepared_shards, synthetic_audio, capsys, tmp_path):
    argv = ["--format", "csv", "--input", str(synthetic_audio / "labels.csv"),
            "--labels", str(synthetic_audio / "vocabulary.txt"), "--out", str(prepared_shards),
            "--clip-seconds", "1.0", "--chunk-size", "4", "--batch-size", "4", *FAST]
    before = (prepared_shards / "train" / "manifest.json").stat().st_mtime_ns
    assert prep.main(argv) == 0
    assert "already complete" in capsys.readouterr().out
    assert (prepared_shards / "train" / "manifest.json").stat().st_mtime_ns == before
    changed = [a if a != "1.0" else "0.5" for a in argv]
    with pytest.raises(SystemExit, match="clip_seconds"):
        prep.main(changed)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "precious.txt").write_text("keep me")
    (tmp_path / "one.csv").write_text("path,labels\nx.wav,a\n")
    single = ["--format", "csv", "--input", str(tmp_path / "one.csv"), "--out", str(tmp_path / "foreign"), *FAST]
    with pytest.raises(SystemExit, match="not the output of a previous"):
        prep.main(single + ["--overwrite"])
    assert (tmp_path / "foreign" / "precious.txt").read_text() == "keep me"


def test_runs_as_a_plain_script_and_reports_missing_weights(tmp_path):
    (tmp_path / "labels.csv").write_text("path,labels\na.wav,x\n")
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch_home"))
    result = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_dataset.py"), "--format", "csv",
                             "--input", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert "encodec_24khz-d7cc33bc.th" in result.stderr and "--codec-random-init" in result.stderr
    shutil.rmtree(tmp_path / "torch_home", ignore_errors=True)


def _sleep_then_echo(item: float):
    time.sleep(item)
    return "ok", item


def test_ordered_map_keeps_order_and_survives_a_hung_worker():
    from multiprocessing.pool import ThreadPool

    with ThreadPool(2) as pool:
        results = list(prep.ordered_map(_sleep_then_echo, iter([0.0, 3.0, 0.1, 0.0]), pool, max_in_flight=2,
                                        timeout=0.5))
    assert [item for item, _ in results] == [0.0, 3.0, 0.1, 0.0]
    assert results[0][1] == ("ok", 0.0) and results[2][1] == ("ok", 0.1) and results[3][1] == ("ok", 0.0)
    status, (reason, detail) = results[1][1]
    assert (status, reason) == ("reject", "unreadable_audio") and "within 0.5 s" in detail
    assert [r for _, r in prep.ordered_map(lambda x: ("ok", x), iter([3, 1, 2]), None, 2)] == [
        ("ok", 3), ("ok", 1), ("ok", 2)]


def test_the_prefetch_queue_bounds_the_clips_decoded_ahead_of_a_slow_encoder():
    """A slow consumer (the encoder) and a counting fake decoder on 4 threads: the workers run ahead by
    exactly the queue depth (--prefetch-batches x --batch-size clips: they overlap the encoder), never
    more, and the results keep the input order."""
    import threading
    from multiprocessing.pool import ThreadPool

    from af_train.prepare.decoding import prefetch_depth

    depth = prefetch_depth(batch_size=3, prefetch_batches=2)
    lock, started, taken, ahead = threading.Lock(), [0], 0, []

    def counting_decode(item: int):
        with lock:
            started[0] += 1
        return "ok", item * 10

    with ThreadPool(4) as pool:
        results = []
        for item, outcome in prep.ordered_map(counting_decode, iter(range(40)), pool, max_in_flight=depth + 1):
            taken += 1
            time.sleep(0.01)  # the encoder at work: the workers have time to fill the queue
            with lock:
                ahead.append(started[0] - taken)
            results.append((item, outcome))
    assert depth == 6 and max(ahead) == depth  # the queue fills up to its depth, and no further
    assert results == [(i, ("ok", i * 10)) for i in range(40)]


def test_kill_9_with_a_fitted_tokenizer_resumes_exactly(mel_rvq_file, tmp_path):
    """A real af-prepare process with a fitted tokenizer, killed with SIGKILL right after its first chunk
    commit, rerun with the same arguments: the result equals an uninterrupted run."""
    count = 48  # 24 chunks: the run is still going when the kill lands
    for i in range(count):
        _write_clip(tmp_path / "audio" / f"c{i}.wav", i, seconds=0.6)
    (tmp_path / "labels.csv").write_text("path,labels\n" + "".join(f"audio/c{i}.wav,tone\n" for i in range(count)))

    def argv(out: Path) -> list[str]:
        return ["--format", "csv", "--input", str(tmp_path / "labels.csv"), "--out", str(out), "--tokenizer",
                str(mel_rvq_file), "--clip-seconds", "1.0", "--chunk-size", "2", "--batch-size", "2",
                "--threads", "1", "--quiet"]

    out = tmp_path / "out"
    _kill_9_after_first_chunk([sys.executable, "-m", "af_train.prepare", *argv(out), "--workers", "1"], out,
                              "part-*/chunk.json")
    assert not (out / "manifest.json").exists(), "finished before the kill"
    first_commit = {p: p.stat().st_mtime_ns for p in out.glob("part-*/chunk.json")}
    assert prep.main([*argv(out), "--workers", "0"]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in first_commit.items())  # committed chunks were kept
    assert prep.main([*argv(tmp_path / "reference"), "--workers", "0"]) == 0
    left, right = _read_split(out), _read_split(tmp_path / "reference")
    assert [s["id"] for s in left] == [s["id"] for s in right] == [f"audio/c{i}" for i in range(count)]
    for x, y in zip(left, right):
        assert np.array_equal(x["codes"], y["codes"]) and int(x["length"]) == int(y["length"]) == 45
    assert Manifest.load(out).tokenizer == Manifest.load(tmp_path / "reference").tokenizer


def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "labels.csv").write_text("path,labels,split\n")
    (tmp_path / "out").write_text("the user's file")
    from af_train.prepare import cli

    monkeypatch.setattr(cli, "_run", lambda args: pytest.fail("the preparation started"))
    with pytest.raises(SystemExit, match=r"af-prepare: error: --out .*out is a file; give a folder"):
        prep.main(["--format", "csv", "--input", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out").read_text() == "the user's file"


def test_a_cut_wav_and_float_peaks_beyond_full_scale_are_used_and_counted_as_warnings(tmp_path, capsys):
    _write_clip(tmp_path / "good.wav", 0)
    whole = _write_clip(tmp_path / "cut.wav", 1).read_bytes()
    (tmp_path / "cut.wav").write_bytes(whole[: len(whole) * 2 // 3])  # its header promises more samples
    audio, _ = sf.read(str(tmp_path / "good.wav"), dtype="float32")
    sf.write(str(tmp_path / "loud.wav"), audio / np.abs(audio).max() * 50, 16000, subtype="FLOAT")
    (tmp_path / "labels.csv").write_text("path,labels\ngood.wav,tone\ncut.wav,tone\nloud.wav,tone\n")
    assert prep.main(["--format", "csv", "--input", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "out"),
                      "--clip-seconds", "0.5", *FAST]) == 0
    assert Manifest.load(tmp_path / "out").written == 3
    assert "used with a warning this run: 2 [beyond_full_scale 1, truncated_file 1]" in capsys.readouterr().out


def test_overwrite_deletes_only_what_af_prepare_wrote(tmp_path, caplog):
    """``--overwrite`` of a finished or half-done split: the state, the chunks, the index, the manifest and the
    rejects go; a file or folder the user put into the output stays, and is named in the log."""
    from af_train.prepare.writing import prepare_split_dir

    split = tmp_path / "train"
    own = [".prepare/state.json", ".prepare/part-000002.tmp/shard.00000.mds", "part-000000/chunk.json",
           "part-000000/shard.00000.mds", "part-000001/index.json", "index.json", "manifest.json", "rejects.jsonl"]
    users = ["README.md", "plots/loss.png", "part-notes.txt", "manifest.json.bak"]
    for rel in own + users:
        (split / rel).parent.mkdir(parents=True, exist_ok=True)
        (split / rel).write_text(rel)
    (split / ".prepare" / "state.json").write_text(json.dumps({"clip_seconds": 1.0}))
    caplog.set_level(logging.WARNING, logger="af_train.prepare")
    assert prepare_split_dir(split, {"clip_seconds": 2.0}, overwrite=True) == "fresh"
    assert all((split / rel).read_text() == rel for rel in users)
    left = sorted(p.relative_to(split).as_posix() for p in split.rglob("*") if p.is_file())
    assert left == sorted([*users, ".prepare/state.json"])  # and the new run's state
    assert json.loads((split / ".prepare" / "state.json").read_text()) == {"clip_seconds": 2.0}
    assert "kept 4 item(s)" in caplog.text and "README.md" in caplog.text
