"""Helpers of the inference tests: the synthetic test files, multi-hot targets, and the logits that the
run's own evaluation path gives (what af-predict must reproduce)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch


def split_files(synthetic_audio: Path, split: str) -> tuple[list[Path], list[list[str]], list[str]]:
    """(paths, label names, ids) of one split of the synthetic set, sorted by id."""
    with open(synthetic_audio / "labels.csv", newline="") as f:
        rows = sorted((r for r in csv.DictReader(f) if r["split"] == split), key=lambda r: r["id"])
    return [synthetic_audio / r["path"] for r in rows], [r["labels"].split(";") for r in rows], [r["id"] for r in rows]


def multi_hot(names: list[list[str]], vocabulary: list[str]) -> np.ndarray:
    out = np.zeros((len(names), len(vocabulary)), dtype=bool)
    for i, labels in enumerate(names):
        for label in labels:
            out[i, vocabulary.index(label)] = True
    return out


def evaluation_logits(run_dir: Path, checkpoint: Path, shards: Path, split: str = "test") -> dict[str, np.ndarray]:
    """Clip id -> logits, as af-evaluate computes them on prepared shards (the training-time path)."""
    from af_train.checkpoint import consolidated_state
    from af_train.data.dataset import load_manifest
    from af_train.data.loader import build_dataloader
    from af_train.evaluate import evaluation_module, evaluation_recipe

    recipe = evaluation_recipe(run_dir, [f"data.{split}={shards}"])
    manifest = load_manifest(recipe.data.train)
    module = evaluation_module(recipe, manifest, consolidated_state(checkpoint), str(checkpoint)).eval()
    loader = build_dataloader(recipe.data, split, 4, mask=False, seed=0, local_cache=str(run_dir / "cache"))
    out: dict[str, np.ndarray] = {}
    try:
        with torch.no_grad():
            for batch in loader:
                inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                for clip, scores in zip(batch["ids"], module(inputs)["scores"]):
                    out[clip] = scores.numpy()
    finally:
        loader.dataset.close()
    return out
