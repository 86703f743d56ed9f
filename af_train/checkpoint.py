"""Checkpoints that are either complete or ignored, and finding the one to resume from.

Layout of ``<run_dir>/checkpoints``::

    step_00000100/                      one checkpoint (a DeepSpeed tag directory)
        mp_rank_00_model_states.pt ...  DeepSpeed's model / optimizer / scheduler state
        af_state/rank_00000.pt          ours, per rank: RNG states, data-loader position
        af_meta.json                    ours: step, samples, tokens, world size, ZeRO stage, recipe + hash,
                                        and the size and xxh64 of every other file (``files``)
        COMPLETE                        written last, after every rank finished writing
    step_00000100_universal/            DeepSpeed universal form, made when resuming at another world size
    latest                              tag of the newest complete checkpoint (moved only to complete ones)
    best                                tag and value of the best checkpoint by train.best_metric

A crash mid-save leaves a directory without ``COMPLETE``: it is never resumed from, ``latest`` still
names the previous checkpoint, and the next save of the same step replaces it.

Damage after a complete save (a truncated or altered file) is found by ``verify``: before resuming,
every file's size is checked against ``af_meta.json``, and its xxh64 unless hashes are skipped
(``--skip-checkpoint-hashes``). ``--resume auto`` then falls back to the newest intact checkpoint,
naming the damaged file; a damaged checkpoint named explicitly is refused with the same message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from af_train.distributed import barrier, broadcast_from_rank0, gather_objects, result_or_exception, world_size
from af_train.files import atomic_open, atomic_write, xxh64_file
from af_train.model.checkpoint import CheckpointError
from af_train.tokenizers.base import TokenizerError, check_same_tokenizer

__all__ = ["CheckpointError"]  # re-exported: one error for weight files and training checkpoints

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
META = "af_meta.json"
RANK_DIR = "af_state"
LATEST = "latest"
BEST = "best"
UNIVERSAL_SUFFIX = "_universal"
_TAG = re.compile(r"^step_(\d{8,})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int | None:
    match = _TAG.match(tag)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / META).is_file()


@dataclass
class Progress:
    """Counters that make a run resumable (saved in every checkpoint)."""

    step: int = 0  # optimizer steps attempted (applied + skipped)
    samples: int = 0  # samples consumed, all ranks
    tokens: int = 0  # real (non-pad) tokens consumed, all ranks and rows
    epoch: int = 0
    skipped_steps: int = 0  # steps whose update was skipped (non-finite loss/gradients, fp16 overflow)
    nonfinite_steps: int = 0  # of those, skipped for a non-finite loss or gradient (not fp16 scaling)
    consecutive_nonfinite: int = 0
    best: dict[str, Any] = field(default_factory=dict)

    def count_step(self, samples: int, tokens: int, applied: bool, nonfinite: bool) -> None:
        """Count one optimizer step (a skipped one too); a non-finite step is logged as a warning."""
        self.step += 1
        self.samples += samples
        self.tokens += tokens
        self.skipped_steps += not applied
        if nonfinite:
            self.nonfinite_steps += 1
            self.consecutive_nonfinite += 1
            log.warning("step %d skipped: non-finite loss or gradient norm (%d in a row, %d in total)",
                        self.step, self.consecutive_nonfinite, self.nonfinite_steps)
        elif applied:
            self.consecutive_nonfinite = 0


# --------------------------------------------------------------------------------------------------
# Per-rank RNG state
# --------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------------


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(step_of(p.name), p) for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None]
    return [p for _, p in sorted(found) if is_complete(p)]


def latest_complete(root: Path) -> Path | None:
    """What ``latest`` names if that is complete, else the newest complete checkpoint found."""
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if is_complete(candidate):
            return candidate
        log.warning("%s names '%s', which is not a complete checkpoint; scanning %s", pointer, candidate, root)
    found = complete_checkpoints(root)
    return found[-1] if found else None


def newest_intact(root: Path, hashes: bool = True) -> Path | None:
    """The newest complete checkpoint under ``root`` that passes ``verify`` (``latest`` first); each
    damaged one on the way is logged, naming the file. Raises when there are checkpoints but none is intact."""
    newest = latest_complete(root)
    if newest is None:
        return None
    candidates = [newest] + [p for p in reversed(complete_checkpoints(root)) if p != newest]
    problems = []
    for candidate in candidates:
        problem = verify(candidate, hashes)
        if problem is None:
            if problems:
                log.warning("resuming from %s, the newest intact checkpoint", candidate)
            return candidate
        log.warning("%s; falling back to the previous checkpoint", problem)
        problems.append(problem)
    raise CheckpointError(f"no intact checkpoint in {root}: " + "; ".join(problems) + ". Move the damaged "
                          "checkpoints away to start over, or give another train.run_dir")


def read_best(root: Path) -> tuple[str, float] | None:
    """(tag, metric value) of the checkpoint recorded as the best under ``root``, or None."""
    pointer = root / BEST
    if not pointer.is_file():
        return None
    data = json.loads(pointer.read_text(encoding="utf-8"))
    return data["tag"], float(data["value"])


def resolve_resume(spec: str, run_dir: Path, hashes: bool = True) -> Path | None:
    """The checkpoint directory to resume from for ``--resume spec`` (``auto`` | ``none`` | a path),
    verified (``verify``; ``hashes=False`` checks sizes only)."""
    root = run_dir / "checkpoints"
    if spec == "none":
        if complete_checkpoints(root):
            raise CheckpointError(
                f"--resume none, but {root} already holds checkpoints; resume with --resume auto, or give "
                "another train.run_dir for a fresh run"
            )
        return None
    if spec == "auto":
        return newest_intact(root, hashes)
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"--resume {spec}: no such file or directory")
    if is_complete(path):
        problem = verify(path, hashes)
        if problem is not None:
            raise CheckpointError(f"--resume {spec}: {problem}; resume from an earlier checkpoint")
        return path
    for candidate_root in (path, path / "checkpoints"):
        found = newest_intact(candidate_root, hashes) if candidate_root.is_dir() else None
        if found is not None:
            return found
    marker_hint = " (it has no COMPLETE marker: the save was interrupted)" if (path / META).exists() or any(
        path.glob("*model_states.pt")
    ) else ""
    raise CheckpointError(
        f"--resume {spec}: not a complete af_train checkpoint, checkpoints directory or run directory{marker_hint}"
    )


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / META).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{ckpt / META} cannot be read ({exc}); the checkpoint is damaged") from None


def _recorded_files(ckpt: Path) -> list[str]:
    """Files of a checkpoint that ``af_meta.json`` describes (everything but itself and the marker)."""
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name not in (META, MARKER))


def describe_files(ckpt: Path, rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """Collective: ``{relative path: {"size", "xxh64"}}`` of a checkpoint's files; the ranks share the hashing."""
    names = broadcast_from_rank0(_recorded_files(ckpt) if rank == 0 else None) if world_size > 1 \
        else _recorded_files(ckpt)
    mine = {}
    for name in names[rank::world_size]:
        with contextlib.suppress(OSError):  # (not visible here: rank 0 hashes it below)
            mine[name] = {"size": (ckpt / name).stat().st_size, "xxh64": xxh64_file(ckpt / name)}
    parts = gather_objects(mine) if world_size > 1 else [mine]
    described = {name: value for part in parts for name, value in part.items()}
    if rank == 0:
        for name in names:
            if name not in described:
                described[name] = {"size": (ckpt / name).stat().st_size, "xxh64": xxh64_file(ckpt / name)}
    return dict(sorted(described.items()))


def verify(ckpt: Path, hashes: bool = True) -> str | None:
    """None if every file recorded at save has its size (and xxh64 with ``hashes``), else a sentence
    naming the checkpoint and the first damaged file."""
    try:
        recorded = read_meta(ckpt).get("files")
    except CheckpointError as exc:
        return str(exc)
    if recorded is None:
        log.info("%s records no file sizes or hashes (saved by an earlier af_train); not verified", ckpt)
        return None
    for name, expected in recorded.items():
        path = ckpt / name
        if not path.is_file():
            return f"checkpoint {ckpt} is damaged: {path} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return (f"checkpoint {ckpt} is damaged: {path} has {size} bytes, {expected['size']} were recorded at "
                    "save (truncated or replaced)")
        if hashes and xxh64_file(path) != expected["xxh64"]:
            return (f"checkpoint {ckpt} is damaged: {path} does not match the xxh64 recorded at save (its contents "
                    "changed after the checkpoint was written)")
    return None


def consolidated_state(ckpt: Path, raw: bool = False) -> dict[str, torch.Tensor]:
    """fp32 module weights of a complete checkpoint, at any ZeRO stage (one process, CPU).

    A run with ``train.ema_decay`` evaluates its weight average: it replaces the trained weights here
    unless ``raw``. DeepSpeed leaves frozen parameters out of ZeRO-1 checkpoints; callers holding the
    live module complete them from it.
    """
    from af_train.ema import read_ema_weights

    if read_meta(ckpt)["zero_stage"] == 0:  # no partitions: the module states file holds every weight
        state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        state = {k: v.float() for k, v in state.items()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    average = None if raw else read_ema_weights(ckpt)
    return state if average is None else {**state, **average}


def load_rank_state(ckpt: Path, rank: int) -> dict[str, Any]:
    path = ckpt / RANK_DIR / f"rank_{rank:05d}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint was saved with fewer ranks or is damaged")
    # Our own file (RNG states hold numpy arrays and tuples), written by the same code.
    return torch.load(path, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves complete checkpoints with retention: the last ``keep_last`` plus the best."""

    def __init__(self, root: Path, rank: int, keep_last: int, best_mode: str = "max"):
        self.root = root
        self.rank = rank
        self.keep_last = keep_last
        self.best_mode = best_mode

    def save(self, engine: Any, step: int, meta: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the checkpoint directory."""
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
        rank_dir = path / RANK_DIR
        rank_dir.mkdir(parents=True, exist_ok=True)
        rank_file = rank_dir / f"rank_{self.rank:05d}.pt"
        with atomic_open(rank_file) as f:
            torch.save(rank_state, f)
        barrier()  # every rank's files are written before they are described and the marker is set
        meta = {**meta, "files": describe_files(path, self.rank, world_size())}
        if self.rank == 0:
            atomic_write(path / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")
            atomic_write(path / MARKER, f"complete {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            atomic_write(self.root / LATEST, tag + "\n")
            self.prune()
            log.info("saved checkpoint %s in %.1f s", path, time.time() - started)
        barrier()
        return path

    # -- best ------------------------------------------------------------------------------------
    def best(self) -> tuple[str, float] | None:
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
        self.prune()

    # -- retention -------------------------------------------------------------------------------
    def prune(self) -> None:
        """Rank 0: delete complete checkpoints beyond the last K (keeping the best) and stale partial ones."""
        complete = complete_checkpoints(self.root)
        keep = {p.name for p in complete[-self.keep_last:]}
        best = self.best()
        if best is not None:
            keep.add(best[0])
        newest = step_of(complete[-1].name) if complete else None
        for path in sorted(self.root.iterdir()):
            step = step_of(path.name.removesuffix(UNIVERSAL_SUFFIX))
            if step is None or not path.is_dir():
                continue
            base = path.name.removesuffix(UNIVERSAL_SUFFIX)
            if base in keep:
                continue
            partial_and_old = not is_complete(self.root / base) and newest is not None and step < newest
            if is_complete(self.root / base) or partial_and_old:
                shutil.rmtree(path, ignore_errors=True)
                log.info("removed checkpoint %s (train.keep_last=%d)", path, self.keep_last)


# --------------------------------------------------------------------------------------------------
# Universal checkpoints (resuming at another data-parallel world size)
# --------------------------------------------------------------------------------------------------


def convert_to_universal(ckpt: Path, rank: int, out_root: Path) -> Path:
    """Collective: rank 0 converts ``ckpt`` with DeepSpeed's ds_to_universal into ``out_root`` (once).

    ``out_root`` is the resuming run's checkpoints directory, so a checkpoint of another run is
    only read, never written to.
    """
    out = out_root / f"{ckpt.name}{UNIVERSAL_SUFFIX}"
    if rank == 0:
        out_root.mkdir(parents=True, exist_ok=True)
    done = out / MARKER
    if rank == 0 and not done.is_file():
        shutil.rmtree(out, ignore_errors=True)
        command = [
            sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
            "--input_folder", str(ckpt), "--output_folder", str(out), "--inject_missing_state",
            "--num_extract_workers", "1", "--num_merge_workers", "1",
        ]
        log.info("converting %s to DeepSpeed's universal format: %s", ckpt, " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise CheckpointError(
                f"converting {ckpt} to a universal checkpoint failed (exit {result.returncode}):\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
            )
        for name in (RANK_DIR, META):  # our state travels with it
            source = ckpt / name
            if source.is_dir():
                shutil.copytree(source, out / name)
            else:
                shutil.copy2(source, out / name)
        atomic_write(done, "complete\n")
    barrier()
    if not done.is_file():
        raise CheckpointError(f"universal conversion of {ckpt} did not complete (see rank 0's log)")
    return out


# --------------------------------------------------------------------------------------------------
# The Trainer's checkpoint component: where to resume from, whether it fits, load, save, weights
# --------------------------------------------------------------------------------------------------


@dataclass
class ResumePoint:
    """A checkpoint this run resumes from, and how (decided before DeepSpeed is configured)."""

    path: Path
    meta: dict[str, Any]
    universal: bool  # convert through DeepSpeed's universal format (another world size, ZeRO >= 1)
    keep_global_batch: int | None  # the saved global batch, kept when the world size changed


class Checkpointer:
    """Resume and save for one rank of a run (collective methods are called on every rank)."""

    def __init__(self, recipe: Any, run_dir: Path, rank: int, world_size: int):
        cfg = recipe.train
        self.recipe, self.rank, self.world_size = recipe, rank, world_size
        self.manager = CheckpointManager(run_dir / "checkpoints", rank, cfg.keep_last, cfg.best_mode)
        self.root = self.manager.root
        self.last_saved_step: int | None = None
        self.tokenizer: dict[str, Any] | None = None  # the training shards' tokenizer, recorded in every meta.json

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

    def load(self, point: ResumePoint, engine: Any, train_loader: Any) -> tuple[Progress, dict[str, Any] | None]:
        """Collective: DeepSpeed state, loader position and counters of ``point``.

        Returns the progress and the RNG state to restore once the first batch is drawn (None when the
        world size changed: each rank is then reseeded from the step)."""
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
        return progress, pending_rng

    def _all_loaded(self, failure: str | None, path: Path) -> None:
        """Collective: raise on every rank when any rank failed to load ``path`` (naming the ranks)."""
        failures = gather_objects(failure) if self.world_size > 1 else [failure]
        failed = {rank: message for rank, message in enumerate(failures) if message is not None}
        if failed:
            shown = "; ".join(f"rank {rank}: {message}" for rank, message in failed.items())
            raise CheckpointError(f"resuming from {path} failed on {len(failed)} of {self.world_size} rank(s): {shown}")

    def save(self, engine: Any, progress: Progress, plan: Any, rank_state: dict[str, Any]) -> Path:
        """Collective: a complete checkpoint of ``progress.step``."""
        cfg = self.recipe.train
        meta = {
            "step": progress.step, "world_size": self.world_size, "zero_stage": cfg.zero_stage,
            "precision": cfg.precision, "global_batch": plan.global_batch,
            "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum,
            "progress": {k: getattr(progress, k) for k in progress.__dataclass_fields__},
            "recipe": self.recipe.to_dict(), "recipe_hash": self.recipe.hash(),
            "allow_test_selection": cfg.allow_test_selection,
            "tokenizer": self.tokenizer,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        path = self.manager.save(engine, progress.step, meta, rank_state)
        self.last_saved_step = progress.step
        return path

    def save_weights(self, module: torch.nn.Module, out: Path, checkpoint_dir: Path, manifest: Any) -> None:
        """Collective: consolidated fp32 module weights (``save_module_weights``) from a checkpoint."""
        from af_train.model.checkpoint import save_module_weights

        if self.rank == 0:
            state = self.consolidated_weights(module, checkpoint_dir)
            save_module_weights(module, out, self.recipe.to_dict(), manifest.num_classes, manifest.multi_label,
                                state_dict=state, tokenizer=manifest.tokenizer)
            log.info("wrote consolidated weights %s", out)
        barrier()

    def consolidated_weights(self, module: torch.nn.Module, checkpoint_dir: Path) -> dict[str, torch.Tensor]:
        """fp32 module weights of one of this run's checkpoints, frozen parameters included.

        DeepSpeed leaves frozen parameters out of ZeRO-1 checkpoints (it saves them from stage 2 on):
        take them from the live ``module``, where they are whole below stage 3 and never change."""
        state = consolidated_state(checkpoint_dir)
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
