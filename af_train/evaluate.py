"""Evaluation: scores of a split gathered from every rank, deduplicated by clip id, then metrics.

Used by the engine (periodic validation, test at the end) and as a CLI on a finished run::

    python -m af_train.evaluate RUN_DIR [--split test] [--weights RUN_DIR/final/model.pt | --checkpoint DIR]

The CLI runs in one process (no launcher): it rebuilds the training module from the run's
``config.yaml``, loads consolidated weights (``final/model.safetensors`` or ``model.pt``) or a DeepSpeed
checkpoint (consolidated on the fly, without unpickling: ``af_train.checkpoint.consolidated_state``), and
writes the metrics as JSON. The weights' own class list must be the manifests' (else refused).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from af_train.distributed import barrier, broadcast_from_rank0, gather_objects
from af_train.files import atomic_write, output_problem
from af_train.metrics import classification_metrics

if TYPE_CHECKING:
    from af_train.checkpoint.manager import CheckpointManager
    from af_train.config import Recipe
    from af_train.shards import Manifest

log = logging.getLogger(__name__)

THRESHOLDS_NAME = "af_thresholds.json"  # per-class thresholds chosen on val, beside the weights they belong to


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_module(module: torch.nn.Module, loader: Any, device: torch.device, split: str,
                    scores_out: dict[str, Any] | None = None) -> dict[str, float]:
    """Collective when distributed: every rank runs its share of ``loader``; all ranks get the metrics.

    Returns ``{f"{split}/{name}": value}``: the mean loss and logged terms (weighted by batch size),
    and for modules that return ``scores``: mAP, AUC, d′ (and top-1 accuracy for single-label data)
    over the unique clips. ``scores_out`` receives those clips' ``ids``, ``scores`` [N, C] and ``labels``.
    """
    was_training = module.training
    module.eval()
    started = time.time()
    ids: list[str] = []
    scores: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    sums: dict[str, float] = {}
    count = 0
    try:
        for batch in loader:
            batch = move_batch(batch, device)
            out = module(batch)
            size = len(batch["ids"])
            count += size
            terms = {"loss": out["loss"], **out.get("logs", {})}
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value) * size
            if "scores" in out:
                ids.extend(batch["ids"])
                scores.append(out["scores"].float().cpu().numpy())
                labels.append(batch["labels"].cpu().numpy())
    finally:
        module.train(was_training)
    parts = gather_objects({"ids": ids, "scores": scores, "labels": labels, "sums": sums, "count": count})
    total = sum(p["count"] for p in parts)
    result: dict[str, float] = {}
    for name in parts[0]["sums"]:
        result[f"{split}/{name}"] = sum(p["sums"].get(name, 0.0) for p in parts) / max(total, 1)
    if any(p["scores"] for p in parts):
        # streaming repeats a few clips so that every rank gets as many: count each clip once
        seen: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for p in parts:
            all_scores = np.concatenate(p["scores"]) if p["scores"] else np.zeros((0, 0))
            all_labels = np.concatenate(p["labels"]) if p["labels"] else np.zeros((0,))
            for i, clip in enumerate(p["ids"]):
                seen.setdefault(clip, (all_scores[i], all_labels[i]))
        order = sorted(seen)
        score_matrix = np.stack([seen[c][0] for c in order])
        label_array = np.stack([seen[c][1] for c in order])
        metrics = classification_metrics(score_matrix, label_array)
        if scores_out is not None:
            scores_out.update(ids=order, scores=score_matrix, labels=label_array)
        result.update({f"{split}/{k}": v for k, v in metrics.items()})
    result[f"{split}/eval_seconds"] = time.time() - started
    return result


# --------------------------------------------------------------------------------------------------
# The Trainer's evaluation component: periodic validation, best-checkpoint selection, test scoring
# --------------------------------------------------------------------------------------------------


class Evaluator:
    """Evaluates a training run's module on its val/test splits (every method is collective).

    Loaders are built on first use and reused. ``train.best_metric`` selects checkpoints: a better
    value saves the step (through ``save``) and records it as the best; at the end the test split
    scores the checkpoint selected on validation (the last one without a selection metric).
    """

    def __init__(self, recipe: Recipe, run_dir: Path, device: torch.device, rank: int,
                 checkpoints: CheckpointManager):
        from af_train.config import RecipeError
        from af_train.data.loader import build_dataloader

        cfg = recipe.train
        self.recipe, self.device, self.rank = recipe, device, rank
        self.checkpoints = checkpoints
        batch, mask, cache = cfg.eval_batch_size or cfg.micro_batch_size, recipe.objective.mode == "pretrain", \
            str(run_dir / "cache")
        self._builders = {
            split: (lambda s=split: build_dataloader(recipe.data, s, batch, mask=mask, seed=cfg.seed,
                                                     local_cache=cache))
            for split in ("val", "test")
            if getattr(recipe.data, split) is not None or (recipe.data.remote and split == "val")
        }
        self.loaders: dict[str, Any] = dict.fromkeys(self._builders)
        self.last_scores: dict[str, dict[str, Any]] = {}  # split -> ids, scores, labels of its last evaluation
        if cfg.eval_every and "val" not in self.loaders:
            raise RecipeError(f"train.eval_every={cfg.eval_every} needs data.val (the validation shards)")

    def has(self, split: str) -> bool:
        return split in self.loaders

    def evaluate(self, split: str, module: torch.nn.Module) -> dict[str, float]:
        """Metrics of ``module`` on ``split`` (see ``evaluate_module``)."""
        if self.loaders[split] is None:
            self.loaders[split] = self._builders[split]()
        self.last_scores[split] = {}
        return evaluate_module(module, self.loaders[split], self.device, split, self.last_scores[split])

    def write_thresholds(self, directory: Path, step: int) -> None:
        """Rank 0: per-class F1-optimal thresholds on the last validation scores, written beside the weights
        they were chosen for (``directory/af_thresholds.json``; multi-label runs only). af-predict's
        ``--threshold auto`` reads them."""
        kept = self.last_scores.get("val") or {}
        if self.rank != 0 or "scores" not in kept or np.asarray(kept["labels"]).ndim != 2:
            return
        from af_train.files import atomic_write
        from af_train.metrics import f1_optimal_thresholds

        probabilities = 1.0 / (1.0 + np.exp(-np.asarray(kept["scores"], dtype=np.float64)))
        thresholds, f1 = f1_optimal_thresholds(probabilities, kept["labels"])
        loader = self.loaders.get("val")
        manifest = getattr(getattr(loader, "dataset", None), "manifest", None)
        payload = {
            "split": "val", "step": step, "clips": len(kept["ids"]), "rule": "sigmoid(logit) >= threshold",
            "labels": list(manifest.labels) if manifest is not None else None,
            "thresholds": [None if np.isnan(t) else float(t) for t in thresholds],  # None: no positive in val
            "f1": [None if np.isnan(v) else float(v) for v in f1],
        }
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / THRESHOLDS_NAME, json.dumps(payload, indent=2) + "\n")

    def evaluate_and_select(self, split: str, step: int, module: torch.nn.Module, progress: Any,
                            save: Any, probe: dict[str, float] | None = None) -> dict[str, float]:
        """Evaluate (logged as text; the caller records the metrics), and when ``train.best_metric`` on
        this split improved: ``save()`` the step (unless already saved) and record it as the best in
        ``progress`` and the checkpoints. ``probe``: this step's ``train.probe`` metrics (measured on the
        probe data set's val split), which a ``probe/`` best metric selects on with the val split."""
        from af_train.config import RecipeError

        metrics = self.evaluate(split, module)
        if self.rank == 0:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if not k.endswith("eval_seconds"))
            log.info("step %d %s", step, shown)
        best = self.recipe.train.best_metric
        if best and (best.startswith(f"{split}/") or (split == "val" and best.startswith("probe/"))):
            measured = {**metrics, **(probe or {})}
            if best not in measured:
                raise RecipeError(f"train.best_metric={best!r} is not measured; {split} metrics are "
                                  f"{', '.join(sorted(measured))}")
            value = measured[best]
            checkpoints = self.checkpoints
            if broadcast_from_rank0(checkpoints.is_better(value) if self.rank == 0 else None):
                if checkpoints.last_saved_step != step:
                    save()
                progress.best = {"metric": best, "value": value, "step": step}
                checkpoints.mark_best(step, best, value)
                if split == "val":
                    self.write_thresholds(checkpoints.path_for(step), step)
                barrier()
        return metrics

    def score_test(self, last: Path, step: int, module: torch.nn.Module, manifest: Manifest, progress: Any,
                   save: Any) -> tuple[str, dict[str, float]]:
        """(tag, test metrics) at the end of a run: of the checkpoint selected on validation (see
        ``test_selected``), or with ``train.best_metric`` on the test split, of ``last``, selecting on it."""
        best = self.recipe.train.best_metric
        if best and best.startswith("test/"):
            return last.name, self.evaluate_and_select("test", step, module, progress, save)
        return self.test_selected(last, module, manifest)

    def test_selected(self, last: Path, module: torch.nn.Module, manifest: Manifest) -> tuple[str, dict[str, float]]:
        """Test metrics of the checkpoint selected on validation (``last`` without a selection).
        A selected checkpoint other than ``last`` is consolidated to fp32 and evaluated in a fresh
        module, so ``module`` (the engine's) stays untouched."""
        from af_train.model.checkpoint import check_and_load_state
        from af_train.objectives import build_training_module

        best = broadcast_from_rank0(self.checkpoints.best() if self.rank == 0 else None)
        if best is None or best[0] == last.name:
            return last.name, self.evaluate("test", module)
        tag = best[0]
        selected = self.checkpoints.root / tag
        state = self.checkpoints.consolidated_weights(module, selected)
        fresh = build_training_module(self.recipe, manifest.num_classes, manifest.multi_label, manifest.tokenizer)
        check_and_load_state(fresh, state, f"checkpoint '{selected}'")
        fresh.to(self.device)
        if self.rank == 0:
            log.info("test split: evaluating %s, selected on %s = %.4f", tag, self.recipe.train.best_metric, best[1])
        return tag, self.evaluate("test", fresh)


# --------------------------------------------------------------------------------------------------
# A finished run, as evaluation loads it (the CLI below, the demo's per-class scoring)
# --------------------------------------------------------------------------------------------------


class EvaluationError(ValueError):
    """A run or weights file that cannot be evaluated as asked; the message says why and what to give."""


def evaluation_recipe(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """The recipe of a fine-tuned run as evaluation uses it.

    Weights come from the trained file, not from the init checkpoints the recipe names. An FT2 run is
    scored through its trainable row and classifier only: its FT1 view, so the frozen row encoders'
    files are not needed.
    """
    from af_train.config import Recipe

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise EvaluationError(f"{config_path} does not exist: give the directory of a run made by af_train.train")
    recipe = Recipe.load(config_path, [*overrides, "objective.init_checkpoint=null"])
    if recipe.objective.mode == "pretrain":
        raise EvaluationError("evaluation computes classification metrics; this run is MLM pretraining")
    if recipe.objective.mode == "ft2":
        # scored as its classifier alone: the MPC options of the training loss do not apply
        recipe = Recipe.load(config_path, [*overrides, "objective.init_checkpoint=null", "objective.mode=ft1",
                                           "objective.mpc_drop_shared_label_negatives=false",
                                           f"data.code_rows=[{recipe.data.code_rows[0]}]"])
    return recipe


def evaluation_module(
    recipe: Recipe, manifest: Manifest, state: dict[str, torch.Tensor], source: str
) -> torch.nn.Module:
    """The module of ``evaluation_recipe`` with the trained weights loaded (an FT2 run's frozen row
    encoders are left out; shapes are checked and a mismatch names the tensor)."""
    from af_train.model.checkpoint import check_and_load_state
    from af_train.objectives import build_training_module

    module = build_training_module(recipe, manifest.num_classes, manifest.multi_label, manifest.tokenizer)
    kept = {k: v.float() for k, v in state.items() if not k.startswith("frozen_encoders.")}
    check_and_load_state(module, kept, f"'{source}'")
    return module


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _load_state(args: argparse.Namespace, run_dir: Path) -> tuple[dict[str, torch.Tensor], str, dict | None,
                                                                  list[str] | None]:
    """(weights, where they came from, the tokenizer identity and class list they were trained on or None).
    Read without unpickling: a checkpoint through ``consolidated_state`` (allow-list, recorded sizes and
    hashes checked first), weight files as safetensors or with ``weights_only=True``."""
    from af_train.checkpoint.files import CheckpointError, consolidated_state, read_meta
    from af_train.model.checkpoint import read_checkpoint

    try:
        if args.checkpoint:
            meta = read_meta(Path(args.checkpoint))
            return (consolidated_state(Path(args.checkpoint)), args.checkpoint, meta.get("tokenizer"),
                    meta.get("labels"))
        default = run_dir / "final" / "model.safetensors"
        weights = Path(args.weights) if args.weights else default if default.is_file() else default.with_suffix(".pt")
        payload = read_checkpoint(weights)
    except CheckpointError as exc:
        raise SystemExit(f"af-evaluate: error: {exc}") from None
    if "state_dict" not in payload or payload.get("format") != "af_train.module/1":
        raise SystemExit(f"{weights}: not module weights (af_train.module/1); give the run's final/model.pt")
    return payload["state_dict"], str(weights), payload.get("tokenizer"), payload.get("labels")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m af_train.evaluate", description="Evaluate a trained run on a split (one process)."
    )
    parser.add_argument("run_dir", help="run directory (holds config.yaml)")
    parser.add_argument("--split", default="test", choices=["val", "test", "train"])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--weights", help="module weights file (default: RUN_DIR/final/model.safetensors, else "
                       "model.pt)")
    group.add_argument("--checkpoint", help="a DeepSpeed checkpoint directory (RUN_DIR/checkpoints/step_...)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the metrics JSON here (default: RUN_DIR/eval_<split>.json, replaced "
                                      "on every run; another existing file only with --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out / --scores file")
    parser.add_argument("--scores", help="also write every clip's scores here (.npz: ids, scores [clips, classes] "
                                         "(logits), labels as the shards hold them, classes), e.g. for paired "
                                         "comparisons of runs on the same clips; replaced only with --overwrite")
    parser.add_argument("overrides", nargs="*", help="recipe overrides key.sub=value (e.g. data.test=/data/x)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from af_train.data.dataset import load_manifest
    from af_train.data.loader import build_dataloader
    from af_train.data.mixing import first_train_source
    from kernels.dispatch import backend_from_environment

    run_dir = Path(args.run_dir)
    own = run_dir / f"eval_{args.split}.json"  # af-evaluate's own file in the run directory
    out = Path(args.out) if args.out else own
    inputs = [p for p in (args.weights, run_dir / "config.yaml") if p]
    if problem := output_problem(out, overwrite=args.overwrite or out.absolute() == own.absolute(), inputs=inputs):
        raise SystemExit(f"af-evaluate: error: {problem}")  # before the evaluation, not after it
    if args.scores and (problem := output_problem(args.scores, option="--scores", overwrite=args.overwrite,
                                                  inputs=[*inputs, out])):
        raise SystemExit(f"af-evaluate: error: {problem}")
    try:
        kernels = backend_from_environment(os.environ)  # AF_KERNELS (debugging): read once, here
    except ValueError as exc:
        raise SystemExit(f"af-evaluate: error: {exc}") from None
    try:
        recipe = evaluation_recipe(run_dir, [*args.overrides, *([f"model.kernels={kernels}"] if kernels else [])])
        split_path = getattr(recipe.data, args.split)
        if split_path is None and recipe.data.remote is None:
            raise EvaluationError(f"the run's recipe has no data.{args.split}; pass data.{args.split}=PATH")
    except EvaluationError as exc:
        raise SystemExit(str(exc)) from None
    manifest = load_manifest(first_train_source(recipe.data) or split_path)
    state, source, trained_on, model_labels = _load_state(args, run_dir)
    module = evaluation_module(recipe, manifest, state, source)
    device = torch.device(args.device)
    module.to(device)
    loader = build_dataloader(recipe.data, args.split, args.batch_size, mask=False, seed=recipe.train.seed,
                              local_cache=str(run_dir / "cache"))
    from af_train.tokenizers import TokenizerError, check_same_tokenizer

    try:  # codes of another tokenizer would be scored as if they were these
        check_same_tokenizer(trained_on, loader.dataset.manifest.tokenizer, f"weights '{source}'",
                             f"data.{args.split}")
    except TokenizerError as exc:
        raise SystemExit(f"af-evaluate: error: {exc}") from None
    from af_train.shards import LabelsMismatch, check_same_labels

    try:  # class indices of another list would be scored as these classes
        for what, labels in ((f"the manifest of {first_train_source(recipe.data) or split_path}", manifest.labels),
                             (f"data.{args.split}", loader.dataset.manifest.labels)):
            if model_labels is not None:
                check_same_labels(model_labels, labels, f"weights '{source}'", what,
                                  "evaluate on shards prepared with the model's --labels file, in the same order")
            else:
                check_same_labels(manifest.labels, labels, "the training shards", what,
                                  "evaluate on shards prepared with the same --labels file")
    except LabelsMismatch as exc:
        raise SystemExit(f"af-evaluate: error: {exc}") from None
    per_clip: dict[str, Any] = {}
    metrics = evaluate_module(module, loader, device, args.split, per_clip if args.scores else None)
    metrics = {"weights": source, "split": args.split, **metrics}
    if args.scores:
        from af_train.files import atomic_open

        with atomic_open(Path(args.scores), "wb") as handle:
            np.savez(handle, ids=np.asarray(per_clip["ids"]), scores=per_clip["scores"], labels=per_clip["labels"],
                     classes=np.asarray(list(loader.dataset.manifest.labels)))
        log.info("wrote per-clip scores of %d clips to %s", len(per_clip["ids"]), args.scores)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
