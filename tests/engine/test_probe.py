"""Frozen-embedding probes (af_train.probe): the fit sees train only, val chooses, test is scored once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from af_train_tools.synthetic_shards import write_patterned_split  # noqa: E402

from af_train.probe import (  # noqa: E402
    Framing,
    ProbeError,
    best_layer,
    embed_clips,
    fit_probe,
    knn_scores,
    load_probe_data,
    probe_subset,
)


def one_hot(labels: list[int], classes: int) -> np.ndarray:
    return np.eye(classes, dtype=bool)[labels]


def directions(angles_degrees: list[float]) -> np.ndarray:
    radians = np.deg2rad(np.asarray(angles_degrees, dtype=np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


def clusters(rng: np.random.Generator, per_class: int, classes: int = 3, spread: float = 1.0
             ) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(classes), per_class)
    centres = rng.normal(0.0, 3.0, (classes, 8))
    return centres[labels] + rng.normal(0.0, spread, (labels.size, 8)), one_hot(list(labels), classes)


def test_knn_chooses_k_on_val_never_on_test():
    # Class 0 fills the circle from 0 to 90 degrees; lone class-1 clips sit at 30 and 60 degrees.
    # A query exactly on a lone clip is class 1 by its nearest neighbour and class 0 by a larger vote.
    train_x = directions([0, 10, 20, 29, 30, 31, 40, 50, 59, 60, 61, 70, 80, 90, 180, 190])
    train_y = one_hot([0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1], 2)
    on_islands = directions([30, 60, 30.0001, 60.0001])
    island_class_1, island_class_0 = one_hot([1, 1, 1, 1], 2), one_hot([0, 0, 0, 0], 2)
    chosen = fit_probe("knn", (train_x, train_y), (on_islands, island_class_1), (on_islands, island_class_0),
                       single_label=True, settings=[1, 5], rounds=10)
    assert chosen.setting == {"k": 1} and chosen.val["accuracy"] == 1.0
    assert chosen.test["accuracy"]["value"] == 0.0  # test would have asked for k=5: it was not consulted
    swapped = fit_probe("knn", (train_x, train_y), (on_islands, island_class_0), (on_islands, island_class_1),
                        single_label=True, settings=[1, 5], rounds=10)
    assert swapped.setting == {"k": 5} and swapped.val["accuracy"] == 1.0
    assert [row["accuracy"] for row in swapped.val_by_setting] == [0.0, 1.0]


def test_best_layer_is_chosen_on_val_never_on_test():
    # two "layers" of the same clips: layer 0 keeps the val clips near their class, layer 1 the test clips
    rng = np.random.default_rng(0)
    train = clusters(rng, 20, spread=0.5)
    centres = clusters(np.random.default_rng(0), 20, spread=0.5)[0][::20]  # the same class centres
    labels = np.repeat(np.arange(3), 10)
    near, far = centres[labels] + rng.normal(0, 0.5, (30, 8)), rng.normal(0, 3.0, (30, 8))
    targets = one_hot(list(labels), 3)
    by_layer = {0: ((near, targets), (far, targets)), 1: ((far, targets), (near, targets))}
    results = [fit_probe("knn", train, val, test, single_label=True, layer=layer, settings=[5], rounds=10)
               for layer, (val, test) in by_layer.items()]
    assert results[0].val["accuracy"] > results[1].val["accuracy"]
    assert results[1].test["accuracy"]["value"] > results[0].test["accuracy"]["value"]  # test would pick layer 1
    assert best_layer(results, single_label=True).layer == 0
    assert best_layer(results[::-1], single_label=True).layer == 0
    tied = [fit_probe("knn", train, (near, targets), single_label=True, layer=layer, settings=[5]) for layer in (2, 1)]
    assert best_layer(tied, single_label=True).layer == 2  # equal val: the first listed
    with pytest.raises(ProbeError, match="no probed layer"):
        best_layer([], single_label=True)


@pytest.mark.parametrize("kind", ["knn", "linear"])
def test_test_scores_depend_on_the_training_split_alone(kind):
    rng = np.random.default_rng(0)
    train, val, test = clusters(rng, 20), clusters(rng, 8, spread=3.0), clusters(rng, 10)
    setting = [5] if kind == "knn" else [0.1]
    first = fit_probe(kind, train, val, test, single_label=True, settings=setting, rounds=10)
    # other val clips and labels, permuted test labels: the classifier scoring test must not change
    other_val = (rng.normal(0.0, 5.0, val[0].shape), val[1][rng.permutation(len(val[1]))])
    other_test = (test[0], test[1][rng.permutation(len(test[1]))])
    second = fit_probe(kind, train, other_val, other_test, single_label=True, settings=setting, rounds=10)
    np.testing.assert_array_equal(first.test_scores, second.test_scores)
    # ... while more training clips do change it
    more = (np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]]))
    third = fit_probe(kind, more, val, test, single_label=True, settings=setting, rounds=10)
    assert not np.array_equal(first.test_scores, third.test_scores)


def test_linear_probe_matches_scikit_learn_fitted_on_train_and_chosen_on_val():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    train, val, test = clusters(rng, 15, spread=2.5), clusters(rng, 15, spread=2.5), clusters(rng, 15, spread=2.5)
    grid = [1e-3, 1e-1, 10.0]
    result = fit_probe("linear", train, val, test, single_label=True, settings=grid, rounds=10)
    mean, std = train[0].mean(0), train[0].std(0)
    peers = {c: LogisticRegression(C=c, max_iter=5000).fit((train[0] - mean) / std, train[1].argmax(1)) for c in grid}
    val_accuracy = {c: float(np.mean(m.predict((val[0] - mean) / std) == val[1].argmax(1))) for c, m in peers.items()}
    best = max(grid, key=lambda c: (val_accuracy[c], -grid.index(c)))
    assert result.setting == {"C": best}
    assert [row["accuracy"] for row in result.val_by_setting] == [val_accuracy[c] for c in grid]
    predicted = peers[best].predict((test[0] - mean) / std)
    np.testing.assert_array_equal(result.test_scores.argmax(1), predicted)


def test_multi_label_probes_report_map_and_choose_on_it():
    rng = np.random.default_rng(2)
    x, single = clusters(rng, 30, classes=4)
    extra = np.roll(single, 1, axis=1) & (rng.random(single.shape[0]) < 0.3)[:, None]
    y = single | extra
    order = rng.permutation(len(y))
    parts = np.split(order, [60, 90])
    train, val, test = ((x[p], y[p]) for p in parts)
    for kind in ("knn", "linear"):
        result = fit_probe(kind, train, val, test, single_label=False, rounds=50)
        assert "accuracy" not in result.val and set(result.test) == {"mAP"}
        (name, value), = result.setting.items()
        chosen = next(row for row in result.val_by_setting if row[name] == value)
        assert chosen["mAP"] == max(row["mAP"] for row in result.val_by_setting)
        low, high = result.test["mAP"]["low"], result.test["mAP"]["high"]
        assert 0.5 < low <= result.test["mAP"]["value"] <= high <= 1.0


def test_knn_votes_are_weighted_by_similarity():
    train_x = directions([0, 40, 45])
    train_y = one_hot([0, 1, 1], 2)
    scores = knn_scores(train_x, train_y, directions([10]), [1, 3], temperature=0.07)
    assert scores[1][0].tolist() == [1.0, 0.0]
    similarity = np.cos(np.deg2rad([10, 30, 35]))
    weights = np.exp(similarity / 0.07)
    np.testing.assert_allclose(scores[3][0], [weights[0] / weights.sum(), weights[1:].sum() / weights.sum()])


# --------------------------------------------------------------------------------------------------
# Probe data and features
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("probe_shards")
    for split, count in (("train", 24), ("val", 8), ("test", 8)):
        write_patterned_split(root / split, count, split=split, multi_label=False, num_classes=4, frames=20)
    return root


def test_probe_data_subset_is_seeded_and_in_id_order(probe_shards):
    data = load_probe_data(probe_shards, max_clips=10, seed=3)
    again = load_probe_data(probe_shards, max_clips=10, seed=3)
    assert data.splits["train"].ids == again.splits["train"].ids == sorted(data.splits["train"].ids)
    assert len(data.splits["train"]) == 10 and len(data.splits["val"]) == 8
    other = probe_subset(load_probe_data(probe_shards).splits["train"], 10, seed=4)
    assert other.ids != data.splits["train"].ids


def test_probe_data_refuses_missing_splits_and_shared_clips(probe_shards, tmp_path):
    with pytest.raises(ProbeError, match="no missing split"):
        load_probe_data(probe_shards, splits=("train", "missing"))
    write_patterned_split(tmp_path / "train", 8, split="train", multi_label=False)
    write_patterned_split(tmp_path / "val", 8, split="train", multi_label=False)  # the same ids as train
    with pytest.raises(ProbeError, match="share clip id"):
        load_probe_data(tmp_path, splits=("train", "val"))


def test_embedded_layers_are_the_encoder_hidden_states(probe_shards):
    from af_train.model import AudioFormerConfig, RoFormerEncoder, masked_mean_pool

    torch.manual_seed(0)
    encoder = RoFormerEncoder(AudioFormerConfig.preset("tiny")).eval()
    clips = load_probe_data(probe_shards, splits=("val",)).splits["val"]
    framing = Framing(code_row=1, max_length=16)
    features = embed_clips(encoder, clips, framing, [0, 2], batch_size=3)
    # by hand: BOA + row 1's first 14 codes + EOA, padded to 16
    tokens = []
    for codes in clips.codes:
        row = [1024 + 2] + [int(v) for v in codes[1, :14]] + [1024 + 3]
        tokens.append(row + [1024] * (16 - len(row)))
    ids = torch.tensor(tokens)
    mask = (ids != 1024).long()
    with torch.no_grad():
        last = masked_mean_pool(encoder(ids, mask), mask).numpy()
    np.testing.assert_allclose(features[2], last, atol=1e-5)
    assert features[0].shape == last.shape and not np.allclose(features[0], last)
