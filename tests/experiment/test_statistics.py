"""The statistics of af-experiment (af_train.metrics): bulk AP, run metrics and the bootstrap over seeds,
folds and test clips, each against an independent computation (scikit-learn, scipy, a plain loop)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import average_precision_score

from af_train.metrics import (
    average_precision_columns,
    bootstrap_runs,
    chance_metric,
    classification_metrics,
    percentile_interval,
    run_metric,
)


def sklearn_map(scores: np.ndarray, targets: np.ndarray) -> float:
    aps = [average_precision_score(targets[:, c], scores[:, c]) for c in range(targets.shape[1]) if targets[:, c].any()]
    return float(np.mean(aps))


def one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    out = np.zeros((labels.size, classes), dtype=bool)
    out[np.arange(labels.size), labels] = True
    return out


def test_average_precision_columns_equals_scikit_learn_with_ties_and_empty_classes():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n, k = int(rng.integers(1, 40)), int(rng.integers(1, 6))
        scores = rng.integers(0, 4, (n, k)).astype(float) if trial % 2 else rng.normal(size=(n, k))  # ties / none
        targets = rng.random((n, k)) < 0.3
        got = average_precision_columns(scores, targets)
        for c in range(k):
            if targets[:, c].any():
                assert got[c] == pytest.approx(average_precision_score(targets[:, c], scores[:, c]), abs=1e-12)
            else:
                assert np.isnan(got[c])


def test_run_metrics_equal_the_evaluation_metrics():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(80, 7))
    labels = rng.integers(0, 7, 80)
    reference = classification_metrics(scores, labels)
    assert run_metric("mAP", scores, one_hot(labels, 7)) == pytest.approx(reference["mAP"], abs=1e-12)
    assert run_metric("accuracy", scores, one_hot(labels, 7)) == pytest.approx(reference["accuracy"], abs=1e-12)
    multi = rng.random((80, 7)) < 0.3
    assert run_metric("mAP", scores, multi) == pytest.approx(classification_metrics(scores, multi)["mAP"], abs=1e-12)
    with pytest.raises(ValueError, match="single-label"):
        run_metric("accuracy", scores, multi)


def _two_models(rng: np.random.Generator, n: int, classes: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Targets and the scores of two models on the same clips; the second one better by ``shift``."""
    labels = rng.integers(0, classes, n)
    targets = one_hot(labels, classes)
    base = rng.normal(size=(n, classes)) + 1.0 * targets
    better = rng.normal(size=(n, classes)) + (1.0 + shift) * targets
    return targets, np.stack([base, better])


def pairwise_map(scores: np.ndarray, targets: np.ndarray) -> float:
    """mAP by its definition, without sorting: each positive contributes the precision among the clips scored
    at least as high (ties included, as scikit-learn counts them)."""
    aps = []
    for c in range(targets.shape[1]):
        positive, column = targets[:, c], scores[:, c]
        if positive.any():
            at_least = column[None, :] >= column[positive][:, None]  # [positives, clips]
            aps.append(np.mean((at_least & positive[None, :]).sum(1) / at_least.sum(1)))
    return float(np.mean(aps))


def test_paired_interval_over_clips_matches_scipy_bootstrap():
    """One seed, one fold: the interval of mAP(b) − mAP(a) against scipy.stats.bootstrap on the clip indices,
    with mAP computed by its pairwise definition (itself checked against scikit-learn, ties included):
    independent resampling and metric, equal within Monte Carlo error."""
    rng = np.random.default_rng(2)
    targets, scores = _two_models(rng, 120, 5, 0.6)
    for trial in range(3):
        pick = rng.integers(0, 120, 120)  # a resample: duplicated clips tie
        assert pairwise_map(scores[trial % 2][pick], targets[pick]) == pytest.approx(
            sklearn_map(scores[trial % 2][pick], targets[pick]), abs=1e-12)
    point, replicates = bootstrap_runs([scores[:, None]], [targets], "mAP", rounds=3000, seed=3)
    low, high = percentile_interval(replicates[:, 1] - replicates[:, 0])

    def difference(index: np.ndarray) -> float:
        index = index.astype(int)
        picked = targets[index]
        if not picked.any(axis=0).all():
            return np.nan
        return pairwise_map(scores[1][index], picked) - pairwise_map(scores[0][index], picked)

    reference = stats.bootstrap((np.arange(120),), difference, vectorized=False, n_resamples=3000,
                                method="percentile", random_state=4)
    assert point[1] - point[0] == pytest.approx(sklearn_map(scores[1], targets) - sklearn_map(scores[0], targets))
    assert low == pytest.approx(reference.confidence_interval.low, abs=0.015)
    assert high == pytest.approx(reference.confidence_interval.high, abs=0.015)
    assert low > 0  # a real improvement of this size is seen on 120 clips


def test_bootstrap_over_seeds_and_folds_equals_a_plain_loop():
    """Three seeds, two folds of different sizes: every replicate equals a loop that redraws the documented
    resamples (seeds, then each fold's clips) and scores them with scikit-learn."""
    rng = np.random.default_rng(5)
    sizes, arms, seeds, classes = (30, 22), 3, 3, 4
    targets = [one_hot(rng.integers(0, classes, n), classes) for n in sizes]
    scores = [rng.normal(size=(arms, seeds, n, classes)) + t for n, t in zip(sizes, targets)]
    rounds = 40
    point, replicates = bootstrap_runs(scores, targets, "mAP", rounds=rounds, seed=9)
    draw = np.random.default_rng(9)
    for r in range(rounds):
        seed_pick = draw.integers(0, seeds, seeds)
        clip_picks = [draw.integers(0, n, n) for n in sizes]
        for a in range(arms):
            values = [np.mean([sklearn_map(s[a, k][pick], t[pick]) for s, t, pick in zip(scores, targets, clip_picks)])
                      for k in seed_pick]
            assert replicates[r, a] == pytest.approx(np.mean(values), abs=1e-12)
    for a in range(arms):
        expected = np.mean([np.mean([sklearn_map(s[a, k], t) for s, t in zip(scores, targets)]) for k in range(seeds)])
        assert point[a] == pytest.approx(expected, abs=1e-12)


def test_identical_arms_give_a_zero_interval_and_resampling_seeds_widens_it():
    rng = np.random.default_rng(6)
    targets, scores = _two_models(rng, 60, 4, 0.0)
    per_seed = np.stack([scores[0], scores[0] + 0.3 * rng.normal(size=scores[0].shape),
                         scores[0] - 0.3 * rng.normal(size=scores[0].shape)])
    same = np.stack([per_seed, per_seed])  # two arms with the very same runs
    _, replicates = bootstrap_runs([same], [targets], "accuracy", rounds=300)
    assert percentile_interval(replicates[:, 1] - replicates[:, 0]) == (0.0, 0.0)
    _, fixed = bootstrap_runs([same], [targets], "accuracy", rounds=600, resample_seeds=False)
    _, resampled = bootstrap_runs([same], [targets], "accuracy", rounds=600, resample_seeds=True)
    assert np.std(resampled[:, 0]) > np.std(fixed[:, 0])


def test_null_intervals_cover_zero_about_as_often_as_promised_and_a_real_gap_is_found():
    """Calibration: two arms of the same quality (fresh data each time) give a 95 % paired interval that
    excludes 0 rarely; a clear gap is found nearly always."""
    rng = np.random.default_rng(7)
    misses = found = 0
    trials = 120
    for _ in range(trials):
        targets, scores = _two_models(rng, 80, 4, 0.0)
        _, replicates = bootstrap_runs([scores[:, None]], [targets], "accuracy", 300, int(rng.integers(1e9)))
        low, high = percentile_interval(replicates[:, 1] - replicates[:, 0])
        misses += not (low <= 0.0 <= high)
        targets, scores = _two_models(rng, 80, 4, 1.5)
        _, replicates = bootstrap_runs([scores[:, None]], [targets], "accuracy", 300, int(rng.integers(1e9)))
        found += percentile_interval(replicates[:, 1] - replicates[:, 0])[0] > 0
    assert misses / trials <= 0.12  # nominal 0.05; 120 trials leave room
    assert found / trials >= 0.9


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="arms, seeds, clips, classes"):
        bootstrap_runs([np.zeros((2, 3, 4))], [np.zeros((3, 4), bool)], "mAP")
    with pytest.raises(ValueError, match="one scores array and one targets array per fold"):
        bootstrap_runs([], [], "mAP")
    with pytest.raises(ValueError, match="unknown run metric"):
        run_metric("f1", np.zeros((2, 2)), np.eye(2, dtype=bool))


def test_chance_is_what_random_scores_reach():
    """Accuracy of random scores is 1 / C; their mAP, computed here with scikit-learn on draws of another RNG, is
    a little above the class prevalence (2 of 10 classes per clip: 0.2)."""
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 10, size=300)
    assert chance_metric("accuracy", one_hot(labels, 10)) == pytest.approx(0.1, abs=0.01)
    targets = np.zeros((300, 10), dtype=bool)
    for row in targets:
        row[rng.choice(10, size=2, replace=False)] = True
    expected = np.mean([sklearn_map(rng.standard_normal(targets.shape), targets) for _ in range(200)])
    got = chance_metric("mAP", targets)
    assert 0.2 < got < 0.25 and got == pytest.approx(expected, abs=0.005)
