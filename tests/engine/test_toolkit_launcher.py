"""The fine-tuning toolkit through the real launcher: every option on, kill -9 on 2 ranks, resume on 1.

Class-balanced sampling must give the same global batches at any world size and after a crash: the
2-rank run (killed with SIGKILL after a checkpoint) and its 1-rank continuation together draw exactly
the global batches of an uninterrupted 1-rank run with the same global batch.
"""

from __future__ import annotations

import pytest
from engine_helpers import base_overrides, batch_ids, run_sequence, signal_group, start, wait_for
from test_launcher import logged_steps

from af_train.checkpoint import latest_complete, step_of
from af_train.run_logging import read_metrics

pytestmark = pytest.mark.slow

STEPS = 10
OPTIONS = ["objective.mode=ft1", "train.precision=fp32", "optim.layer_decay=0.75", "data.finetune_mask_rate=0.2",
           "objective.mixup.prob=0.5", "train.ema_decay=0.9", "data.balanced_sampling=true", "data.balance_buckets=3",
           "train.zero_stage=2"]


def _global_ids(run_dir) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for (step, _), ids in batch_ids(run_dir).items():
        out.setdefault(step, []).extend(ids)
    return {step: sorted(ids) for step, ids in out.items()}


def test_balanced_order_survives_kill9_and_two_to_one_ranks(data_root, tmp_path):
    # 2 ranks, killed with SIGKILL once a checkpoint exists
    crashed, log = tmp_path / "crashed", tmp_path / "crashed.log"
    process = start(2, base_overrides(data_root, crashed) + OPTIONS + ["train.max_steps=100000", "train.save_every=3",
                                                                       "train.keep_last=5"], log)
    root = crashed / "checkpoints"
    wait_for(lambda: latest_complete(root) is not None and logged_steps(crashed) >= 4, 240,
             "a checkpoint and step 4", process, log)
    signal_group(process)
    checkpoint = latest_complete(root)
    saved = step_of(checkpoint.name)
    # continue on 1 rank from the 2-rank checkpoint (universal conversion; the EMA from rank 0's file), then
    # in the same launch (after the resumed run, which starts in a fresh process) the uninterrupted reference:
    # 1 rank, micro batch 8 = the 2-rank global batch of 2 x 4
    resumed, reference = tmp_path / "resumed", tmp_path / "reference"
    run_sequence(1, [
        {"overrides": base_overrides(data_root, resumed) + OPTIONS + [f"train.max_steps={STEPS}", "train.save_every=0"],
         "log": tmp_path / "resumed.log", "resume": str(checkpoint)},
        {"overrides": base_overrides(data_root, reference) + OPTIONS + [
            f"train.max_steps={STEPS}", "train.save_every=0", "train.micro_batch_size=8"],
         "log": tmp_path / "reference.log"},
    ], tmp_path / "one_rank_launcher.log")
    want, before, after = _global_ids(reference), _global_ids(crashed), _global_ids(resumed)
    assert sorted(after) == list(range(saved + 1, STEPS + 1))
    assert all(before[s] == want[s] for s in range(1, saved + 1))
    assert all(after[s] == want[s] for s in range(saved + 1, STEPS + 1))
    # options stayed on across the resume: raw metrics beside the EMA's at the final evaluation
    final_eval = [r for r in read_metrics(resumed) if "val/loss" in r][-1]
    assert "val/raw_loss" in final_eval
