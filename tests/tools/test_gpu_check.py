"""tools/gpu_check.sh --dry-run: every step of the GPU check runs on the CPU with tiny sizes, so a broken
step is found here and not in a rationed GPU window."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "gpu_check.sh"
STEPS = ["install", "env", "ops", "pytest", "kernels", "train", "prepare"]
RESULT_FILES = {"gpu_check.json", "gpu_check.log", "kernels.csv", "kernels.json", "kernels.png", "train.csv",
                "train.json", "train.png"}

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("timeout") is None, reason="gpu_check.sh needs coreutils' timeout")
def test_dry_run_runs_every_step_on_cpu(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("DRY_RUN", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=3000)
    log = proc.stdout + proc.stderr
    summary = json.loads((out / "gpu_check.json").read_text())
    assert [s["step"] for s in summary["steps"]] == STEPS
    assert all(s["status"] == "ok" for s in summary["steps"]), (summary["steps"], log[-4000:])
    assert proc.returncode == 0 and summary["failed_steps"] == 0
    assert summary["dry_run"] is True and len(summary["commit"]) == 40
    assert set(os.listdir(out)) == RESULT_FILES  # what one device call can bring back: 8 files
    text = (out / "gpu_check.log").read_text()
    assert "=== step pytest: ok" in text and "needs a CUDA GPU" in text  # cuda tests collected, skipped, said why
    assert "af_train_tools" in text and "MISSING" not in text
    with open(out / "train.csv", newline="") as f:
        rows = [(r["mode"], r["impl"], r["status"]) for r in csv.DictReader(f)]
    assert rows == [("pretrain", "af_train", "ok"), ("pretrain", "hf_roformer", "ok"), ("ft1", "af_train", "ok"),
                    ("ft1", "hf_roformer", "ok")]
    assert json.loads((out / "kernels.json").read_text())["meta"]["smoke_run"] is True
    # af-prepare's rows, one per tokenizer on the device, from af-prepare's own log; EnCodec labelled
    rows = {r["tokenizer"]: r for r in summary["prepare"]["rows"]}
    assert set(rows) == {"encodec", "mel-rvq"} and all(r["device"] == "cpu" for r in rows.values())
    assert all(r["clips_per_s"] > 0 and r["realtime_factor"] > 0 for r in rows.values()), rows
    assert rows["encodec"]["weights"].startswith(("official", "random-init"))


def test_a_failing_step_is_recorded_and_the_others_still_run(tmp_path):
    """A step that fails leaves its status in gpu_check.json, the next steps run, the exit code says so."""
    out = tmp_path / "results"
    fake = tmp_path / "bin"
    fake.mkdir()
    # a python3 whose every pytest run fails: only the pytest step may fail
    real = shutil.which("python3")
    (fake / "python3").write_text(f'#!/bin/sh\nif [ "$2" = pytest ]; then exit 3; fi\nexec {real} "$@"\n')
    (fake / "python3").chmod(0o755)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
           "PYTHON": str(fake / "python3"), "GPU_CHECK_STEPS": "pytest kernels"}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=3000)
    summary = json.loads((out / "gpu_check.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {"pytest": "failed (exit 3)", "kernels": "ok"}
    assert proc.returncode != 0 and summary["failed_steps"] == 1
