"""af-probe end to end on tiny learnable shards: table and JSON, the controls, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from af_train_tools.synthetic_shards import write_patterned_split  # noqa: E402

from af_train.inference import probe as probe_cli  # noqa: E402

CLASSES = 4


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("probe_data")
    for split, count in (("train", 48), ("val", 16), ("test", 40)):
        write_patterned_split(root / split, count, split=split, multi_label=False, num_classes=CLASSES, frames=24)
    return root


@pytest.fixture(scope="module")
def encoder_file(probe_data, tmp_path_factory) -> Path:
    """A random tiny encoder saved as trained weights (af-probe reads its config, row and tokenizer)."""
    from af_train.model import AudioFormerConfig, RoFormerEncoder, save_encoder
    from af_train.shards import Manifest

    torch.manual_seed(0)
    encoder = RoFormerEncoder(AudioFormerConfig.preset("tiny"))
    tokenizer = Manifest.load(probe_data / "train").tokenizer
    return save_encoder(encoder, tmp_path_factory.mktemp("encoder") / "encoder.pt", code_row=0, tokenizer=tokenizer)


def probe(encoder_file: Path, data: Path, out: Path, *extra: str) -> dict:
    argv = [str(encoder_file), str(data), "--manifest", str(data / "train"), "--out", str(out),
            "--bootstrap-rounds", "200", "--batch-size", "16", *extra]
    assert probe_cli.main(argv) == 0
    return json.loads((out / "probe.json").read_text())


def test_af_probe_reports_every_kind_and_layer_with_baselines(encoder_file, probe_data, tmp_path, capsys):
    result = probe(encoder_file, probe_data, tmp_path / "out", "--layers", "all")
    assert result["clips"] == {"train": 48, "val": 16, "test": 40} and result["layers"] == [0, 1, 2]
    assert [(p["kind"], p["layer"]) for p in result["probes"]] == [(k, layer) for k in ("knn", "linear")
                                                                   for layer in (0, 1, 2)]
    for entry in result["probes"]:
        accuracy = entry["test"]["accuracy"]
        assert accuracy["low"] <= accuracy["value"] <= accuracy["high"]
        assert accuracy["value"] > 0.8  # each class owns its codes: even random embeddings separate them
    assert set(result["baselines"]) == {"label_prior", "bag_of_codes", "bag_of_codes_row0", "chance_accuracy"}
    assert result["baselines"]["chance_accuracy"] == 1 / CLASSES
    table = (tmp_path / "out" / "probe.md").read_text()
    assert "| knn " in table and "| bag of codes row0 " in table and "| chance " in table
    assert "test accuracy [95% CI]" in capsys.readouterr().out


def test_shuffled_labels_score_at_chance(encoder_file, probe_data, tmp_path):
    honest = probe(encoder_file, probe_data, tmp_path / "honest", "--kind", "knn")
    shuffled = probe(encoder_file, probe_data, tmp_path / "shuffled", "--kind", "knn", "--shuffle-labels")
    assert shuffled["shuffled_labels"] and not honest["shuffled_labels"]
    chance = 1 / CLASSES
    honest_accuracy = honest["probes"][0]["test"]["accuracy"]
    shuffled_accuracy = shuffled["probes"][0]["test"]["accuracy"]
    assert honest_accuracy["low"] > chance
    # at chance: within 3 standard errors of a guess on 40 test clips, and far below the honest probe
    standard_error = (chance * (1 - chance) / 40) ** 0.5
    assert abs(shuffled_accuracy["value"] - chance) <= 3 * standard_error
    assert shuffled_accuracy["high"] < honest_accuracy["low"]


def test_random_init_control_and_max_clips(encoder_file, probe_data, tmp_path):
    result = probe(encoder_file, probe_data, tmp_path / "out", "--kind", "knn", "--random-init", "3",
                   "--max-clips", "12")
    assert result["weights"] == "random init (seed 3)"
    assert result["clips"] == {"train": 12, "val": 12, "test": 12} and result["max_clips"] == 12
    both = probe(encoder_file, probe_data, tmp_path / "both", "--kind", "knn", "--with-random-init", "3",
                 "--max-clips", "12")
    assert both["weights"] == "trained" and both["random_init_control"]["seed"] == 3
    control = both["random_init_control"]["probes"][0]
    assert control["test"] == result["probes"][0]["test"]  # the same random encoder, the same clips
    difference = control["difference"]["accuracy"]
    trained = both["probes"][0]["test"]["accuracy"]["value"]
    assert difference["value"] == pytest.approx(trained - control["test"]["accuracy"]["value"])
    assert difference["low"] <= difference["value"] <= difference["high"]
    assert "difference = trained − random init" in (tmp_path / "both" / "probe.md").read_text()


def test_layer_best_is_the_layer_with_the_best_val_accuracy(encoder_file, probe_data, tmp_path):
    result = probe(encoder_file, probe_data, tmp_path / "out", "--kind", "knn", "--layer", "best", "--max-clips", "12")
    assert result["layers"] == [0, 1, 2] and [p["layer"] for p in result["probes"]] == [0, 1, 2]
    val = [p["val"]["accuracy"] for p in result["probes"]]
    assert result["chosen_layer"] == {"knn": val.index(max(val))}  # the first of equal val accuracies
    table = (tmp_path / "out" / "probe.md").read_text()
    assert f"Layer chosen on val (--layer best): knn {val.index(max(val))}" in table
    with pytest.raises(SystemExit):
        probe_cli.parse_args([str(encoder_file), str(probe_data), "--out", str(tmp_path / "x"), "--layer", "top"])


def test_af_probe_refuses_what_it_cannot_use(encoder_file, probe_data, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "probe.json").write_text("{}")
    argv = [str(encoder_file), str(probe_data), "--manifest", str(probe_data / "train")]
    assert probe_cli.main([*argv, "--out", str(foreign)]) == 2
    assert "was not written by af-probe" in capsys.readouterr().err
    assert probe_cli.main([*argv, "--out", str(tmp_path / "a"), "--layer", "7"]) == 2
    assert "layer 7 does not exist" in capsys.readouterr().err
    # data written by another tokenizer than the model's
    other = tmp_path / "other_tokenizer"
    for split in ("train", "val", "test"):
        write_patterned_split(other / split, 8, split=split, multi_label=False, codebooks=2)
    assert probe_cli.main([str(encoder_file), str(other), "--manifest", str(probe_data / "train"),
                           "--out", str(tmp_path / "b")]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_light_argument_parser_offers_the_probe_module_s_kinds_and_rounds():
    """af-probe parses its arguments without importing af_train.probe (torch): its choices and default must
    still be that module's."""
    from af_train.probe import BOOTSTRAP_ROUNDS, KINDS

    args = probe_cli.parse_args(["m", "d", "--out", "o"])
    assert args.bootstrap_rounds == BOOTSTRAP_ROUNDS
    for kind in (*KINDS, "both"):
        assert probe_cli.parse_args(["m", "d", "--out", "o", "--kind", kind]).kind == kind
