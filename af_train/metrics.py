"""Evaluation metrics for audio tagging, in numpy only (no scikit-learn at runtime).

- ``average_precision``: area under the precision-recall curve as a step function over the distinct
  score thresholds (scikit-learn's ``average_precision_score``): AP = Σ_k (R_k − R_{k−1}) · P_k.
- ``roc_auc``: the Mann-Whitney statistic with tied scores counted one half, which equals the
  trapezoidal area under the ROC curve (scikit-learn's ``roc_auc_score``).
- ``d_prime``: √2 · Φ⁻¹(AUC), the sensitivity index AudioSet papers report next to mAP.
- ``classification_metrics``: mAP (macro AP over classes with at least one positive), macro ROC-AUC
  (classes with positives and negatives), d′ of the macro AUC, and top-1 accuracy for single-label sets.
- ``bootstrap_interval``: a percentile bootstrap over clips of any statistic (one model's accuracy or
  mAP, or the difference of two models scored on the same resampled clips).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist

import numpy as np


def _check_binary(targets: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    targets = np.asarray(targets)
    scores = np.asarray(scores, dtype=np.float64)
    if targets.shape != scores.shape or targets.ndim != 1:
        raise ValueError(f"targets and scores must be 1-D of the same length, got {targets.shape} and {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or inf; the model produced non-finite outputs")
    return targets.astype(bool), scores


def average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
    """AP of one class; NaN when the class has no positive."""
    positive, scores = _check_binary(targets, scores)
    num_pos = int(positive.sum())
    if num_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    # The last index of each run of equal scores is one threshold of the curve.
    last_of_run = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
    true_pos = np.cumsum(positive)[last_of_run]
    predicted_pos = last_of_run + 1
    precision = true_pos / predicted_pos
    recall = true_pos / num_pos
    recall_steps = np.diff(np.r_[0.0, recall])
    return float(np.sum(recall_steps * precision))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    run_start = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    run_id = np.cumsum(run_start) - 1
    starts = np.nonzero(run_start)[0]
    ends = np.r_[starts[1:], values.size]  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def roc_auc(targets: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of one class; NaN when the class lacks positives or negatives."""
    positive, scores = _check_binary(targets, scores)
    num_pos = int(positive.sum())
    num_neg = positive.size - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    rank_sum = _average_ranks(scores)[positive].sum()
    return float((rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def d_prime(auc: float) -> float:
    """√2 · Φ⁻¹(AUC); ±inf at AUC 1/0, NaN for NaN."""
    if math.isnan(auc):
        return float("nan")
    if auc >= 1.0:
        return float("inf")
    if auc <= 0.0:
        return float("-inf")
    return math.sqrt(2.0) * NormalDist().inv_cdf(auc)


def _as_multi_hot(targets: np.ndarray, num_classes: int) -> np.ndarray:
    targets = np.asarray(targets)
    if targets.ndim == 2:
        return targets.astype(bool)
    if targets.ndim != 1:
        raise ValueError(f"targets must be [N, C] multi-hot or [N] class indices, got shape {targets.shape}")
    if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"class indices must be in [0, {num_classes}), got {targets.min()}..{targets.max()}")
    multi_hot = np.zeros((targets.size, num_classes), dtype=bool)
    multi_hot[np.arange(targets.size), targets.astype(np.int64)] = True
    return multi_hot


def classification_metrics(scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Metrics of ``scores`` [N, C] against multi-hot ``targets`` [N, C] or class indices [N].

    Returns ``mAP``, ``auc``, ``d_prime``, the class counts they averaged over, ``num_samples`` and,
    for class-index targets, ``accuracy`` (top-1).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, C], got shape {scores.shape}")
    single_label = np.asarray(targets).ndim == 1
    multi_hot = _as_multi_hot(targets, scores.shape[1])
    if multi_hot.shape != scores.shape:
        raise ValueError(f"targets {multi_hot.shape} and scores {scores.shape} differ in shape")
    aps = [average_precision(multi_hot[:, c], scores[:, c]) for c in range(scores.shape[1])]
    aucs = [roc_auc(multi_hot[:, c], scores[:, c]) for c in range(scores.shape[1])]
    valid_ap = [a for a in aps if not math.isnan(a)]
    valid_auc = [a for a in aucs if not math.isnan(a)]
    macro_auc = float(np.mean(valid_auc)) if valid_auc else float("nan")
    result = {
        "mAP": _mean_or_nan(valid_ap),
        "auc": macro_auc,
        "d_prime": d_prime(macro_auc),
        "classes_with_positives": float(len(valid_ap)),
        "classes_in_auc": float(len(valid_auc)),
        "num_samples": float(scores.shape[0]),
    }
    if single_label:
        predicted = scores.argmax(axis=1)
        result["accuracy"] = float(np.mean(predicted == np.asarray(targets))) if scores.shape[0] else float("nan")
    return result


def f1_optimal_thresholds(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class decision thresholds that maximise F1 on ``scores`` [N, C] against multi-hot ``targets``.

    A clip is predicted positive for class c when ``score >= threshold[c]``. Every distinct score is a
    candidate cut; the threshold returned for the best cut is halfway between the lowest score kept
    and the highest score left out (the kept score itself when nothing is left out), so that scores
    of new clips falling between the two are treated alike. Ties in F1 go to the higher threshold
    (fewer positives). Returns ``(thresholds, f1)``, both float64 [C]; a class without positives
    gets NaN for both (no cut is meaningful; callers fall back to a fixed threshold).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, C], got shape {scores.shape}")
    multi_hot = _as_multi_hot(targets, scores.shape[1])
    if multi_hot.shape != scores.shape:
        raise ValueError(f"targets {multi_hot.shape} and scores {scores.shape} differ in shape")
    thresholds = np.full(scores.shape[1], np.nan)
    best_f1 = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        positive, column = _check_binary(multi_hot[:, c], scores[:, c])
        num_pos = int(positive.sum())
        if num_pos == 0:
            continue
        order = np.argsort(-column, kind="mergesort")
        column, positive = column[order], positive[order]
        last_of_run = np.r_[np.nonzero(np.diff(column))[0], column.size - 1]  # each distinct score: one cut
        true_pos = np.cumsum(positive)[last_of_run]
        predicted = last_of_run + 1
        f1 = 2.0 * true_pos / (predicted + num_pos)
        best = int(np.argmax(f1))  # first maximum = highest threshold
        kept = column[last_of_run[best]]
        left_out = column[last_of_run[best] + 1] if last_of_run[best] + 1 < column.size else None
        thresholds[c] = kept if left_out is None else (kept + left_out) / 2.0
        best_f1[c] = f1[best]
    return thresholds, best_f1


# --------------------------------------------------------------------------------------------------
# Repeated runs: per-clip metrics in bulk and the bootstrap over seeds, folds and test clips
# --------------------------------------------------------------------------------------------------

RUN_METRICS = ("mAP", "accuracy")  # what ``run_metric`` and ``bootstrap_runs`` compute


def average_precision_columns(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """AP of every column of ``scores`` [N, K] against ``targets`` [N, K] (bool), at once: [K] float64,
    NaN for a column without a positive. The same step-function AP as ``average_precision`` (tied
    scores form one threshold): each positive contributes the precision at the end of its run of
    equal scores."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(targets, dtype=bool)
    if scores.shape != positive.shape or scores.ndim != 2:
        raise ValueError(f"scores and targets must be [N, K] of the same shape, got {scores.shape} and "
                         f"{positive.shape}")
    n = scores.shape[0]
    if n == 0:
        return np.full(scores.shape[1], np.nan)
    order = np.argsort(-scores, axis=0, kind="stable")
    ranked = np.take_along_axis(scores, order, axis=0)
    hits = np.take_along_axis(positive, order, axis=0)
    true_pos = np.cumsum(hits, axis=0)
    last_of_run = np.ones_like(hits)
    last_of_run[:-1] = ranked[1:] != ranked[:-1]
    position = np.arange(n)[:, None]
    # the index of the end of each row's run of equal scores: a reversed running minimum
    run_end = np.where(last_of_run, position, n)
    run_end = np.minimum.accumulate(run_end[::-1], axis=0)[::-1]
    precision_at_end = np.take_along_axis(true_pos, run_end, axis=0) / (run_end + 1.0)
    num_pos = true_pos[-1].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (hits * precision_at_end).sum(axis=0) / num_pos
    return np.where(num_pos > 0, ap, np.nan)


def run_metric(name: str, scores: np.ndarray, targets: np.ndarray) -> float:
    """One run's test metric from its per-clip ``scores`` [N, C] and multi-hot ``targets`` [N, C]:
    ``mAP`` (macro AP over the classes with a positive, as ``classification_metrics``) or ``accuracy``
    (top-1 against the one positive of single-label targets)."""
    return float(_metric_columns(name, np.asarray(scores)[None], np.asarray(targets, dtype=bool))[0])


def chance_metric(name: str, targets: np.ndarray, draws: int = 200, seed: int = 0) -> float:
    """``name`` of a model that knows nothing, on these ``targets`` [N, C]: the mean over ``draws`` score
    sets drawn at random (i.i.d. normal, seeded). About the mean class prevalence for mAP, 1 / C for
    accuracy; drawn rather than derived, so that it holds for any class balance and any tie rule."""
    targets = np.asarray(targets, dtype=bool)
    scores = np.random.default_rng(seed).standard_normal((draws, *targets.shape))
    return float(np.nanmean(_metric_columns(name, scores, targets)))


def _metric_columns(name: str, scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``name`` of each of M score sets ``scores`` [M, N, C] on the same ``targets`` [N, C]: [M]."""
    m, n, c = scores.shape
    if targets.shape != (n, c):
        raise ValueError(f"targets {targets.shape} do not fit scores [{n}, {c}]")
    if name == "mAP":
        columns = scores.transpose(1, 0, 2).reshape(n, m * c)
        ap = average_precision_columns(columns, np.tile(targets, (1, m))).reshape(m, c)
        with np.errstate(all="ignore"):
            valid = ~np.isnan(ap)
            return np.where(valid.any(1), np.nansum(ap, axis=1) / np.maximum(valid.sum(1), 1), np.nan)
    if name == "accuracy":
        if not np.all(targets.sum(axis=1) == 1):
            raise ValueError("accuracy needs single-label targets (one positive per clip); use mAP")
        return (scores.argmax(axis=2) == targets.argmax(axis=1)[None]).mean(axis=1)
    raise ValueError(f"unknown run metric {name!r}; choose one of {', '.join(RUN_METRICS)}")


def bootstrap_runs(scores_by_fold: list[np.ndarray], targets_by_fold: list[np.ndarray], metric: str,
                   rounds: int = 2000, seed: int = 0, resample_seeds: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap of repeated runs: (point [A], replicates [rounds, A]) of each arm's statistic.

    ``scores_by_fold[f]``: [A arms, S seeds, N_f clips, C] test scores of fold f (one fold without
    cross-validation); ``targets_by_fold[f]``: [N_f, C] multi-hot. An arm's statistic is the mean over
    seeds of the mean over folds of ``metric`` (``run_metric``) on the fold's clips. A replicate draws,
    in this order from ``np.random.default_rng(seed)``: S seed indices with replacement (unless
    ``resample_seeds`` is false: every seed once), then for each fold N_f clip indices with
    replacement, and recomputes every arm's statistic on that one draw. All arms share each draw, so
    ``replicates[:, b] - replicates[:, a]`` is the paired bootstrap of the difference b − a: paired over
    the same test clips and the same seeds (each seed's runs share data order and initialisation).
    """
    if len(scores_by_fold) != len(targets_by_fold) or not scores_by_fold:
        raise ValueError("give one scores array and one targets array per fold (at least one fold)")
    shapes = [np.shape(s) for s in scores_by_fold]
    if any(len(s) != 4 for s in shapes) or len({s[:2] for s in shapes}) != 1:
        raise ValueError(f"scores must be [arms, seeds, clips, classes] with the same arms and seeds in every "
                         f"fold, got {shapes}")
    arms, seeds = shapes[0][:2]
    scores_f = [np.asarray(s, dtype=np.float64) for s in scores_by_fold]
    targets_f = [np.asarray(t, dtype=bool) for t in targets_by_fold]

    def per_run(picks: list[np.ndarray | None]) -> np.ndarray:
        """[A, S]: the metric of every run, mean over folds, on the clips ``picks`` (None: all)."""
        total = np.zeros((arms, seeds))
        for s, t, pick in zip(scores_f, targets_f, picks):
            chosen, truth = (s, t) if pick is None else (s[:, :, pick], t[pick])
            total += _metric_columns(metric, chosen.reshape(arms * seeds, *chosen.shape[2:]), truth).reshape(
                arms, seeds)
        return total / len(scores_f)

    point = per_run([None] * len(scores_f)).mean(axis=1)
    rng = np.random.default_rng(seed)
    replicates = np.empty((rounds, arms))
    for r in range(rounds):
        seed_pick = rng.integers(0, seeds, seeds) if resample_seeds else np.arange(seeds)
        clip_picks = [rng.integers(0, t.shape[0], t.shape[0]) for t in targets_f]
        replicates[r] = per_run(clip_picks)[:, seed_pick].mean(axis=1)
    return point, replicates


def percentile_interval(replicates: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The central ``confidence`` percentile interval of bootstrap replicates (NaN replicates skipped)."""
    replicates = np.asarray(replicates, dtype=np.float64)
    if np.all(np.isnan(replicates)):
        return float("nan"), float("nan")
    tail = round(50.0 * (1.0 - confidence), 10)  # percent in each tail: 2.5 exactly for 0.95
    low, high = np.nanpercentile(replicates, [tail, 100.0 - tail])
    return float(low), float(high)


def _mean_or_nan(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """mAP alone (``classification_metrics``' definition, without the AUCs): the mean AP over the classes
    of ``targets`` (multi-hot [N, C] or class indices [N]) that have at least one positive; NaN if none."""
    scores = np.asarray(scores, dtype=np.float64)
    multi_hot = _as_multi_hot(targets, scores.shape[1])
    aps = [average_precision(multi_hot[:, c], scores[:, c]) for c in range(scores.shape[1])]
    return _mean_or_nan([a for a in aps if not math.isnan(a)])


def top1_accuracy(scores: np.ndarray, targets: np.ndarray) -> float:
    """Share of rows whose highest score is the target class (class indices [N]; ties: the lowest index)."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    return float(np.mean(scores.argmax(axis=1) == targets)) if scores.shape[0] else float("nan")


def bootstrap_interval(statistic: Callable[[np.ndarray], float], num_samples: int, *, rounds: int = 1000,
                       seed: int = 0, confidence: float = 0.95) -> dict[str, float]:
    """Percentile bootstrap over ``num_samples`` samples (clips) of ``statistic(indices) -> float``.

    ``statistic`` receives an int64 array of sample indices (a resample has repeats) and scores the
    rows it names, e.g. ``lambda i: top1_accuracy(scores[i], labels[i])``; for a paired comparison of
    two models it scores both on the same indices and returns the difference. Round r draws
    ``numpy.random.default_rng(seed).integers(0, n, n)`` as the r-th call, so calls with the same
    ``seed`` and ``num_samples`` see the same resamples (accuracy and mAP intervals of one model, or
    several models, are then computed on identical resampled test sets).

    Returns ``value`` (the statistic on all samples, in order), ``low`` and ``high`` (the
    (1 - confidence) / 2 and (1 + confidence) / 2 percentiles over the resamples; resamples where
    the statistic is NaN, e.g. no positive of any class, are left out), ``rounds`` and ``confidence``.
    """
    if num_samples < 1:
        raise ValueError(f"bootstrap_interval needs at least one sample, got {num_samples}")
    if rounds < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap_interval needs rounds >= 1 and 0 < confidence < 1, got {rounds}, {confidence}")
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, num_samples, num_samples)) for _ in range(rounds)]
    low, high = percentile_interval(np.asarray(values, dtype=float), confidence)
    return {"value": float(statistic(np.arange(num_samples))), "low": low, "high": high, "rounds": float(rounds),
            "confidence": confidence}
