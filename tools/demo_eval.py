"""The demo's evaluation: per-clip test scores of a run, per-class AP, label-prior baseline, bootstrap.

``af-evaluate`` gives the official aggregate numbers; this module keeps the per-clip scores so the demo
can also report AP per class, the label-prior baseline (every clip scored with the training-set class
frequencies: AP of a class is then its prevalence in the split) and a paired bootstrap of the
difference between two models. Its mAP is checked against ``af-evaluate``'s by ``tools/demo.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from af_train.metrics import average_precision, classification_metrics


def multi_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[N, C] multi-hot (kept) or [N] class indices (expanded) -> bool [N, C]."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        if labels.shape[1] != num_classes:
            raise ValueError(f"labels have {labels.shape[1]} classes, expected {num_classes}")
        return labels.astype(bool)
    out = np.zeros((labels.size, num_classes), dtype=bool)
    out[np.arange(labels.size), labels.astype(np.int64)] = True
    return out


def per_class_ap(scores: np.ndarray, targets: np.ndarray) -> list[float]:
    """AP of every class (NaN for a class without a positive)."""
    return [average_precision(targets[:, c], scores[:, c]) for c in range(scores.shape[1])]


def label_prior_scores(train_targets: np.ndarray, num_clips: int) -> np.ndarray:
    """Every clip gets the training-set frequency of each class: the baseline that ignores the audio."""
    prior = train_targets.astype(np.float64).mean(axis=0)
    return np.tile(prior, (num_clips, 1))


def paired_bootstrap(scores_a: np.ndarray, scores_b: np.ndarray, targets: np.ndarray, rounds: int = 1000,
                     seed: int = 0) -> dict[str, float]:
    """mAP(b) − mAP(a) on resampled clips (the same resample for both): mean and 95 % interval."""
    if not (scores_a.shape == scores_b.shape == targets.shape):
        raise ValueError(f"shapes differ: {scores_a.shape}, {scores_b.shape}, {targets.shape}")
    rng = np.random.default_rng(seed)
    n = targets.shape[0]
    diffs = []
    for _ in range(rounds):
        pick = rng.integers(0, n, n)
        a = np.nanmean(per_class_ap(scores_a[pick], targets[pick]) or [np.nan])
        b = np.nanmean(per_class_ap(scores_b[pick], targets[pick]) or [np.nan])
        diffs.append(b - a)
    diffs_arr = np.asarray(diffs)
    full = float(np.nanmean(per_class_ap(scores_b, targets)) - np.nanmean(per_class_ap(scores_a, targets)))
    return {"mean": full, "low": float(np.nanpercentile(diffs_arr, 2.5)),
            "high": float(np.nanpercentile(diffs_arr, 97.5)), "rounds": float(rounds)}


# --------------------------------------------------------------------------------------------------
# Scoring a run (needs torch and the af_train stack)
# --------------------------------------------------------------------------------------------------


def _weights(checkpoint: Path) -> dict[str, Any]:
    if checkpoint.is_dir():
        from af_train.checkpoint import consolidated_state

        return consolidated_state(checkpoint)
    from af_train.model.checkpoint import read_checkpoint

    return read_checkpoint(checkpoint)["state_dict"]


def score_run(run_dir: str | Path, checkpoint: str | Path, split: str = "test", batch_size: int = 32,
              ) -> dict[str, Any]:
    """Scores of ``checkpoint`` (a DeepSpeed checkpoint dir or module weights) on ``split``, one row per clip.

    Returns ids (sorted), scores [N, C] float64, targets bool [N, C], class names, train_targets
    bool [M, C] (for the label prior) and the number of clips.
    """
    import torch

    from af_train.data import build_dataloader, load_manifest
    from af_train.data.mixing import first_train_source
    from af_train.evaluate import evaluation_module, evaluation_recipe

    run_dir, checkpoint = Path(run_dir), Path(checkpoint)
    recipe = evaluation_recipe(run_dir)  # as af-evaluate sees the run (FT2 through its trainable row)
    manifest = load_manifest(first_train_source(recipe.data))
    module = evaluation_module(recipe, manifest, _weights(checkpoint), str(checkpoint))
    module.eval()
    cache = str(run_dir / "cache_demo_eval")
    seen: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    loader = build_dataloader(recipe.data, split, batch_size, mask=False, seed=recipe.train.seed, local_cache=cache)
    with torch.no_grad():
        for batch in loader:
            out = module(batch)
            scores = out["scores"].float().numpy()
            labels = multi_hot(batch["labels"].numpy(), manifest.num_classes)
            for i, clip in enumerate(batch["ids"]):
                seen.setdefault(clip, (scores[i].astype(np.float64), labels[i]))
    # batch 1: the training loader drops incomplete batches, and the prior must count every clip
    train_loader = build_dataloader(recipe.data, "train", 1, mask=False, seed=recipe.train.seed, local_cache=cache)
    train_seen: dict[str, np.ndarray] = {}
    for batch in train_loader:
        labels = multi_hot(batch["labels"].numpy(), manifest.num_classes)
        for i, clip in enumerate(batch["ids"]):
            train_seen.setdefault(clip, labels[i])
    order = sorted(seen)
    return {
        "ids": order,
        "scores": np.stack([seen[c][0] for c in order]),
        "targets": np.stack([seen[c][1] for c in order]),
        "classes": list(manifest.labels),
        "multi_label": manifest.multi_label,
        "train_targets": np.stack([train_seen[c] for c in sorted(train_seen)]),
    }


def summarize(scored: dict[str, Any], split: str, weights_label: str) -> dict[str, Any]:
    """The ``per_class_ap.json`` payload: per-class AP, label-prior AP, aggregate metrics of both."""
    scores, targets = scored["scores"], scored["targets"]
    prior = label_prior_scores(scored["train_targets"], scores.shape[0])
    labels_for_metrics = targets if scored["multi_label"] else targets.argmax(axis=1)
    model_metrics = classification_metrics(scores, labels_for_metrics)
    prior_metrics = classification_metrics(prior, labels_for_metrics)
    return {
        "split": split,
        "weights_label": weights_label,
        "num_clips": int(scores.shape[0]),
        "classes": scored["classes"],
        "ap": _nan_to_none(per_class_ap(scores, targets)),
        "prior_ap": _nan_to_none(per_class_ap(prior, targets)),
        "positives": [int(v) for v in targets.sum(axis=0)],
        "mAP": model_metrics["mAP"],
        "prior_mAP": prior_metrics["mAP"],
        "metrics": model_metrics,
        "prior_metrics": prior_metrics,
    }


def _nan_to_none(values: list[float]) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def save_scores(path: Path, scored: dict[str, Any]) -> None:
    np.savez(path, ids=np.asarray(scored["ids"]), scores=scored["scores"], targets=scored["targets"])


def load_scores(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {"ids": data["ids"].tolist(), "scores": data["scores"], "targets": data["targets"]}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n", encoding="utf-8")
