"""The Trainer's checkpoint component: where to resume from, whether it fits this run, load, save,
the best checkpoint, consolidated weights.

``CheckpointManager`` writes and reads every file of a checkpoint (layout in
``af_train.checkpoint.files``): DeepSpeed's state through the engine, and per rank its RNG state, its
data-loader position and, in rank 0's file, the state of the weight average (``train.ema_decay``),
which the Trainer hands over as a plain stateful object (``state_dict`` / ``load_state_dict``). Its
collective methods are called on every rank.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from af_train.checkpoint.files import (
    BEST,
    BEST_RECORD,
    EMA_KEY,
    LATEST,
    MARKER,
    META,
    UNIVERSAL_SUFFIX,
    consolidated_state,
    convert_to_universal,
    describe_files,
    load_rank_state,
    prune,
    rank_file,
    read_best,
    read_meta,
    resolve_resume,
    tag_for,
)
from af_train.checkpoint.state import Progress, seed_everything
from af_train.distributed import barrier, broadcast_from_rank0, gather_objects, result_or_exception
from af_train.files import atomic_open, atomic_write
from af_train.model.checkpoint import SAFETENSORS_SUFFIX, CheckpointError, save_module_weights
from af_train.shards import LabelsMismatch, check_same_labels, labels_hash
from af_train.tokenizers.base import TokenizerError, check_same_tokenizer

log = logging.getLogger(__name__)


@dataclass
class ResumePoint:
    """A checkpoint this run resumes from, and how (decided before DeepSpeed is configured)."""

    path: Path
    meta: dict[str, Any]
    universal: bool  # convert through DeepSpeed's universal format (another world size, ZeRO >= 1)
    keep_global_batch: int | None  # the saved global batch, kept when the world size changed


class CheckpointManager:
    """Resume and save for one rank of a run; keeps the last ``train.keep_last`` checkpoints plus the best
    by ``train.best_metric`` (see the module docstring)."""

    def __init__(self, recipe: Any, run_dir: Path, rank: int, world_size: int):
        cfg = recipe.train
        self.recipe, self.rank, self.world_size = recipe, rank, world_size
        self.root = run_dir / "checkpoints"
        self.keep_last, self.best_mode = cfg.keep_last, cfg.best_mode
        self.last_saved_step: int | None = None
        self.tokenizer: dict[str, Any] | None = None  # the training shards' tokenizer, recorded in every meta.json
        self.labels: list[str] | None = None  # the run's ordered class list, recorded in every meta.json

    def path_for(self, step: int) -> Path:
        """This run's checkpoint directory of ``step``."""
        return self.root / tag_for(step)

    def set_tokenizer(self, identity: dict[str, Any], point: ResumePoint | None) -> None:
        """Record the data's tokenizer identity in the checkpoints; a checkpoint to resume from that was
        trained on another tokenizer's codes is refused (both named)."""
        self.tokenizer = dict(identity) if identity else None
        if point is not None:
            try:
                check_same_tokenizer(point.meta.get("tokenizer"), self.tokenizer, f"checkpoint {point.path}",
                                     "the training data (data.train's manifest)")
            except TokenizerError as exc:
                raise CheckpointError(str(exc)) from None

    def set_labels(self, labels: list[str], point: ResumePoint | None) -> None:
        """Record the run's class list in the checkpoints; a checkpoint to resume from whose recorded
        list differs (names or order) is refused, naming the first difference."""
        self.labels = list(labels)
        recorded = point.meta.get("labels") if point is not None else None
        if recorded is not None and self.labels and self.recipe.objective.mode != "pretrain":
            try:
                check_same_labels(recorded, self.labels, f"checkpoint {point.path}", "the training data "
                                  "(data.train's manifest)", "resume on shards prepared with the same --labels file")
            except LabelsMismatch as exc:
                raise CheckpointError(str(exc)) from None

    # -- resuming --------------------------------------------------------------------------------
    def resume_point(self, spec: str, run_dir: Path, hashes: bool = True) -> ResumePoint | None:
        """Collective: the checkpoint ``--resume spec`` names, verified by rank 0 (``resolve_resume``) and
        checked against this run."""
        found = result_or_exception(resolve_resume, spec, run_dir, hashes) if self.rank == 0 else None
        path = broadcast_from_rank0(found)
        if path is None:
            return None
        meta = read_meta(path)
        universal, keep_global = self.check_compatible(meta, path)
        return ResumePoint(path, meta, universal, keep_global)

    def check_compatible(self, meta: dict[str, Any], path: Path) -> tuple[bool, int | None]:
        """(convert through the universal format?, global batch to keep or None)."""
        cfg = self.recipe.train
        saved_stage, saved_world = meta["zero_stage"], meta["world_size"]
        if (saved_stage == 3) != (cfg.zero_stage == 3):
            raise CheckpointError(
                f"{path} was saved with ZeRO stage {saved_stage}; this run uses train.zero_stage={cfg.zero_stage}. "
                "Crossing between ZeRO-1/2 and ZeRO-3 is not supported by DeepSpeed's checkpoint conversion; "
                f"resume with train.zero_stage={saved_stage}, or start a new run from consolidated weights "
                "(objective.init_checkpoint=<run>/final/model.pt)"
            )
        if (saved_stage == 0) != (cfg.zero_stage == 0):
            raise CheckpointError(
                f"{path} was saved with ZeRO stage {saved_stage}; this run uses train.zero_stage={cfg.zero_stage}. "
                f"Resume with train.zero_stage={saved_stage}"
            )
        if meta.get("recipe_hash") != self.recipe.hash() and self.rank == 0:
            changed = changed_keys(meta.get("recipe", {}), self.recipe.to_dict())
            log.warning("resuming with a different recipe than %s was saved with; changed: %s", path,
                        ", ".join(changed) or "(unknown)")
        if saved_world == self.world_size:
            return False, None
        if saved_stage == 0:  # ZeRO-0 state is not partitioned: it loads at any world size as it is
            log.info("checkpoint %s was saved by %d ranks, resuming on %d: ZeRO-0 state is not partitioned, loading "
                     "it directly, keeping the global batch %d", path, saved_world, self.world_size,
                     meta["global_batch"])
            return False, meta["global_batch"]
        log.info("checkpoint %s was saved by %d ranks, resuming on %d: converting through DeepSpeed's universal "
                 "checkpoint, keeping the global batch %d", path, saved_world, self.world_size, meta["global_batch"])
        return True, meta["global_batch"]

    def load(self, point: ResumePoint, engine: Any, train_loader: Any,
             ema: Any | None = None) -> tuple[Progress, dict[str, Any] | None]:
        """Collective: DeepSpeed state, loader position, counters and weight average (``ema``) of ``point``.

        Returns the progress and the RNG state to restore once the first batch is drawn (None when the
        world size changed: each rank is then reseeded from the step). A checkpoint without a weight
        average restarts ``ema`` from the resumed weights, logged."""
        meta = point.meta
        load_path = convert_to_universal(point.path, self.rank, self.root) if point.universal else point.path
        failure = None
        try:
            loaded, _ = engine.load_checkpoint(str(load_path.parent), tag=load_path.name, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
            if loaded is None:
                raise CheckpointError(f"DeepSpeed could not load {load_path}")
            saved_world = meta["world_size"]
            state = load_rank_state(load_path, self.rank % saved_world)
            if state.get("loader") is not None:
                train_loader.load_state_dict(state["loader"])
        except Exception as exc:  # noqa: BLE001 - reported by every rank below
            failure = f"{type(exc).__name__}: {exc}"
        self._all_loaded(failure, load_path)
        pending_rng = None
        if saved_world == self.world_size:
            # Restored after the first batch is drawn: starting a DataLoader iterator draws a seed from
            # the global RNG, which the uninterrupted run did at its start, not at this step.
            pending_rng = state["rng"]
        else:
            seed_everything(self.recipe.train.seed + 1000 * self.rank + 1 + meta["step"])
        progress = Progress(**meta["progress"])
        if point.path.parent.resolve() == self.root.resolve():
            self.last_saved_step = progress.step  # (a checkpoint of another run is not ours to reuse)
        log.info("resumed from %s at step %d (%d samples, epoch %d) on all %d ranks", point.path, progress.step,
                 progress.samples, progress.epoch, self.world_size)
        if ema is not None:  # the same on every rank: stored once, in rank 0's file (any world size resumes)
            average = load_rank_state(point.path, 0).get(EMA_KEY)
            if average is None:
                log.warning("train.ema_decay is set but %s holds no EMA: the average starts from the resumed "
                            "weights", point.path)
            else:
                ema.load_state_dict(average)
        return progress, pending_rng

    def _all_loaded(self, failure: str | None, path: Path) -> None:
        """Collective: raise on every rank when any rank failed to load ``path`` (naming the ranks)."""
        failures = gather_objects(failure) if self.world_size > 1 else [failure]
        failed = {rank: message for rank, message in enumerate(failures) if message is not None}
        if failed:
            shown = "; ".join(f"rank {rank}: {message}" for rank, message in failed.items())
            raise CheckpointError(f"resuming from {path} failed on {len(failed)} of {self.world_size} rank(s): {shown}")

    # -- saving ----------------------------------------------------------------------------------
    def save(self, engine: Any, progress: Progress, plan: Any, rng: dict[str, Any], train_loader: Any,
             ema: Any | None = None) -> Path:
        """Collective: a complete checkpoint of ``progress.step``: DeepSpeed's state, this rank's ``rng``
        and loader position, the weight average ``ema`` (rank 0), then the meta and the marker.
        Returns the checkpoint directory."""
        cfg, step = self.recipe.train, progress.step
        meta = {
            "step": step, "world_size": self.world_size, "zero_stage": cfg.zero_stage,
            "precision": cfg.precision, "global_batch": plan.global_batch,
            "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum,
            "progress": progress.to_dict(),
            "recipe": self.recipe.to_dict(), "recipe_hash": self.recipe.hash(),
            "allow_test_selection": cfg.allow_test_selection,
            "tokenizer": self.tokenizer,
            "labels": self.labels, "labels_hash": labels_hash(self.labels) if self.labels is not None else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        rank_state = {"rng": rng, "loader": train_loader.state_dict()}
        if ema is not None and self.rank == 0:
            rank_state[EMA_KEY] = ema.state_dict()
        tag = tag_for(step)
        path = self.root / tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # an interrupted save of this step, or a checkpoint of an abandoned timeline
                shutil.rmtree(path)
            shutil.rmtree(self.root / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)
        barrier()
        started = time.time()
        engine.save_checkpoint(str(self.root), tag=tag, client_state={"af_train": {"step": step}}, save_latest=False)
        own_file = rank_file(path, self.rank)
        own_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(own_file) as f:
            torch.save(rank_state, f)
        barrier()  # every rank's files are written before they are described and the marker is set
        meta["files"] = describe_files(path, self.rank, self.world_size)
        if self.rank == 0:
            atomic_write(path / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")
            atomic_write(path / MARKER, f"complete {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            atomic_write(self.root / LATEST, tag + "\n")
            prune(self.root, self.keep_last)
            log.info("saved checkpoint %s in %.1f s", path, time.time() - started)
        barrier()
        self.last_saved_step = step
        return path

    # -- the best checkpoint ---------------------------------------------------------------------
    def best(self) -> tuple[str, float] | None:
        """(tag, value) of the checkpoint recorded as the best, or None."""
        return read_best(self.root)

    def is_better(self, value: float) -> bool:
        current = self.best()
        if current is None or not np.isfinite(current[1]):
            return bool(np.isfinite(value))
        return value > current[1] if self.best_mode == "max" else value < current[1]

    def mark_best(self, step: int, metric: str, value: float) -> None:
        """Rank 0: record the checkpoint of ``step`` as the best by ``metric``."""
        if self.rank != 0:
            return
        payload = {"tag": tag_for(step), "metric": metric, "value": value, "mode": self.best_mode}
        atomic_write(self.root / BEST, json.dumps(payload) + "\n")
        prune(self.root, self.keep_last)

    # -- consolidated weights --------------------------------------------------------------------
    def save_weights(self, module: torch.nn.Module, out: Path, checkpoint_dir: Path, manifest: Any,
                     formats: tuple[str, ...] = (".pt", SAFETENSORS_SUFFIX)) -> None:
        """Collective: consolidated fp32 module weights (``save_module_weights``) from a checkpoint, as
        ``out`` with each suffix of ``formats`` (``model.pt`` and ``model.safetensors``, which inference
        reads without unpickling)."""
        if self.rank == 0:
            state = self.consolidated_weights(module, checkpoint_dir)
            for suffix in formats:
                target = out.with_suffix(suffix)
                save_module_weights(module, target, self.recipe.to_dict(), manifest.num_classes,
                                    manifest.multi_label, state_dict=state, tokenizer=manifest.tokenizer,
                                    labels=list(manifest.labels))
                log.info("wrote consolidated weights %s", target)
        barrier()

    def save_best_weights(self, module: torch.nn.Module, out_dir: Path, manifest: Any,
                          copy_beside: tuple[str, ...] = ()) -> None:
        """Collective: the checkpoint selected on validation as ``out_dir/model.safetensors``, with a copy
        of the ``best`` record (which checkpoint, by what) and of the checkpoint's files ``copy_beside``."""
        best = self.best() if self.rank == 0 else None
        best = broadcast_from_rank0(best if best is not None and (self.root / best[0]).is_dir() else None)
        if best is None:  # (rank 0 decides: other nodes may not see the checkpoints directory)
            return
        self.save_weights(module, out_dir / "model.safetensors", self.root / best[0], manifest, (SAFETENSORS_SUFFIX,))
        if self.rank == 0:
            for name in copy_beside:
                if (self.root / best[0] / name).is_file():
                    atomic_write(out_dir / name, (self.root / best[0] / name).read_bytes())
            atomic_write(out_dir / BEST_RECORD, (self.root / BEST).read_text(encoding="utf-8"))
        barrier()

    def consolidated_weights(self, module: torch.nn.Module, checkpoint_dir: Path) -> dict[str, torch.Tensor]:
        """fp32 module weights of one of this run's checkpoints, frozen parameters included.

        DeepSpeed leaves frozen parameters out of ZeRO-1 checkpoints (it saves them from stage 2 on):
        take them from the live ``module``, where they are whole below stage 3 and never change."""
        state = consolidated_state(checkpoint_dir, own_run=True)
        if self.recipe.train.zero_stage >= 3:
            return state
        frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
        missing = frozen - set(state)
        if not missing:
            return state
        live = module.state_dict()
        return {**state, **{name: live[name].detach().float().cpu() for name in missing}}


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every (dotted) key whose value differs between two nested dicts."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changed
