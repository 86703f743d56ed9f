"""af-experiment end to end on tiny synthetic shards: 2 arms x 2 seeds (plus an arm identical to the baseline)
through af-train and af-evaluate, killed in the middle of a run and resumed; a planted difference (labels
shuffled in training) is found, identical arms are not told apart, and the reported paired interval is
recomputed from the runs' per-clip scores by a plain loop."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "engine"))
from engine_helpers import release_shm, signal_group  # noqa: E402
from test_statistics import pairwise_map  # noqa: E402

STEPS = 20


def experiment_file(tmp_path: Path) -> Path:
    spec = {
        "name": "planted",
        "question": "Is a model trained on shuffled labels worse, and are two identical arms equal?",
        "protocol": "synthetic code shards of the engine tests (a test of the tool, not of the model)",
        "data": {"root": str(tmp_path / "data"),
                 "steps": [{"name": "write", "command": [sys.executable, "tests/experiment/write_data.py", "{data}"],
                            "outputs": ["{data}/test/manifest.json", "{data}/train_shuffled/manifest.json"]}],
                 "train": "{data}/train", "val": "{data}/val", "test": "{data}/test"},
        "launch": {"num_cpu_ranks": 1},
        "finetune": {"recipe": "recipes/tiny_ft1.yaml",
                     "overrides": ["objective.init_checkpoint=null", "data.max_length=32", f"train.max_steps={STEPS}",
                                   "train.eval_every=10", "train.save_every=10", "optim.lr=3e-3",
                                   "train.log_every=5"]},
        "arms": [{"name": "real"},
                 {"name": "shuffled", "about": "the same clips, each with another clip's label",
                  "finetune": {"overrides": ["data.train={data}/train_shuffled"]}},
                 {"name": "real_again", "about": "the baseline's configuration again"}],
        "baseline": "real",
        "seeds": [0, 1],
        "runs": str(tmp_path / "runs"),
        "results": str(tmp_path / "results"),
        "stats": {"metrics": ["mAP", "accuracy"], "rounds": 300},
    }
    path = tmp_path / "planted.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def command(path: Path) -> list[str]:
    return [sys.executable, "-m", "af_train.experiment.cli", str(path)]


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def release_ports(runs: Path) -> None:
    """DeepSpeed's /dev/shm buffers of every run (named after the master port af-train logged)."""
    for log in runs.rglob("log.txt"):
        for port in re.findall(r"--master_port (\d+)", log.read_text(errors="replace")):
            release_shm(int(port))


def finetune_dir(runs: Path, label: str) -> Path | None:
    found = sorted((runs / "finetune").glob(f"{label}-*")) if (runs / "finetune").is_dir() else []
    return found[0] if found else None


def test_runs_are_killed_resumed_and_reported_with_paired_intervals(tmp_path):
    path = experiment_file(tmp_path)
    runs, results = tmp_path / "runs", tmp_path / "results"
    log = tmp_path / "first.log"
    try:
        with open(log, "wb") as out:
            first = subprocess.Popen(command(path), cwd=REPO, env=env(), stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        # kill -9 the whole process tree once the second run has written its first checkpoint
        deadline = time.time() + 400
        while time.time() < deadline:
            second = finetune_dir(runs, "real-seed1")
            if second is not None and (second / "checkpoints" / "latest").is_file():
                break
            assert first.poll() is None, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        else:
            raise AssertionError("the second run never saved a checkpoint:\n" + log.read_text()[-3000:])
        signal_group(first, signal.SIGKILL)
        done = finetune_dir(runs, "real-seed0")
        marker_before = (done / "af_experiment.json").read_bytes()
        weights_mtime = (done / "final" / "model.pt").stat().st_mtime_ns
        assert json.loads(marker_before)["status"] == "done"

        again = subprocess.run(command(path), cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    finally:
        release_ports(runs)
    output = again.stdout
    assert re.search(r"finetune/real-seed0: reused", output), output
    assert re.search(r"finetune/real-seed1: resuming", output), output
    assert (done / "af_experiment.json").read_bytes() == marker_before  # the finished run was not redone
    assert (done / "final" / "model.pt").stat().st_mtime_ns == weights_mtime
    second = finetune_dir(runs, "real-seed1")
    assert "resumed from" in (second / "experiment" / "log.txt").read_text(errors="replace")
    assert json.loads((second / "af_experiment.json").read_text())["attempts"] == 2

    payload = json.loads((results / "results.json").read_text())
    assert payload["test_clips"] == {"test": 48} and payload["seeds"] == [0, 1]
    assert payload["report_commit"]["commit"] and payload["run_commits"]
    differences = {(d["arm"], d["metric"]): d for d in payload["differences"]}
    for metric in ("mAP", "accuracy"):
        planted = differences[("shuffled", metric)]
        assert planted["high"] < 0 and planted["verdict"] == "worse beyond noise", planted
        same = differences[("real_again", metric)]
        assert same["shares_runs_with_baseline"] and same["verdict"] == "no difference beyond noise"
        assert (same["low"], same["mean"], same["high"]) == (0.0, 0.0, 0.0)
    assert all(run["val"]["metric"] == "val/mAP" and run["val"]["value"] is not None for run in payload["runs"])
    assert payload["selected_on_val"]["arm"] in ("real", "real_again")

    # the reported paired mAP interval, recomputed from the per-clip scores by a plain loop
    by_arm = {}
    for run in payload["runs"]:
        with np.load(Path(run["run"]) / "experiment" / "test_scores.npz") as data:
            labels = data["labels"]
            targets = np.zeros((labels.size, 4), dtype=bool)
            targets[np.arange(labels.size), labels] = True
            by_arm.setdefault(run["arm"], {})[run["seed"]] = (data["scores"], targets)
    draw = np.random.default_rng(payload["bootstrap"]["seed"])
    replicates = []
    for _ in range(payload["bootstrap"]["rounds"]):
        seed_pick = draw.integers(0, 2, 2)
        clips = draw.integers(0, 48, 48)
        gaps = []
        for k in seed_pick:
            scores_a, targets = by_arm["real"][[0, 1][k]]
            scores_b, _ = by_arm["shuffled"][[0, 1][k]]
            gaps.append(pairwise_map(scores_b[clips], targets[clips]) - pairwise_map(scores_a[clips], targets[clips]))
        replicates.append(np.mean(gaps))
    low, high = np.percentile(replicates, [2.5, 97.5])
    assert differences[("shuffled", "mAP")]["low"] == pytest.approx(low, abs=1e-9)
    assert differences[("shuffled", "mAP")]["high"] == pytest.approx(high, abs=1e-9)

    text = (results / "results.md").read_text()
    assert "48 test clips, 2 seeds" in text and "worse beyond noise" in text
    for name in ("arms_mAP.png", "differences_mAP.png", "arms_accuracy.png"):
        assert (results / "plots" / name).read_bytes()[:4] == b"\x89PNG"
