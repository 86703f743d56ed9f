"""CheckpointManager in one process with a stand-in engine (no DeepSpeed, no process group): what a save
writes where, and that loading gives back the counters, the loader position, the RNG state and the
weight average."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch

from af_train.checkpoint.files import (
    EMA_KEY,
    LATEST,
    MARKER,
    META,
    CheckpointError,
    is_complete,
    load_rank_state,
    verify,
)
from af_train.checkpoint.manager import CheckpointManager
from af_train.checkpoint.state import Progress, rng_state
from af_train.config import Recipe
from af_train.ds_config import BatchPlan
from af_train.ema import EMA


class StandInEngine:
    """What the manager asks of a DeepSpeed engine: write and read a tag directory."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool) -> None:
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": {}, "client_state": client_state}, Path(root) / tag / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, root: str, tag: str, **kwargs) -> tuple[str, dict]:
        self.loaded.append(tag)
        return str(Path(root) / tag), {}


class Loader:
    def __init__(self, position: int) -> None:
        self.position = position

    def state_dict(self) -> dict:
        return {"sample_in_epoch": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["sample_in_epoch"]


def manager(run_dir: Path) -> CheckpointManager:
    recipe = Recipe.from_dict({"train": {"zero_stage": 0, "precision": "fp32", "keep_last": 2, "seed": 3}})
    return CheckpointManager(recipe, run_dir, rank=0, world_size=1)


def ema_of(seed: int) -> EMA:
    torch.manual_seed(seed)
    return EMA(torch.nn.Linear(4, 3), decay=0.9)


def test_save_writes_a_complete_verified_checkpoint_and_load_restores_every_state(tmp_path):
    saving = manager(tmp_path)
    progress = Progress(step=7, samples=56, tokens=900, epoch=1)
    ema = ema_of(0)
    random.seed(11)
    rng = rng_state()
    path = saving.save(StandInEngine(), progress, BatchPlan(4, 2, 1), rng, Loader(56), ema)

    assert path == tmp_path / "checkpoints" / "step_00000007" and is_complete(path) and verify(path) is None
    assert (tmp_path / "checkpoints" / LATEST).read_text() == "step_00000007\n"
    assert (path / MARKER).read_text().startswith("complete ")
    meta = json.loads((path / META).read_text())
    assert meta["progress"]["samples"] == 56 and meta["global_batch"] == 8 and meta["world_size"] == 1
    assert set(meta["files"]) == {"mp_rank_00_model_states.pt", "af_state/rank_00000.pt"}
    own = load_rank_state(path, 0)
    assert own["loader"] == {"sample_in_epoch": 56} and own["rng"]["python"] == rng["python"]
    assert all(torch.equal(own[EMA_KEY]["weights"][n], ema.shadow[n]) for n in ema.names)
    assert saving.last_saved_step == 7

    resuming, loader, fresh = manager(tmp_path), Loader(0), ema_of(1)
    assert not torch.equal(fresh.shadow["weight"], ema.shadow["weight"])
    point = resuming.resume_point("auto", tmp_path)
    assert point.path == path and not point.universal and point.keep_global_batch is None
    engine = StandInEngine()
    restored, pending_rng = resuming.load(point, engine, loader, fresh)
    assert engine.loaded == ["step_00000007"] and loader.position == 56
    assert restored == progress and pending_rng["python"] == rng["python"]
    assert all(torch.equal(fresh.shadow[n], ema.shadow[n]) for n in ema.names)
    assert resuming.last_saved_step == 7  # this run's own checkpoint: not saved again at step 7


def test_a_checkpoint_without_an_average_restarts_it_and_says_so(tmp_path, caplog):
    saving = manager(tmp_path)
    path = saving.save(StandInEngine(), Progress(step=2), BatchPlan(4, 1, 1), rng_state(), Loader(8))
    assert EMA_KEY not in load_rank_state(path, 0)
    ema = ema_of(2)
    before = {n: t.clone() for n, t in ema.shadow.items()}
    resuming = manager(tmp_path)
    with caplog.at_level(logging.WARNING, logger="af_train.checkpoint.manager"):
        resuming.load(resuming.resume_point("auto", tmp_path), StandInEngine(), Loader(0), ema)
    assert f"{path} holds no EMA: the average starts from the resumed weights" in caplog.text
    assert all(torch.equal(ema.shadow[n], before[n]) for n in ema.names)


def test_best_is_recorded_compared_and_kept_by_retention(tmp_path):
    checkpoints = manager(tmp_path)
    for step in (1, 2, 3, 4):
        checkpoints.save(StandInEngine(), Progress(step=step), BatchPlan(4, 1, 1), rng_state(), Loader(step))
        if step == 1:
            assert checkpoints.is_better(0.3)  # nothing recorded yet
            checkpoints.mark_best(1, "val/mAP", 0.3)
    assert checkpoints.best() == ("step_00000001", 0.3)
    assert checkpoints.is_better(0.31) and not checkpoints.is_better(0.3)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step_00000001", "step_00000003", "step_00000004"]  # keep_last 2 plus the best


def test_resuming_a_run_of_another_world_size_keeps_its_global_batch(tmp_path):
    checkpoints = manager(tmp_path)
    checkpoints.save(StandInEngine(), Progress(step=1), BatchPlan(4, 2, 1), rng_state(), Loader(0))
    meta_path = tmp_path / "checkpoints" / "step_00000001" / META
    meta = json.loads(meta_path.read_text())
    checkpoints.world_size = 2
    assert checkpoints.check_compatible(meta, meta_path.parent) == (False, 8)  # ZeRO-0: loads as it is
    zero2 = CheckpointManager(Recipe.from_dict({"train": {"zero_stage": 2}}), tmp_path, 0, 1)
    with pytest.raises(CheckpointError, match="saved with ZeRO stage 0.*Resume with train.zero_stage=0"):
        zero2.check_compatible(meta, meta_path.parent)


def test_resuming_across_zero3_boundary_is_refused(tmp_path):
    zero3 = CheckpointManager(Recipe.from_dict({"train": {"zero_stage": 3}}), tmp_path, rank=0, world_size=2)
    meta = {"zero_stage": 2, "world_size": 2, "global_batch": 8, "recipe_hash": zero3.recipe.hash()}
    with pytest.raises(CheckpointError, match="Crossing between ZeRO-1/2 and ZeRO-3"):
        zero3.check_compatible(meta, Path("ckpt"))
    zero1 = CheckpointManager(Recipe.from_dict({"train": {"zero_stage": 1}}), tmp_path, rank=0, world_size=2)
    assert zero1.check_compatible(meta, Path("ckpt")) == (False, None)  # 2 -> 1: same layout
    zero1.world_size = 4
    assert zero1.check_compatible(meta, Path("ckpt")) == (True, 8)
