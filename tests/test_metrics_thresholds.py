"""Per-class F1-optimal thresholds (af_train.metrics.f1_optimal_thresholds) against a brute force."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from af_train.metrics import f1_optimal_thresholds


@pytest.mark.parametrize("seed", range(4))
def test_threshold_reaches_the_best_f1_of_any_cut(seed):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(8, 120)), 5
    targets = rng.random((n, c)) < rng.uniform(0.1, 0.5)
    targets[0] = True
    # coarse probabilities make ties
    scores = np.clip(np.round(rng.random((n, c)) * 0.6 + 0.4 * targets, int(rng.integers(1, 3))), 0, 1)
    thresholds, f1 = f1_optimal_thresholds(scores, targets)
    for k in range(c):
        cuts = np.unique(scores[:, k])
        brute = max(f1_score(targets[:, k], scores[:, k] >= t, zero_division=0.0) for t in cuts)
        assert f1[k] == pytest.approx(brute, abs=1e-12)
        # the returned threshold gives that F1 when applied with >=
        achieved = f1_score(targets[:, k], scores[:, k] >= thresholds[k], zero_division=0.0)
        assert achieved == pytest.approx(brute, abs=1e-12)


def test_threshold_sits_between_the_kept_and_the_dropped_score():
    scores = np.array([[0.9], [0.8], [0.3], [0.1]])
    targets = np.array([[1], [1], [0], [0]], dtype=bool)
    thresholds, f1 = f1_optimal_thresholds(scores, targets)
    assert thresholds[0] == pytest.approx(0.55) and f1[0] == 1.0


def test_class_without_positives_gets_nan():
    thresholds, f1 = f1_optimal_thresholds(np.array([[0.2, 0.7], [0.4, 0.1]]), np.array([[0, 1], [0, 0]]))
    assert np.isnan(thresholds[0]) and np.isnan(f1[0]) and thresholds[1] == pytest.approx(0.4)
