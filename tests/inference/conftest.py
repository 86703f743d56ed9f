"""A tiny fine-tuned run the inference tests share: FT1 on the session's synthetic shards, trained in
this process as a 1-rank DeepSpeed job (a few seconds), with consolidated weights at every checkpoint."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from engine_helpers import single_process_rank  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread(single_torch_thread):
    # the codec's batch numerics depend on the thread count too: the shards were written with 1 thread
    yield


@pytest.fixture(scope="session")
def tiny_run(prepared_shards, tmp_path_factory) -> Path:
    from af_train.config import Recipe
    from af_train.engine import Trainer

    run_dir = tmp_path_factory.mktemp("inference") / "run"
    with single_process_rank():
        recipe = Recipe.load(REPO / "recipes" / "tiny_ft1.yaml", [
            f"data.train={prepared_shards / 'train'}", f"data.val={prepared_shards / 'val'}",
            f"data.test={prepared_shards / 'test'}", "data.max_length=80", "objective.init_checkpoint=null",
            f"train.run_dir={run_dir}", "train.max_steps=6", "train.eval_every=2", "train.save_every=2",
            "train.micro_batch_size=4", "train.log_every=2", "train.zero_stage=1", "train.keep_last=3",
            "train.save_weights_every_checkpoint=true", "optim.lr=3e-3",
        ])
        trainer = Trainer(recipe, resume="auto")
        trainer.fit()
        trainer.close()
    return run_dir


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
    from af_train.data import build_dataloader, load_manifest
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
