"""af-predict and af-embed off the happy path: bad arguments are one-line errors before the model loads,
outputs never overwrite inputs or files the command did not create, ids round-trip any file name,
--hop sets the window spacing, and odd inputs are counted (skipped or warned), never dropped silently."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
from inference_helpers import split_files

from af_train.inference import AudioTagger, InferenceError, embed, predict


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the command gets as far as loading the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(AudioTagger, "load", refuse)


def _test_files(synthetic_audio, count: int = 2):
    return split_files(synthetic_audio, "test")[0][:count]


# --------------------------------------------------------------------------------------------------
# argument errors: argparse-level, before anything loads
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value", [
    ("--hop", "nan"), ("--hop", "inf"), ("--hop", "0"), ("--hop", "-1"), ("--hop", "abc"),
    ("--encode-batch-size", "-1"), ("--encode-batch-size", "0"), ("--batch-size", "0"), ("--device", "bogus"),
    ("--threads", "0"),
])
@pytest.mark.parametrize("command", [predict, embed])
def test_a_bad_value_is_a_one_line_usage_error(command, option, value, tmp_path, capsys, no_model_load):
    with pytest.raises(SystemExit) as exit_info:
        command.main(["RUN", "a.wav", "--out", str(tmp_path / "out"), option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert option in err and repr(value) in err


def test_a_hop_longer_than_the_window_is_refused_naming_the_longest(tiny_run, synthetic_audio, capsys):
    with pytest.raises(InferenceError, match=r"longer than the window \(1 s\).*at most 1 s"):
        AudioTagger.load(tiny_run, device="cpu", hop_seconds=1e9)
    assert predict.main([str(tiny_run), str(_test_files(synthetic_audio)[0]), "--hop", "1e9", "--device", "cpu"]) == 2
    assert "af-predict: error: hop of 1e+09 s is longer than the window" in capsys.readouterr().err


def test_a_device_this_machine_lacks_is_refused_before_the_weights_load(tiny_run, synthetic_audio, monkeypatch,
                                                                        capsys):
    import torch

    from af_train.inference import tagger as tagger_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(tagger_module, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    assert predict.main([str(tiny_run), str(_test_files(synthetic_audio)[0]), "--device", "cuda:1"]) == 2
    assert "device 'cuda:1': this machine has no usable CUDA GPU; give --device cpu" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# outputs: checked first, never over an input or a file the command did not create
# --------------------------------------------------------------------------------------------------


def test_af_predict_out_in_an_unwritable_place_is_refused_before_the_model_loads(synthetic_audio, tmp_path, capsys,
                                                                                no_model_load):
    (tmp_path / "a_file").write_text("not a folder")
    assert predict.main(["RUN", str(_test_files(synthetic_audio)[0]), "--out", str(tmp_path / "a_file" / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_af_predict_never_writes_over_an_input_even_with_overwrite(synthetic_audio, tmp_path, capsys, no_model_load):
    audio = tmp_path / "b.wav"
    shutil.copy(_test_files(synthetic_audio)[0], audio)
    before = audio.read_bytes()
    for extra in ([], ["--overwrite"]):
        assert predict.main(["RUN", str(audio), "--out", str(audio), *extra]) == 2
        assert "is also an input" in capsys.readouterr().err
    assert audio.read_bytes() == before


def test_af_predict_replaces_an_existing_out_only_with_overwrite(tiny_run, synthetic_audio, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    out.write_text("the user's notes\n")
    files = _test_files(synthetic_audio, 1)
    argv = [str(tiny_run), *map(str, files), "--format", "jsonl", "--out", str(out), "--device", "cpu"]
    assert predict.main(argv) == 2
    assert "exists; give another --out, or pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "the user's notes\n"
    assert predict.main([*argv, "--overwrite"]) == 0
    assert json.loads(out.read_text())["file"] == str(files[0])


def test_af_embed_out_that_is_a_file_and_a_missing_csv_are_one_line_errors(tmp_path, capsys, no_model_load):
    (tmp_path / "emb").write_text("a file")
    assert embed.main(["RUN", "a.wav", "--out", str(tmp_path / "emb")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("af-embed: error: --out") and "is a file; give a folder" in err[0]
    assert embed.main(["RUN", "--csv", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("af-embed: error: --csv") and "no such file" in err[0]
    assert (tmp_path / "emb").read_text() == "a file" and not (tmp_path / "out").exists()


def test_af_embed_leaves_a_parts_folder_it_did_not_create_alone(synthetic_audio, tmp_path, capsys, no_model_load):
    (tmp_path / "out" / "parts").mkdir(parents=True)
    (tmp_path / "out" / "parts" / "mine.txt").write_text("the user's file")
    for extra in ([], ["--overwrite"]):
        assert embed.main(["RUN", str(_test_files(synthetic_audio)[0]), "--out", str(tmp_path / "out"), *extra]) == 2
        assert "af-embed did not create it" in capsys.readouterr().err
    assert (tmp_path / "out" / "parts" / "mine.txt").read_text() == "the user's file"


def test_several_ranks_are_refused_before_any_start_without_out_or_over_a_leftover_parts_folder(
        synthetic_audio, tmp_path, capsys, no_model_load, monkeypatch):
    for command in (predict, embed):
        monkeypatch.setattr(command, "start_launcher", lambda *a: pytest.fail("the launcher was started"))
    audio = str(_test_files(synthetic_audio)[0])
    with pytest.raises(SystemExit) as exit_info:  # af-predict merges into a file: the standard output will not do
        predict.main(["RUN", audio, "--num_cpu_ranks", "2"])
    assert exit_info.value.code == 2 and "give --out FILE" in capsys.readouterr().err
    out = tmp_path / "pred.jsonl"
    (tmp_path / "pred.jsonl.parts").mkdir()  # what a killed several-rank run leaves
    assert predict.main(["RUN", audio, "--out", str(out), "--num_cpu_ranks", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pred.jsonl.parts exists" in err[0] and "remove it" in err[0]
    for command in (predict, embed):  # the launcher's own checks, still before anything starts
        with pytest.raises(SystemExit) as exit_info:
            command.main(["RUN", audio, "--out", str(tmp_path / "other"), "--no_ssh"])
        assert exit_info.value.code == 2 and "--no_ssh is for multi-node runs" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "other").exists()


def test_af_embed_ids_round_trip_a_file_name_with_a_newline(tiny_run, synthetic_audio, tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    sources = _test_files(synthetic_audio, 3)
    names = ["a.wav", "b\nc.wav", "d.wav"]
    for source, name in zip(sources, names):
        shutil.copy(source, folder / name)
    out = tmp_path / "emb"
    assert embed.main([str(tiny_run), str(folder), "--out", str(out), "--device", "cpu"]) == 0
    ids = [json.loads(line) for line in (out / "ids.jsonl").read_text(encoding="utf-8").splitlines()]
    matrix = np.load(out / "embeddings.npy")
    assert ids == sorted(str(folder / n) for n in names) and matrix.shape[0] == len(ids)
    tagger = AudioTagger.load(tiny_run, device="cpu")
    # the row the id names is that file's embedding (other files' differ by far more than batch rounding)
    np.testing.assert_allclose(matrix[ids.index(str(folder / "b\nc.wav"))], tagger.embed(folder / "b\nc.wav")[0],
                               atol=1e-4)
    assert sorted(p.name for p in out.iterdir()) == ["embeddings.npy", "failures.jsonl", "ids.jsonl"]


# --------------------------------------------------------------------------------------------------
# --hop / hop_seconds is the window spacing
# --------------------------------------------------------------------------------------------------


def test_the_hop_sets_the_spacing_of_the_windows(tiny_run, synthetic_audio, tmp_path):
    pieces = [sf.read(str(p), dtype="float32")[0] for p in _test_files(synthetic_audio, 3)]
    rate = sf.info(str(_test_files(synthetic_audio, 1)[0])).samplerate
    long = tmp_path / "long.wav"
    sf.write(str(long), np.concatenate(pieces)[: 3 * rate], rate)
    spacing = {}
    for hop in (0.2, 0.4):
        out = tmp_path / f"hop{hop}.jsonl"
        assert predict.main([str(tiny_run), str(long), "--hop", str(hop), "--windows", "--format", "jsonl",
                             "--out", str(out), "--device", "cpu"]) == 0
        starts = [w["start_s"] for w in json.loads(out.read_text())["windows"]]
        spacing[hop] = set(np.round(np.diff(starts), 6))
    assert spacing == {0.2: {0.2}, 0.4: {0.4}}


# --------------------------------------------------------------------------------------------------
# odd inputs: counted as skipped, or used with a counted warning
# --------------------------------------------------------------------------------------------------


def test_odd_files_are_skipped_or_warned_and_counted(tiny_run, synthetic_audio, tmp_path, caplog):
    folder = tmp_path / "audio"
    folder.mkdir()
    source = _test_files(synthetic_audio, 1)[0]
    audio, rate = sf.read(str(source), dtype="float32")
    shutil.copy(source, folder / "good.wav")
    os.symlink(tmp_path / "nowhere.wav", folder / "dangling.wav")  # a link to nothing: skipped, counted
    sf.write(str(folder / "cut.wav"), audio, rate, subtype="PCM_16")
    whole = (folder / "cut.wav").read_bytes()
    (folder / "cut.wav").write_bytes(whole[: len(whole) - len(whole) // 3])  # the header promises more data
    sf.write(str(folder / "loud.wav"), audio / np.abs(audio).max() * 50, rate, subtype="FLOAT")  # peaks of 50
    out = tmp_path / "out.jsonl"
    with caplog.at_level("INFO", logger="af_train.predict"):
        assert predict.main([str(tiny_run), str(folder), "--format", "jsonl", "--out", str(out),
                             "--device", "cpu"]) == 1
    assert ("3 file(s) processed, 1 skipped [missing_file 1], 2 warning(s) [beyond_full_scale 1, truncated_file 1]"
            in caplog.text)
    assert "dangling.wav is a link to" in caplog.text
    assert sorted(json.loads(line)["file"] for line in out.read_text().splitlines()) == [
        str(folder / n) for n in ("cut.wav", "good.wav", "loud.wav")]


def test_a_folder_listing_keeps_links_that_point_nowhere(tmp_path):
    from af_train.inference.cli_common import find_audio

    (tmp_path / "good.wav").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    os.symlink(tmp_path / "nowhere.wav", tmp_path / "dangling.wav")
    assert [p.name for p in find_audio([str(tmp_path)], recursive=False)] == ["dangling.wav", "good.wav"]


def test_options_may_come_between_the_audio_files(tmp_path):
    """``af-embed MODEL --manifest X a.wav`` and ``af-predict MODEL a.wav --out F b.wav`` parse as users type them."""
    args = embed.parse_args(["model.pt", "--out", str(tmp_path / "e"), "a.wav", "--batch-size", "4", "b.wav"])
    assert args.audio == ["a.wav", "b.wav"] and args.batch_size == 4
    args = predict.parse_args(["model.pt", "a.wav", "--out", str(tmp_path / "p.jsonl"), "b.wav"])
    assert args.audio == ["a.wav", "b.wav"] and args.out == str(tmp_path / "p.jsonl")


def test_a_layer_the_encoder_lacks_is_refused_naming_the_valid_range(tiny_run, synthetic_audio, tmp_path, capsys):
    from af_train.inference import embed

    layers = AudioTagger.load(tiny_run, device="cpu").num_layers
    wav = next(synthetic_audio.rglob("*.wav"))
    assert embed.main([str(tiny_run), str(wav), "--out", str(tmp_path / "emb"), "--layer", "99"]) == 2
    err = capsys.readouterr().err
    assert f"layers 0 (embeddings) .. {layers} (or -1 .. -{layers + 1} from the end)" in err
    assert not (tmp_path / "emb" / "embeddings.npy").exists()
