"""train.probe: the frozen-embedding probe during training (af_train.probe.Prober wired into the engine)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp
from engine_helpers import TINY, base_overrides, free_port, single_process_rank
from probe_rank_worker import probe_once, run_rank

from af_train.config import Recipe, RecipeError
from af_train.run_logging import read_metrics

# no time budget: the probes of these few quick steps would take most of the wall time
PROBE = ["train.probe.max_clips=24", "train.probe.kind=knn", "train.probe.every=2", "train.probe.max_time_share=null"]


def probes(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["probe/mAP"] for r in read_metrics(run_dir) if "probe/mAP" in r}


def test_probe_on_two_ranks_matches_one_rank(data_root, tmp_path):
    # 21 clips per split: ranks embed 11 and 10 (the shorter share padded), in batches of 4 (1 rank: 5)
    ctx, port = mp.get_context("spawn"), free_port()
    processes = [ctx.Process(target=run_rank, args=(r, 2, port, str(data_root), str(tmp_path))) for r in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    ranks = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    alone = probe_once(str(data_root), batch_size=5)
    for kind, setting in (("knn", "probe/k"), ("linear", "probe/C")):
        layers = [2] if kind == "knn" else [0, 1, 2]  # the linear probe: every layer, one chosen on val
        for split in ("train", "val"):
            assert sorted(alone[kind]["features"][split]) == layers
            for layer in layers:
                assert alone[kind]["features"][split][layer].shape == (21, 64)
                for result in ranks:
                    np.testing.assert_allclose(result[kind]["features"][split][layer],
                                               alone[kind]["features"][split][layer], rtol=1e-5, atol=1e-5)
        metrics = alone[kind]["metrics"]
        timing = ("probe/seconds", "probe/time_share", "probe/skipped")
        values = {k: v for k, v in metrics.items() if k not in timing}
        per_layer = {f"probe/layer{layer}/mAP" for layer in layers} | {"probe/layer"} if kind == "linear" else set()
        assert set(values) == {"probe/mAP", setting} | per_layer
        if kind == "linear":  # the chosen layer is the one with the best val mAP, and reported as such
            best = max(layers, key=lambda layer: (values[f"probe/layer{layer}/mAP"], -layer))
            assert values["probe/layer"] == best and values["probe/mAP"] == values[f"probe/layer{best}/mAP"]
        for result in ranks:
            assert {k: result[kind]["metrics"][k] for k in values} == pytest.approx(values, abs=1e-9)


def test_probe_is_logged_selects_checkpoints_agrees_with_af_probe_and_survives_resume(data_root, tmp_path):
    from af_train.engine import Trainer
    from af_train.inference.probe import main as af_probe

    run_dir = tmp_path / "run"
    overrides = base_overrides(data_root, run_dir) + PROBE + [
        f"train.probe.dataset={data_root}", "train.max_steps=4", "train.save_every=2", "train.eval_every=2",
        "train.best_metric=probe/mAP", "train.best_mode=max"]
    recipe = Recipe.load(TINY, overrides)
    with single_process_rank():
        trainer = Trainer(recipe)
        trainer.fit()
        trainer.close()
        first = probes(run_dir)
        assert sorted(first) == [0, 2, 4]  # the initial weights, every 2 steps, the last step
        records = [r for r in read_metrics(run_dir) if "probe/mAP" in r]
        assert all(r["probe/k"] >= 1 and 0 <= r["probe/time_share"] < 1 for r in records)
        selected = max(first[2], first[4])  # the selection sees evaluations at steps 2 and 4 only
        assert trainer.progress.best["metric"] == "probe/mAP" and trainer.progress.best["value"] == selected

        # af-probe on the same weights and clips: the same val number (the probes are deterministic)
        out = tmp_path / "af_probe"
        assert af_probe([str(run_dir), str(data_root), "--weights", str(run_dir / "final" / "model.pt"),
                         "--kind", "knn", "--max-clips", "24", "--bootstrap-rounds", "10", "--out", str(out)]) == 0
        (entry,) = json.loads((out / "probe.json").read_text())["probes"]
        assert entry["val"]["mAP"] == pytest.approx(first[4], abs=1e-9)

        # resume from step 2: the history up to it stays, step 4 is probed again, step 0 is not
        again = Trainer(recipe, resume=str(run_dir / "checkpoints" / "step_00000002"))
        again.fit()
        again.close()
    history = [r["step"] for r in read_metrics(run_dir) if "probe/mAP" in r]
    assert history == [0, 2, 4]
    assert probes(run_dir) == pytest.approx(first, abs=1e-9)
    tags = _tensorboard_tags(run_dir)
    assert "probe/mAP" in tags


def _tensorboard_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in (run_dir / "tensorboard").glob("events.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags().get("scalars", []))
    return tags


def test_probe_recipe_errors_name_the_fix(data_root, tmp_path):
    with pytest.raises(RecipeError, match="needs train.probe.dataset"):
        Recipe.load(TINY, ["train.best_metric=probe/accuracy"])
    with pytest.raises(RecipeError, match="set train.best_mode=max"):
        Recipe.load(TINY, ["train.best_metric=probe/accuracy", "train.probe.dataset=x", "train.best_mode=min"])
    with pytest.raises(RecipeError, match="train.probe.every must be >= 0"):
        Recipe.load(TINY, ["train.probe.every=-1"])
    from af_train.engine import Trainer
    from af_train.probe import ProbeError

    recipe = Recipe.load(TINY, base_overrides(data_root, tmp_path / "run") + [f"train.probe.dataset={tmp_path}"])
    with single_process_rank(), pytest.raises(ProbeError, match="train.probe: .* has no train, val split"):
        Trainer(recipe)


def test_the_time_budget_leaves_out_periodic_probes_and_keeps_one_for_the_last_step(data_root):
    import dataclasses
    import time

    import torch

    from af_train.config import DataConfig, ProbeConfig
    from af_train.probe import Prober
    from af_train.shards import Manifest

    cfg = ProbeConfig(dataset=str(data_root), every=2, max_clips=8, max_time_share=0.1)
    prober = Prober(cfg, DataConfig(code_rows=[0], max_length=32), Manifest.load(data_root / "train"), 2,
                    torch.device("cpu"))
    assert not prober.due(3)  # not a step of train.probe.every
    prober.started = time.perf_counter() - 100.0  # 100 s of wall time so far: a budget of 10 s of probes
    prober.seconds, prober.last_seconds = 4.0, 3.0  # 4 s so far + this probe + one for the last step = 10 s
    assert prober.due(2) and prober.skipped == 0
    prober.last_seconds = 3.5  # 4 + 2 * 3.5 = 11 s: over the budget
    assert not prober.due(4) and prober.skipped == 1
    prober.cfg = dataclasses.replace(cfg, max_time_share=None)  # no budget: every step of `every`
    assert prober.due(4) and prober.skipped == 1
