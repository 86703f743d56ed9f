"""af-fit-tokenizer: fits on the training split only, refuses others, and its file drives af-prepare."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
from af_train_tools import make_synthetic_audio as synth
from streaming import LocalDataset

from af_train import prepare as prep
from af_train.prepare import fit_tokenizer
from af_train.shards import Manifest
from af_train.tokenizers import load_tokenizer


@pytest.fixture(autouse=True)
def _one_thread(single_torch_thread):
    yield


def _fit_argv(labels, out, *extra: str) -> list[str]:
    return ["--kind", "mel-rvq", "--format", "csv", "--input", str(labels), "--out", str(out), "--rows", "2",
            "--codes", "16", "--clip-seconds", "1", "--workers", "0", "--threads", "1", "--quiet", *extra]


def _metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["af_train"])


def _dataset(tmp_path, splits: dict[str, int]):
    """Real clips for the train split; val/test rows name files that do not exist, so reading them would
    show up as missing_file rejects."""
    rows = ["path,labels,split"]
    index = 0
    for split, count in splits.items():
        for _ in range(count):
            name = f"{split}_{index}.wav"
            if split == "train":
                audio, labels = synth.make_clip(index, seed=4, sample_rate=16000, clip_seconds=1.0, multi_label_prob=0)
                sf.write(str(tmp_path / name), audio, 16000)
            rows.append(f"{name},tone,{split}")
            index += 1
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "labels.csv"


def test_fits_on_the_training_split_only(tmp_path, capsys):
    labels = _dataset(tmp_path, {"train": 6, "val": 3, "test": 3})
    assert fit_tokenizer.main(_fit_argv(labels, tmp_path / "tok.safetensors")) == 0
    fit = _metadata(tmp_path / "tok.safetensors")["fit"]
    assert fit["split"] == "train" and fit["clips"] == 6 and fit["rejected"] == {}  # val/test never opened
    assert fit["frames"] == 6 * 75
    out = capsys.readouterr().out
    assert "fit time:" in out and "k-means" in out
    # a source with no train split, or a single-split source asked for another split, is refused
    (tmp_path / "nt").mkdir()
    no_train = _dataset(tmp_path / "nt", {"val": 2})
    assert fit_tokenizer.main(_fit_argv(no_train, tmp_path / "x.safetensors")) == 2
    assert "training split only" in capsys.readouterr().err
    single = tmp_path / "single.csv"
    single.write_text("path,labels\ntrain_0.wav,tone\n")
    assert fit_tokenizer.main(_fit_argv(single, tmp_path / "y.safetensors", "--split", "val")) == 2
    assert "--split val" in capsys.readouterr().err and not (tmp_path / "y.safetensors").exists()
    with pytest.raises(SystemExit, match="exists"):  # never silently replaces a tokenizer in use
        fit_tokenizer.main(_fit_argv(labels, tmp_path / "tok.safetensors"))


def test_max_hours_takes_a_seeded_subset(tmp_path):
    labels = _dataset(tmp_path, {"train": 8})
    argv = _fit_argv(labels, tmp_path / "a.safetensors", "--max-hours", str(3.5 / 3600), "--codes", "8")
    assert fit_tokenizer.main(argv) == 0
    assert _metadata(tmp_path / "a.safetensors")["fit"]["clips"] == 4  # stops once 3.5 s of 1 s clips are in
    again = [str(tmp_path / "b.safetensors") if a.endswith("a.safetensors") else a for a in argv]
    assert fit_tokenizer.main(again) == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_prepare_with_a_fitted_tokenizer_records_it_and_writes_its_codes(mel_rvq_file, synthetic_audio, tmp_path):
    out = tmp_path / "shards"
    argv = ["--format", "csv", "--input", str(synthetic_audio / "labels.csv"), "--labels",
            str(synthetic_audio / "vocabulary.txt"), "--out", str(out), "--tokenizer", str(mel_rvq_file),
            "--clip-seconds", "1", "--workers", "0", "--threads", "1", "--quiet", "--batch-size", "3"]
    assert prep.main(argv) == 0
    tokenizer = load_tokenizer(mel_rvq_file, device="cpu")
    with open(synthetic_audio / "labels.csv", newline="") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    for split in ("train", "val", "test"):
        manifest = Manifest.load(out / split)
        assert manifest.tokenizer == tokenizer.identity()
        assert (manifest.codec.model, manifest.codec.codebooks, manifest.codec.codebook_size) == ("mel-rvq", 2, 32)
        ds = LocalDataset(local=str(out / split))
        for sample in (ds[i] for i in range(len(ds))):
            data, rate = sf.read(str(synthetic_audio / rows[sample["id"]]["path"]), dtype="float64", always_2d=True)
            wav = AF.resample(torch.from_numpy(data.mean(axis=1)).float(), rate, 24000)[:24000]
            wav = torch.nn.functional.pad(wav, (0, 24000 - wav.shape[0]))
            assert np.array_equal(sample["codes"], tokenizer.encode_batch(wav[None])[0].numpy())
    # EnCodec options make no sense with a fitted file
    with pytest.raises(SystemExit, match="do not apply"):
        prep.main([*argv, "--codec-random-init", "0", "--overwrite"])


def test_an_unusable_out_is_refused_before_the_fit_and_a_failed_save_leaves_no_tmp(tmp_path, monkeypatch):
    labels = _dataset(tmp_path, {"train": 3})
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setattr(fit_tokenizer, "_run", lambda args: pytest.fail("the fit started"))
    with pytest.raises(SystemExit, match=r"--out .*a_file.*is not a folder"):
        fit_tokenizer.main(_fit_argv(labels, tmp_path / "a_file" / "tok.safetensors"))
    with pytest.raises(SystemExit, match=r"is also an input"):
        fit_tokenizer.main(_fit_argv(labels, labels, "--overwrite"))
    monkeypatch.undo()
    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        fit_tokenizer.main(_fit_argv(labels, tmp_path / "tok.safetensors"))
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "tok.safetensors").exists()


def test_segment_fits_on_every_clip_of_a_long_recording(tmp_path, capsys):
    # one 3 s recording (three different 1 s sounds) and one 1 s file
    parts = [synth.make_clip(i, seed=4, sample_rate=16000, clip_seconds=1.0, multi_label_prob=0)[0] for i in range(3)]
    sf.write(str(tmp_path / "long.wav"), np.concatenate(parts), 16000)
    sf.write(str(tmp_path / "short.wav"), parts[0], 16000)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,labels\nlong.wav,tone\nshort.wav,tone\n")

    assert fit_tokenizer.main(_fit_argv(labels, tmp_path / "first.safetensors")) == 0
    first = _metadata(tmp_path / "first.safetensors")["fit"]
    assert first["clips"] == 2 and "segment_hop_seconds" not in first  # the default: each file's first clip
    assert fit_tokenizer.main(_fit_argv(labels, tmp_path / "all.safetensors", "--segment")) == 0
    fit = _metadata(tmp_path / "all.safetensors")["fit"]
    assert fit["clips"] == 4 and fit["frames"] == 4 * 75  # 0-1, 1-2, 2-3 s of long.wav, and short.wav
    assert fit["segment_hop_seconds"] == 1.0
    # overlapping clips every 0.5 s: long.wav from 0, 0.5, 1, 1.5 and 2 s (the last reaches its end)
    assert fit_tokenizer.main(_fit_argv(labels, tmp_path / "hop.safetensors", "--segment", "--segment-hop", "0.5")) == 0
    hop = _metadata(tmp_path / "hop.safetensors")["fit"]
    assert hop["clips"] == 6 and hop["segment_hop_seconds"] == 0.5
    with pytest.raises(SystemExit, match="--segment-hop applies only with --segment"):
        fit_tokenizer.main(_fit_argv(labels, tmp_path / "x.safetensors", "--segment-hop", "0.5"))
    with pytest.raises(SystemExit, match="at most the clip"):
        fit_tokenizer.main(_fit_argv(labels, tmp_path / "x.safetensors", "--segment", "--segment-hop", "2"))
