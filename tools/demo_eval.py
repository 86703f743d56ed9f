"""The demo's evaluation: per-clip test scores of a run, per-class AP, baselines, bootstrap.

``af-evaluate`` gives the official aggregate numbers; this module keeps the per-clip scores so the demo
can also report AP per class, two baselines and a paired bootstrap of the difference between two
models. Its mAP is checked against ``af-evaluate``'s by ``tools/demo.py``. The baselines (label prior,
bag of codes) and the bootstrap are the package's (``af_train.baselines``, ``af_train.metrics``), which
``af-probe`` reports too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script (the demo's baselines stage): make af_train importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from af_train.baselines import fit_bag_of_codes, label_prior_scores, multi_hot_lists  # noqa: E402
from af_train.metrics import average_precision, bootstrap_interval, classification_metrics  # noqa: E402


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


def read_split_codes(directory: str | Path) -> tuple[list[str], list[np.ndarray], list[list[int]], int]:
    """Every clip of a local shard directory: ids, codes [rows, valid frames], label indices, codebook size."""
    from af_train.data.clips import read_clips

    clips = read_clips(directory)
    return clips.ids, clips.codes, clips.labels, clips.manifest.codec.codebook_size


def bag_of_codes_scores(train_dir: str | Path, eval_dir: str | Path, num_classes: int) -> dict[str, Any]:
    """The bag-of-codes baseline fitted on ``train_dir``'s clips, scoring ``eval_dir``'s (shard directories).

    Returns ids (sorted), scores [N, C], targets bool [N, C] and whether the data is single-label.
    """
    _, train_codes, train_labels, codebook_size = read_split_codes(train_dir)
    ids, eval_codes, eval_labels, _ = read_split_codes(eval_dir)
    scores, single = fit_bag_of_codes(train_codes, train_labels, eval_codes, codebook_size, num_classes)
    order = np.argsort(ids, kind="stable")
    return {"ids": [ids[i] for i in order], "scores": scores[order],
            "targets": multi_hot_lists(eval_labels, num_classes)[order], "single_label": single}


def baseline_metrics(scored: dict[str, Any]) -> dict[str, float]:
    """classification_metrics of a baseline's scores (accuracy too for single-label data)."""
    targets = scored["targets"]
    return classification_metrics(scored["scores"], targets.argmax(1) if scored["single_label"] else targets)


def test_baselines(shards: str | Path) -> dict[str, Any]:
    """Label prior and bag of codes on ``shards/test``, both fitted on ``shards/train``: metrics and chance."""
    from af_train.data.dataset import load_manifest

    shards = Path(shards)
    num_classes = load_manifest(shards / "train").num_classes
    bag = bag_of_codes_scores(shards / "train", shards / "test", num_classes)
    _, _, train_labels, _ = read_split_codes(shards / "train")
    prior = dict(bag, scores=label_prior_scores(multi_hot_lists(train_labels, num_classes), len(bag["ids"])))
    return {"bag_of_codes": baseline_metrics(bag), "label_prior": baseline_metrics(prior),
            "chance_accuracy": 1.0 / num_classes if bag["single_label"] else None, "num_test": len(bag["ids"])}


def paired_bootstrap(scores_a: np.ndarray, scores_b: np.ndarray, targets: np.ndarray, rounds: int = 1000,
                     seed: int = 0) -> dict[str, float]:
    """mAP(b) − mAP(a) on resampled clips (the same resample for both): mean and 95 % interval."""
    if not (scores_a.shape == scores_b.shape == targets.shape):
        raise ValueError(f"shapes differ: {scores_a.shape}, {scores_b.shape}, {targets.shape}")

    def difference(pick: np.ndarray) -> float:
        a = np.nanmean(per_class_ap(scores_a[pick], targets[pick]) or [np.nan])
        b = np.nanmean(per_class_ap(scores_b[pick], targets[pick]) or [np.nan])
        return float(b - a)

    interval = bootstrap_interval(difference, targets.shape[0], rounds=rounds, seed=seed)
    return {"mean": interval["value"], "low": interval["low"], "high": interval["high"], "rounds": interval["rounds"]}


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

    from af_train.data.dataset import load_manifest
    from af_train.data.loader import build_dataloader
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


def main(argv: list[str] | None = None) -> int:
    """``python3 tools/demo_eval.py SHARDS --out FILE``: the test-split baselines of a shard directory."""
    parser = argparse.ArgumentParser(prog="demo_eval.py", description="Label-prior and bag-of-codes baselines on "
                                     "SHARDS/test, fitted on SHARDS/train (written as JSON).")
    parser.add_argument("shards", help="directory with train/ and test/ shard folders")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    payload = test_baselines(args.shards)
    write_json(Path(args.out), payload)
    bag, prior = payload["bag_of_codes"], payload["label_prior"]
    accuracy = "n/a" if bag.get("accuracy") is None else f"{bag['accuracy']:.3f}"
    chance = "" if payload["chance_accuracy"] is None else f"; chance accuracy {payload['chance_accuracy']:.3f}"
    print(f"baselines: bag of codes test accuracy {accuracy}, mAP {bag['mAP']:.3f}; label prior mAP "
          f"{prior['mAP']:.3f}{chance} ({payload['num_test']} test clips) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
