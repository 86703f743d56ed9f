"""Checkpoints that are either complete or ignored, and finding the one to resume from.

Layout of ``<run_dir>/checkpoints``::

    step_00000100/                      one checkpoint (a DeepSpeed tag directory)
        mp_rank_00_model_states.pt ...  DeepSpeed's model / optimizer / scheduler state
        af_state/rank_00000.pt          ours, per rank: RNG states, data-loader position
        af_meta.json                    ours: step, samples, tokens, world size, ZeRO stage, recipe + hash
        COMPLETE                        written last, after every rank finished writing
    step_00000100_universal/            DeepSpeed universal form, made when resuming at another world size
    latest                              tag of the newest complete checkpoint (moved only to complete ones)
    best                                tag and value of the best checkpoint by train.best_metric

A crash mid-save leaves a directory without ``COMPLETE``: it is never resumed from, ``latest`` still
names the previous checkpoint, and the next save of the same step replaces it.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from af_train.files import atomic_open, atomic_write
from af_train.model.checkpoint import CheckpointError

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


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------------
# Per-rank RNG state
# --------------------------------------------------------------------------------------------------


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


def read_best(root: Path) -> tuple[str, float] | None:
    """(tag, metric value) of the checkpoint recorded as the best under ``root``, or None."""
    pointer = root / BEST
    if not pointer.is_file():
        return None
    data = json.loads(pointer.read_text(encoding="utf-8"))
    return data["tag"], float(data["value"])


def resolve_resume(spec: str, run_dir: Path) -> Path | None:
    """The checkpoint directory to resume from for ``--resume spec`` (``auto`` | ``none`` | a path)."""
    root = run_dir / "checkpoints"
    if spec == "none":
        if complete_checkpoints(root):
            raise CheckpointError(
                f"--resume none, but {root} already holds checkpoints; resume with --resume auto, or give "
                "another train.run_dir for a fresh run"
            )
        return None
    if spec == "auto":
        return latest_complete(root)
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"--resume {spec}: no such file or directory")
    if is_complete(path):
        return path
    for candidate_root in (path, path / "checkpoints"):
        found = latest_complete(candidate_root) if candidate_root.is_dir() else None
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


def consolidated_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 module weights of a complete checkpoint, at any ZeRO stage (one process, CPU).

    DeepSpeed leaves frozen parameters out of ZeRO-1 checkpoints; callers holding the live module
    complete them from it.
    """
    if read_meta(ckpt)["zero_stage"] == 0:  # no partitions: the module states file holds every weight
        state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        return {k: v.float() for k, v in state.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


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
        barrier()  # every rank's files are written before the marker
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
