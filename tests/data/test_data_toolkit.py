"""Data side of the fine-tuning toolkit: fine-tuning masking, mixtures of data sets, class-balanced sampling."""

from __future__ import annotations

import numpy as np
import pytest
from data_shards import write_shards

from af_train.config import DataConfig, RecipeError, StreamConfig
from af_train.data.balance import measure_epoch, prepare_buckets
from af_train.data.dataset import DataError
from af_train.data.loader import build_dataloader
from af_train.tokens import SpecialTokens


def _config(**kwargs) -> DataConfig:
    cfg = DataConfig(max_length=42, shuffle=True, **kwargs)
    cfg.validate()
    return cfg


def _epoch(loader) -> list[dict]:
    return [batch for batch in loader]


def test_finetune_masking_corrupts_the_training_split_only(single_label_shards, loaders):
    root, _ = single_label_shards
    cfg = _config(train=str(root), val=str(root), finetune_mask_rate=0.3, mask_token_fraction=1.0,
                  random_token_fraction=0.0)
    mask_id = SpecialTokens(1024).mask
    train = build_dataloader(cfg, "train", 4, mask=False, seed=0, finetune_masking=True)
    val = build_dataloader(cfg, "val", 4, mask=False, seed=0, finetune_masking=True)
    loaders += [train, val]
    train_batches, val_batches = _epoch(train), _epoch(val)
    masked = sum(int((b["input_ids"] == mask_id).sum()) for b in train_batches)
    # real code tokens: every row's unpadded positions without BOA/EOA
    real = sum((int(b["attention_mask"].sum()) - 2 * len(b["ids"])) * b["input_ids"].shape[1] for b in train_batches)
    assert abs(masked / real - 0.3) < 0.02, masked / real
    assert all("mlm_labels" not in b for b in train_batches)  # augmentation: no MLM targets
    assert all(int((b["input_ids"] == mask_id).sum()) == 0 for b in val_batches)


def test_mixture_follows_the_proportions(tmp_path, loaders):
    # two data sets with the same vocabulary, told apart by their only label
    write_shards(tmp_path / "a", 60, num_classes=2, multi_label=False, labels_per_clip=[[0]] * 60, frames=40)
    write_shards(tmp_path / "b", 60, num_classes=2, multi_label=False, labels_per_clip=[[1]] * 60, frames=40)
    cfg = _config(train=[StreamConfig(path=str(tmp_path / "a"), proportion=3.0),
                         StreamConfig(path=str(tmp_path / "b"), proportion=1.0)])
    counts = np.zeros(2)
    for epoch_seed in (0, 1):
        cfg.shuffle_seed = 1000 + epoch_seed
        loader = build_dataloader(cfg, "train", 4, mask=False, seed=0)
        loaders.append(loader)
        for batch in _epoch(loader):
            counts += np.bincount(batch["labels"].numpy(), minlength=2)
        loader.dataset.close()
    assert counts.sum() == 2 * 120  # proportions keep the epoch at the total number of clips
    assert abs(counts[0] / counts.sum() - 0.75) < 0.01, counts


def test_mixture_vocabularies_must_agree_for_finetuning_only(tmp_path, loaders):
    write_shards(tmp_path / "a", 12, num_classes=3, multi_label=True, frames=40)
    write_shards(tmp_path / "b", 12, num_classes=4, multi_label=True, frames=40)
    cfg = _config(train=[StreamConfig(path=str(tmp_path / "a")), StreamConfig(path=str(tmp_path / "b"))])
    with pytest.raises(DataError, match="different label vocabularies.*3 vs 4 classes"):
        build_dataloader(cfg, "train", 4, mask=False, seed=0)
    loader = build_dataloader(cfg, "train", 4, mask=True, seed=0)  # pretraining: labels are not read
    loaders.append(loader)
    batches = _epoch(loader)
    assert sum(len(b["ids"]) for b in batches) == 24 and all(b["labels"].shape[1] == 0 for b in batches)


def test_mixture_entries_are_checked():
    with pytest.raises(RecipeError, match="proportion for every entry or for none"):
        _config(train=[StreamConfig(path="a", proportion=1.0), StreamConfig(path="b", repeat=2.0)])
    with pytest.raises(RecipeError, match="exactly one of path or remote"):
        StreamConfig(path="a", remote="s3://b/c").validate()


def _audiomae_target(labels: list[list[int]], num_classes: int, power: float = 1.0) -> np.ndarray:
    """Expected share of label occurrences per class when clips are drawn in proportion to AudioMAE's
    weights (written here from the recipe of the AST/AudioMAE weight files, not from af_train), the
    class weights tempered to 1 / count ** power (AudioMAE: power 1)."""
    counts = np.zeros(num_classes)
    for clip in labels:
        for c in clip:
            counts[c] += 1
    class_weight = 1000.0 / (counts + 0.01) ** power
    clip_weight = np.array([sum(class_weight[c] for c in clip) for clip in labels])
    share = np.zeros(num_classes)
    for clip, w in zip(labels, clip_weight):
        for c in clip:
            share[c] += w
    return share / share.sum()


@pytest.mark.parametrize("multi_label, power", [(False, 1.0), (True, 1.0), (False, 0.5)])
def test_balanced_sampling_reaches_the_target_class_frequencies(tmp_path, multi_label, power):
    rng = np.random.default_rng(3)
    sizes = [160, 80, 30, 10]  # long-tailed, as AudioSet
    labels = [[c] for c, n in enumerate(sizes) for _ in range(n)]
    if multi_label:  # a quarter of the clips also carry a frequent class
        labels = [sorted({clip[0], 0}) if rng.random() < 0.25 else clip for clip in labels]
    write_shards(tmp_path / "train", len(labels), num_classes=4, multi_label=multi_label, labels_per_clip=labels,
                 frames=20)
    directory, plan = prepare_buckets(str(tmp_path / "train"), str(tmp_path / "cache"), 8, power)
    assert plan["power"] == power
    target = _audiomae_target(labels, 4, power)
    measured = np.zeros(4)
    for seed in range(3):  # three epochs' worth: the fractional repeats are random per epoch
        measured += measure_epoch(directory, plan, seed=seed) / 3
    natural = np.array([sum(c in clip for clip in labels) for c in range(4)], float)
    natural /= natural.sum()
    assert np.abs(measured - target).max() < 0.03, (measured, target)
    # the check can fail: unbalanced draws, or the other power's, are far off
    assert np.abs(natural - target).max() > 0.15
    other = _audiomae_target(labels, 4, 1.5 - power)
    assert np.abs(other - target).max() > 0.08


def test_balance_power_keeps_its_own_buckets_and_refuses_a_mismatch(tmp_path):
    labels = [[c] for c, n in enumerate([40, 10]) for _ in range(n)]
    write_shards(tmp_path / "train", len(labels), num_classes=2, multi_label=False, labels_per_clip=labels, frames=20)
    full, plan_full = prepare_buckets(str(tmp_path / "train"), str(tmp_path / "cache"), 4)
    root, plan_root = prepare_buckets(str(tmp_path / "train"), str(tmp_path / "cache"), 4, 0.5)
    assert full != root and plan_full["power"] == 1.0 and plan_root["power"] == 0.5
    assert plan_root["target_class_frequency"][1] < plan_full["target_class_frequency"][1]
    # pre-built buckets given as data.train: the power must match the one they were written with
    assert prepare_buckets(str(root), str(tmp_path / "cache"), 4, 0.5)[0] == root
    with pytest.raises(DataError, match="written with power 0.5, but data.balance_power is 1"):
        prepare_buckets(str(root), str(tmp_path / "cache"), 4, 1.0)
    with pytest.raises(RecipeError, match="data.balance_power must be in"):
        _config(balance_power=0.0)


def test_balanced_sampling_needs_a_local_split(tmp_path):
    with pytest.raises(DataError, match="no MDS shards"):
        prepare_buckets(str(tmp_path / "missing"), str(tmp_path / "cache"), 4)
    with pytest.raises(RecipeError, match="balanced_sampling works on one training data set"):
        _config(train=[StreamConfig(path="a")], balanced_sampling=True)


def test_mixup_and_masking_refused_in_pretraining():
    from af_train.config import Recipe

    with pytest.raises(RecipeError, match="objective.mixup applies to ft1/ft2"):
        Recipe.from_dict({"objective": {"mode": "pretrain", "mixup": {"prob": 0.5}}})
    with pytest.raises(RecipeError, match="finetune_mask_rate applies to ft1/ft2"):
        Recipe.from_dict({"data": {"finetune_mask_rate": 0.1}})
