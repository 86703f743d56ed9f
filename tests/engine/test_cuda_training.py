"""One GPU, ZeRO-2, bf16, small preset, through the real deepspeed launcher: pretraining learns, and a
kill -9 followed by ``--resume auto`` reproduces the uninterrupted run's losses and batches bit for bit
on the GPU (dropout on: the CUDA RNG and the Triton kernels' Philox masks must be restored exactly).

Needs a CUDA GPU (``pytest -m cuda``); collected and skipped with the reason elsewhere.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from engine_helpers import base_overrides, batch_ids, logged_steps, run, signal_group, start, wait_for

from af_train.checkpoint import latest_complete, step_of, tag_for
from af_train.run_logging import read_metrics

pytestmark = [pytest.mark.cuda, pytest.mark.slow]

SAVE_EVERY = 20
STEPS_AFTER_RESUME = 15


def gpu_overrides(data_root: Path, run_dir: Path, max_steps: int) -> list[str]:
    # The lr schedule is constant after 2 warm-up steps (base_overrides), so runs of different
    # max_steps take the same steps and their losses are comparable one by one.
    return base_overrides(data_root, run_dir) + [
        "model.preset=small", "model.hidden_dropout_prob=0.1", "train.precision=bf16", "train.zero_stage=2",
        "train.micro_batch_size=16", "optim.lr=1e-3", "data.val=null", f"train.max_steps={max_steps}",
        f"train.save_every={SAVE_EVERY}", "train.keep_last=2",
    ]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_one_gpu_zero2_bf16_pretraining_learns_and_resumes_bit_exact(data_root, tmp_path):
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    log = interrupted / "launcher.log"
    checkpoints = interrupted / "checkpoints"

    # 1) kill -9 the whole job a few steps after its first complete checkpoint
    process = start(1, gpu_overrides(data_root, interrupted, 100_000), log)

    def checkpoint_and_more_steps() -> bool:
        latest = latest_complete(checkpoints) if checkpoints.is_dir() else None
        return latest is not None and logged_steps(interrupted) >= step_of(latest.name) + 3

    wait_for(checkpoint_and_more_steps, 300, "a checkpoint and 3 more steps", process, log)
    signal_group(process)
    resume_from = step_of(latest_complete(checkpoints).name)
    total = resume_from + STEPS_AFTER_RESUME

    # 2) the uninterrupted reference, as long as the resumed run will be
    reference = tmp_path / "reference"
    reference.mkdir()
    run(1, gpu_overrides(data_root, reference, total), reference / "launcher.log", timeout=300)

    # 3) resume the killed run to the same length
    run(1, gpu_overrides(data_root, interrupted, total), log, timeout=300)
    assert re.search(rf"resumed from \S*{tag_for(resume_from)}", log.read_text(errors="replace"))

    mine, theirs = train_losses(interrupted), train_losses(reference)
    assert sorted(mine) == sorted(theirs) == list(range(1, total + 1))
    different = [(s, mine[s], theirs[s]) for s in theirs if mine[s] != theirs[s]]
    assert not different, f"losses differ after resuming from step {resume_from}: {different[:5]}"
    assert batch_ids(interrupted) == batch_ids(reference)

    losses = [theirs[s] for s in sorted(theirs)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, f"MLM loss did not decrease: first 5 steps {first:.3f}, last 5 {last:.3f}"
