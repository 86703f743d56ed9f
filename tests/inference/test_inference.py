"""Inference on audio files: parity with training-time evaluation, any length, af-predict, af-embed, HEAR."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from inference_helpers import evaluation_logits, multi_hot, split_files

from af_train.checkpoint import read_best
from af_train.inference import AudioTagger, InferenceError
from af_train.inference.model import tokenizer_for
from af_train.metrics import classification_metrics


@pytest.fixture(scope="module")
def tagger(tiny_run) -> AudioTagger:
    return AudioTagger.load(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def hf_export(tiny_run, tmp_path_factory) -> Path:
    """The af-export-hf directory of the checkpoint the run tested (selected on validation)."""
    from af_train.inference import export_hf

    out = tmp_path_factory.mktemp("hf") / "model"
    selected = json.loads((tiny_run / "final" / "metrics.json").read_text())["test_checkpoint"]
    assert export_hf.main([str(tiny_run / "checkpoints" / selected / "model.pt"), str(out)]) == 0
    return out


# --------------------------------------------------------------------------------------------------
# Parity with the run's own test evaluation
# --------------------------------------------------------------------------------------------------


def test_files_give_the_logits_and_map_of_the_runs_test_evaluation(tiny_run, tagger, synthetic_audio,
                                                                   prepared_shards):
    summary = json.loads((tiny_run / "final" / "metrics.json").read_text())
    best_tag, _ = read_best(tiny_run / "checkpoints")
    assert summary["test_checkpoint"] == best_tag  # val-selected by default, consolidated as best/model.safetensors:
    assert tagger.source == str(tiny_run / "best" / "model.safetensors")
    assert json.loads((tiny_run / "best" / "af_best.json").read_text())["tag"] == best_tag
    paths, names, ids = split_files(synthetic_audio, "test")
    results = list(tagger.results(paths))
    assert all(r.ok and len(r.windows) == 1 for r in results)
    reference = evaluation_logits(tiny_run, tiny_run / "checkpoints" / best_tag, prepared_shards / "test")
    for clip, result in zip(ids, results):
        torch.testing.assert_close(torch.from_numpy(result.window_logits[0]), torch.from_numpy(reference[clip]),
                                   atol=1e-6, rtol=0)
    scores = np.stack([r.scores for r in results])
    ours = classification_metrics(scores, multi_hot(names, tagger.labels))
    assert abs(ours["mAP"] - summary["test/mAP"]) <= 1e-6
    assert ours["num_samples"] == summary["test/num_samples"]


def test_the_hf_export_gives_the_same_scores(tagger, hf_export, synthetic_audio):
    paths, _, _ = split_files(synthetic_audio, "test")
    exported = AudioTagger.load(hf_export, device="cpu")
    assert exported.labels == tagger.labels and exported.window_seconds == tagger.window_seconds
    np.testing.assert_allclose(exported.tag(paths), tagger.tag(paths), atol=1e-6, rtol=0)


def test_model_pt_with_its_manifest_loads_like_the_run(tiny_run, tagger, synthetic_audio, prepared_shards):
    paths, _, _ = split_files(synthetic_audio, "test")
    best_tag, _ = read_best(tiny_run / "checkpoints")
    from_file = AudioTagger.load(tiny_run / "checkpoints" / best_tag / "model.pt", manifest=prepared_shards / "train",
                                 device="cpu")
    np.testing.assert_allclose(from_file.tag(paths), tagger.tag(paths), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# Any length
# --------------------------------------------------------------------------------------------------


def test_a_60_s_file_is_covered_by_windows_and_frames(tiny_run, synthetic_audio, tmp_path, monkeypatch):
    # hop = window here only to halve the encoding work on CI (the default hop is half a window)
    tagger = AudioTagger.load(tiny_run, device="cpu", hop_seconds=1.0)
    paths, _, _ = split_files(synthetic_audio, "train")
    pieces = [sf.read(str(p), dtype="float32")[0] for p in paths]
    rate = sf.info(str(paths[0])).samplerate
    long = np.concatenate([pieces[i % len(pieces)] for i in range(60)])[: 60 * rate]
    sf.write(str(tmp_path / "long.wav"), long, rate)
    reads: list[int] = []  # frames asked of every read of the file: it is decoded one window at a time
    read = sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read", lambda self, frames=-1, *a, **k: reads.append(frames) or
                        read(self, frames, *a, **k))
    (result,) = tagger.results([tmp_path / "long.wav"], embeddings=True, frames=True)
    assert len(reads) == 60 and all(0 < n <= tagger.card.clip_seconds * rate + 1 for n in reads), reads[:5]
    assert result.ok and result.seconds == pytest.approx(60.0)
    starts, ends = result.windows[:, 0], result.windows[:, 1]
    assert starts[0] == 0.0 and ends[-1] == pytest.approx(60.0)
    assert np.all(starts[1:] <= ends[:-1])  # no gap between windows
    assert np.allclose(np.diff(starts), tagger.hop_seconds) and len(starts) == 60
    assert result.window_scores.shape == (len(starts), len(tagger.labels))
    assert result.frame_embeddings.shape == (4500, tagger.embedding_size)  # 60 s x 75 frames/s
    assert result.frame_times[0] == pytest.approx(0.5 / 75) and result.frame_times[-1] == pytest.approx(60 - 0.5 / 75)
    np.testing.assert_allclose(result.scores, result.window_scores.mean(0), rtol=1e-6)


def test_a_short_file_is_padded_like_training(tiny_run, tagger, synthetic_audio, tmp_path):
    from af_train import prepare

    paths, _, _ = split_files(synthetic_audio, "test")
    audio, rate = sf.read(str(paths[0]), dtype="float32")
    folder = tmp_path / "short"
    folder.mkdir()
    sf.write(str(folder / "short.wav"), audio[: int(0.3 * rate)], rate)
    (folder / "labels.csv").write_text("path,labels,split,id\nshort.wav,tone,test,short\n")
    (folder / "vocabulary.txt").write_text("\n".join(tagger.labels) + "\n")
    argv = ["--format", "csv", "--input", str(folder / "labels.csv"), "--labels", str(folder / "vocabulary.txt"),
            "--out", str(tmp_path / "shards"), "--codec-random-init", "0", "--clip-seconds", "1.0", "--workers", "0",
            "--chunk-size", "4", "--batch-size", "4", "--threads", "1", "--quiet"]
    assert prepare.main(argv) == 0
    selected = tiny_run / "checkpoints" / read_best(tiny_run / "checkpoints")[0]
    reference = evaluation_logits(tiny_run, selected, tmp_path / "shards" / "test")
    (result,) = tagger.results([folder / "short.wav"])
    assert result.ok and result.windows.tolist() == [[0.0, pytest.approx(0.3)]]
    torch.testing.assert_close(torch.from_numpy(result.window_logits[0]), torch.from_numpy(reference["short"]),
                               atol=1e-6, rtol=0)
    # with af-prepare's --min-seconds the same file is rejected as af-prepare rejects it
    strict = AudioTagger.load(tiny_run, device="cpu", min_seconds=0.5)
    (rejected,) = strict.results([folder / "short.wav"])
    assert not rejected.ok and rejected.reason == "too_short"


# --------------------------------------------------------------------------------------------------
# Tokenizer identity
# --------------------------------------------------------------------------------------------------


class _OtherTokenizer:
    sample_rate, frame_rate = 24000, 75.0

    def identity(self) -> dict:
        return {"kind": "mel-rvq", "rows": 4, "codes": 1024, "sha256": "f" * 64, "file": "other.safetensors"}


def test_a_tokenizer_other_than_the_recorded_one_is_refused(tiny_run):
    with pytest.raises(InferenceError, match=r"different tokenizers.*random-init seed 0.*mel-rvq"):
        AudioTagger.load(tiny_run, device="cpu", tokenizer=_OtherTokenizer())


def test_a_missing_tokenizer_file_is_named(hf_export, tmp_path):
    missing = {"kind": "mel-rvq", "rows": 4, "codes": 1024, "sha256": "a" * 64, "file": str(tmp_path / "gone.st")}
    with pytest.raises(InferenceError, match=r"mel-rvq.*gone\.st.*--tokenizer"):
        tokenizer_for(missing)
    # the same through a model whose card records EnCodec weights that are not on this machine
    copy = tmp_path / "export"
    shutil.copytree(hf_export, copy)
    card = json.loads((copy / "af_train_inference.json").read_text())
    card["tokenizer"]["weights"] = "pretrained sha256:0123456789abcdef (encodec_24khz-d7cc33bc.th)"
    (copy / "af_train_inference.json").write_text(json.dumps(card))
    with pytest.raises(InferenceError, match=r"0123456789abcdef.*not here"):
        AudioTagger.load(copy, device="cpu")


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def test_af_predict_reports_bad_files_and_scores_the_good_ones(tiny_run, synthetic_audio, tmp_path, caplog):
    from af_train.inference import predict

    paths, names, _ = split_files(synthetic_audio, "test")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    silent = tmp_path / "silent.wav"
    sf.write(str(silent), np.zeros(16000, dtype=np.float32), 16000)
    out = tmp_path / "out.jsonl"
    argv = [str(tiny_run), *map(str, paths), str(corrupt), str(tmp_path / "missing.wav"), str(silent),
            "--format", "jsonl", "--out", str(out), "--windows", "--device", "cpu"]
    with caplog.at_level("INFO", logger="af_train.inference.predict"):
        assert predict.main(argv) == 1
    err = caplog.text
    assert "3 file(s) processed, 3 skipped [missing_file 1, silent 1, unreadable_audio 1]" in err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in records] == list(map(str, paths))
    vocabulary = list(records[0]["scores"])
    scores = np.array([[r["scores"][c] for c in vocabulary] for r in records])
    summary = json.loads((tiny_run / "final" / "metrics.json").read_text())
    assert abs(classification_metrics(scores, multi_hot(names, vocabulary))["mAP"] - summary["test/mAP"]) <= 1e-6
    assert all(len(r["windows"]) == 1 and r["windows"][0]["start_s"] == 0.0 for r in records)
    logits = np.array([[r["logits"][c] for c in vocabulary] for r in records])
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), scores, rtol=1e-5)  # one window: sigmoid of its logits
    assert predict.main([*argv, "--keep-going", "--format", "csv", "--overwrite"]) == 0
    assert out.read_text().splitlines()[0].startswith("file,start_s,end_s,predicted,")  # --windows: one row each


def test_af_predict_threshold_auto_uses_the_stored_thresholds(tiny_run, synthetic_audio, prepared_shards, tmp_path):
    from af_train.inference import predict
    from af_train.metrics import f1_optimal_thresholds

    best_tag, _ = read_best(tiny_run / "checkpoints")
    stored = json.loads((tiny_run / "checkpoints" / best_tag / "af_thresholds.json").read_text())
    # what the evaluator stored is the F1-optimal cut of the selected checkpoint's validation scores
    _, val_names, val_ids = split_files(synthetic_audio, "val")
    val = evaluation_logits(tiny_run, tiny_run / "checkpoints" / best_tag, prepared_shards / "val", "val")
    expected, _ = f1_optimal_thresholds(1 / (1 + np.exp(-np.stack([val[i] for i in val_ids]).astype(np.float64))),
                                        multi_hot(val_names, stored["labels"]))
    np.testing.assert_allclose(np.array(stored["thresholds"], dtype=float), expected, rtol=1e-6)
    assert stored["step"] == int(best_tag.split("_")[1]) and (tiny_run / "final" / "af_thresholds.json").is_file()
    tagger = AudioTagger.load(tiny_run, device="cpu")
    np.testing.assert_allclose(np.nan_to_num(tagger.thresholds, nan=-1),
                               np.nan_to_num(np.array(stored["thresholds"], dtype=float), nan=-1))
    paths, _, _ = split_files(synthetic_audio, "test")
    out = tmp_path / "out.jsonl"
    assert predict.main([str(tiny_run), *map(str, paths), "--format", "jsonl", "--out", str(out)]) == 0
    thresholds = np.where(np.isnan(tagger.thresholds), 0.5, tagger.thresholds)
    for record in map(json.loads, out.read_text().splitlines()):
        expected = {c for i, c in enumerate(tagger.labels) if record["scores"][c] >= thresholds[i]}
        assert set(record["predicted"]) == expected


def test_af_embed_writes_npy_and_ids_and_resumes(tiny_run, synthetic_audio, tmp_path, monkeypatch):
    from af_train.inference import embed

    paths, _, ids = split_files(synthetic_audio, "train")
    listing = tmp_path / "files.csv"
    listing.write_text("path,id\n" + "".join(f"{p},{i}\n" for p, i in zip(paths, ids)) + "missing.wav,gone\n")
    argv = [str(tiny_run), "--csv", str(listing), "--out", str(tmp_path / "emb"), "--part-size", "4",
            "--layer", "1", "--device", "cpu"]
    calls = {"n": 0}
    original = AudioTagger.results

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AudioTagger, "results", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embed.main(argv)
    assert len(list((tmp_path / "emb" / "parts").glob("part-*.npz"))) == 1
    calls["n"] = 10  # no more interruptions; count the parts computed by the second run
    assert embed.main(argv) == 1  # missing.wav was skipped
    assert calls["n"] == 10 + 2  # parts 2 and 3 only: part 1 was committed by the first run
    matrix = np.load(tmp_path / "emb" / "embeddings.npy")
    rows = [json.loads(line) for line in (tmp_path / "emb" / "ids.jsonl").read_text().splitlines()]
    assert rows == ids and matrix.shape == (len(ids), 64)
    assert sorted(p.name for p in (tmp_path / "emb").iterdir()) == ["embeddings.npy", "failures.jsonl", "ids.jsonl"]
    assert "missing_file" in (tmp_path / "emb" / "failures.jsonl").read_text()
    tagger = AudioTagger.load(tiny_run, device="cpu")
    np.testing.assert_allclose(matrix, tagger.embed(paths, layer=1), atol=1e-6)
    assert embed.main([*argv[:-4], "--format", "npz", "--keep-going", "--device", "cpu"]) == 2  # failures.jsonl
    assert embed.main([*argv[:-4], "--format", "npz", "--keep-going", "--device", "cpu", "--overwrite"]) == 0
    with np.load(tmp_path / "emb" / "embeddings.npz") as data:
        assert data["ids"].tolist() == ids and data["embeddings"].shape == (len(ids), 64)


# --------------------------------------------------------------------------------------------------
# HEAR 2021 API
# --------------------------------------------------------------------------------------------------


def test_hear_functions_return_the_documented_shapes_and_dtypes(tiny_run):
    from af_train.inference import hear

    model = hear.load_model(str(tiny_run), device="cpu")
    assert isinstance(model, torch.nn.Module) and model.sample_rate == 48000
    assert model.scene_embedding_size == model.timestamp_embedding_size == 64
    audio = torch.zeros(3, int(2.5 * model.sample_rate))
    audio[1] = torch.sin(torch.arange(audio.shape[1]) * 0.05) * 0.3
    audio[2] = torch.randn(audio.shape[1]) * 0.1  # silence (sound 0) is embedded too, never rejected
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.shape == (3, 64) and scene.dtype == torch.float32
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    frames = int(np.ceil(2.5 * 75))
    assert embeddings.shape == (3, frames, 64) and embeddings.dtype == torch.float32
    assert timestamps.shape == (3, frames) and timestamps.dtype == torch.float32
    hop = torch.diff(timestamps, dim=1)
    assert torch.allclose(hop, torch.full_like(hop, 1000 / 75), atol=1e-3) and float(timestamps[0, 0]) == pytest.approx(
        1000 / 150, abs=1e-3)
    assert not torch.allclose(embeddings[1], embeddings[2])


def test_a_fitted_tokenizer_is_found_by_hash_and_another_one_is_refused(tmp_path):
    from af_train.tokenizers.mel_rvq import MelConfig, fit_from_clips

    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(24000).astype(np.float32) * 0.1 for _ in range(4)]
    recorded = fit_from_clips(clips, MelConfig(rows=2, codes=8, seed=0))
    other = fit_from_clips(clips, MelConfig(rows=2, codes=8, seed=1))
    recorded.save(tmp_path / "trained_on.safetensors")
    other.save(tmp_path / "other.safetensors")
    identity = json.loads(json.dumps(recorded.identity()))  # as a manifest records it
    identity["file"] = str(tmp_path / "trained_on.safetensors")
    assert tokenizer_for(identity, device="cpu").identity()["sha256"] == identity["sha256"]
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (tmp_path / "trained_on.safetensors").rename(moved / "trained_on.safetensors")
    with pytest.raises(InferenceError, match=r"trained_on\.safetensors.*--tokenizer PATH"):
        tokenizer_for(identity, device="cpu")
    assert tokenizer_for(identity, given=moved, device="cpu").identity()["sha256"] == identity["sha256"]
    with pytest.raises(InferenceError, match=r"different tokenizers.*other\.safetensors"):
        tokenizer_for(identity, given=tmp_path / "other.safetensors", device="cpu")


def test_weights_with_the_manifest_of_another_tokenizer_are_refused(tiny_run, prepared_shards, tmp_path):
    manifest = json.loads((prepared_shards / "train" / "manifest.json").read_text())
    manifest["tokenizer"]["weights"] = manifest["codec"]["weights"] = "random-init seed 7"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InferenceError, match=r"different tokenizers.*random-init seed 0.*random-init seed 7"):
        AudioTagger.load(tiny_run / "final" / "model.pt", manifest=tmp_path / "other", device="cpu")


def test_af_predict_standard_output_holds_only_results(tiny_run, synthetic_audio, capfd):
    from af_train.inference import predict

    paths, _, _ = split_files(synthetic_audio, "test")
    assert predict.main([str(tiny_run), str(paths[0]), "--format", "jsonl", "--device", "cpu",
                         "--checkpoint", str(tiny_run / "checkpoints" / read_best(tiny_run / "checkpoints")[0])]) == 0
    lines = capfd.readouterr().out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["file"] == str(paths[0])
