"""af_train.metrics against scikit-learn on fresh random scores (ties included)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from af_train.metrics import (
    average_precision,
    bootstrap_interval,
    classification_metrics,
    d_prime,
    mean_average_precision,
    roc_auc,
    top1_accuracy,
)


@pytest.mark.parametrize("seed", range(5))
def test_per_class_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    targets = rng.random(n) < rng.uniform(0.05, 0.6)
    targets[rng.integers(n)] = True
    targets[rng.integers(n)] = False if targets.sum() > 1 else targets[0]
    if targets.all():
        targets[0] = False
    # Coarse scores make ties, which the threshold grouping must handle as sklearn does.
    scores = np.round(rng.normal(size=n) + targets * rng.uniform(0, 2), int(rng.integers(0, 3)))
    assert average_precision(targets, scores) == pytest.approx(average_precision_score(targets, scores), abs=1e-12)
    assert roc_auc(targets, scores) == pytest.approx(roc_auc_score(targets, scores), abs=1e-12)


def test_macro_metrics_multi_label_match_sklearn():
    rng = np.random.default_rng(7)
    n, c = 200, 12
    targets = rng.random((n, c)) < 0.15
    targets[:, 3] = False  # a class without positives is left out of mAP and AUC
    targets[:, 5] = True  # a class without negatives is left out of AUC only
    scores = rng.normal(size=(n, c)) + 1.5 * targets
    result = classification_metrics(scores, targets)
    with_pos = [k for k in range(c) if targets[:, k].any()]
    both = [k for k in with_pos if not targets[:, k].all()]
    expected_map = np.mean([average_precision_score(targets[:, k], scores[:, k]) for k in with_pos])
    expected_auc = roc_auc_score(targets[:, both], scores[:, both], average="macro")
    assert result["mAP"] == pytest.approx(expected_map, abs=1e-12)
    assert result["auc"] == pytest.approx(expected_auc, abs=1e-12)
    assert result["classes_with_positives"] == len(with_pos) and result["classes_in_auc"] == len(both)
    from scipy.stats import norm

    assert result["d_prime"] == pytest.approx(math.sqrt(2) * norm.ppf(expected_auc), abs=1e-9)
    assert "accuracy" not in result


def test_single_label_accuracy_and_one_hot_metrics():
    rng = np.random.default_rng(11)
    n, c = 150, 6
    labels = rng.integers(0, c, size=n)
    scores = rng.normal(size=(n, c))
    scores[np.arange(n), labels] += rng.uniform(0, 2, size=n)
    result = classification_metrics(scores, labels)
    one_hot = np.eye(c, dtype=bool)[labels]
    assert result["accuracy"] == pytest.approx(np.mean(scores.argmax(1) == labels))
    assert result["mAP"] == pytest.approx(average_precision_score(one_hot, scores, average="macro"), abs=1e-12)
    assert result["auc"] == pytest.approx(roc_auc_score(one_hot, scores, average="macro"), abs=1e-12)


def test_edge_cases_and_errors():
    assert math.isnan(average_precision(np.zeros(4), np.arange(4.0)))
    assert math.isnan(roc_auc(np.ones(4), np.arange(4.0)))
    assert d_prime(0.5) == pytest.approx(0.0) and d_prime(1.0) == math.inf
    with pytest.raises(ValueError, match="non-finite"):
        roc_auc(np.array([0, 1]), np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="class indices"):
        classification_metrics(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="differ in shape"):
        classification_metrics(np.zeros((2, 3)), np.zeros((2, 4)))


def test_bootstrap_interval_of_a_proportion_matches_the_normal_approximation():
    rng = np.random.default_rng(11)
    hits = rng.random(400) < 0.3
    interval = bootstrap_interval(lambda i: float(hits[i].mean()), hits.size, rounds=2000, seed=5)
    p = hits.mean()
    half_width = 1.96 * math.sqrt(p * (1 - p) / hits.size)  # the textbook 95 % interval of a proportion
    assert interval["value"] == p
    assert interval["low"] == pytest.approx(p - half_width, abs=0.005)
    assert interval["high"] == pytest.approx(p + half_width, abs=0.005)
    # the same seed gives the same resamples: a paired difference of a statistic with itself is exactly 0
    same = bootstrap_interval(lambda i: float(hits[i].mean() - hits[i].mean()), hits.size, rounds=50, seed=5)
    assert same["low"] == same["high"] == same["value"] == 0.0
    again = bootstrap_interval(lambda i: float(hits[i].mean()), hits.size, rounds=2000, seed=5)
    assert again == interval
    with pytest.raises(ValueError, match="at least one sample"):
        bootstrap_interval(lambda i: 0.0, 0)


def test_map_and_accuracy_helpers_agree_with_classification_metrics():
    rng = np.random.default_rng(12)
    scores = rng.normal(size=(50, 4))
    labels = rng.integers(0, 4, 50)
    full = classification_metrics(scores, labels)
    assert mean_average_precision(scores, labels) == full["mAP"]
    assert top1_accuracy(scores, labels) == full["accuracy"]
    assert top1_accuracy(scores, labels) == pytest.approx(np.mean(scores.argmax(1) == labels))
