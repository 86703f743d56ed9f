"""Multi-process training through the real ``deepspeed`` launcher on CPU (gloo).

One 2-rank ZeRO-2 reference run is shared; every other scenario is compared against it:
kill -9 + SIGTERM + resume (bit-for-bit), 2 -> 1 ranks (universal checkpoint), two simulated nodes,
ZeRO-1 fine-tuning from the reference's weights and ZeRO-3 bf16 pretraining.

The launcher starts as few times as possible (``launched``): the runs that are not interrupted, the 2-rank
ones one after another in one launch (a resumed run first, in fresh ranks), then the 1-rank resumes in
another; each run still is ``af_train.train``'s main with its own log file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from engine_helpers import (
    base_overrides,
    batch_ids,
    free_port,
    logged_steps,
    run_sequence,
    signal_group,
    start,
    wait,
    wait_for,
)

from af_train.checkpoint import is_complete, latest_complete, step_of
from af_train.run_logging import read_metrics

pytestmark = pytest.mark.slow

REFERENCE_STEPS = 40


def train_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}


def global_ids(run_dir: Path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for (step, _), ids in batch_ids(run_dir).items():
        out.setdefault(step, []).extend(ids)
    return {step: sorted(ids) for step, ids in out.items()}


ZERO0 = ["train.save_every=4", "train.zero_stage=0", "train.eval_every=0"]


@pytest.fixture(scope="module")
def launched(data_root, tmp_path_factory) -> Path:
    """The module's runs, each in ``<root>/<name>`` with its log ``<root>/<name>.log`` (the reference's and the
    interrupted run's in their run directories, ``launcher.log``): a run killed with SIGKILL and stopped with
    SIGTERM (``_kill9_then_sigterm``), then at 2 ranks in one launch its resume to the reference's length,
    the reference (ZeRO-2), ZeRO-0, FT1 from the reference's weights (ZeRO-1), FT2 and ZeRO-3 bf16
    pretraining; then at 1 rank in one launch the reference resumed from its step 8 (universal checkpoint)
    and the ZeRO-0 run resumed from its step 4."""
    from af_train.model import AudioFormerConfig, RoFormerEncoder, save_encoder

    root = tmp_path_factory.mktemp("launched")
    reference = root / "reference"
    reference.mkdir()
    torch.manual_seed(1)
    frozen = save_encoder(RoFormerEncoder(AudioFormerConfig.preset("tiny")), root / "row1.pt", code_row=1)
    # the kill -9 / SIGTERM scenario first: its last resume starts the 2-rank launch, in fresh ranks
    steps = _kill9_then_sigterm(data_root, root / "interrupted")
    (root / "interrupted_steps.json").write_text(json.dumps(steps))
    two_ranks = {
        "interrupted": [f"train.max_steps={REFERENCE_STEPS}", "train.save_every=4", "train.keep_last=3",
                        "train.zero_stage=2"],
        "reference": [f"train.max_steps={REFERENCE_STEPS}", "train.save_every=4", "train.keep_last=20",
                      "train.zero_stage=2", "train.eval_every=20", "train.best_metric=val/loss", "train.best_mode=min"],
        "zero0_two": ["train.max_steps=8", *ZERO0],
        "ft1": ["objective.mode=ft1", f"objective.init_checkpoint={reference / 'final' / 'model.pt'}",
                f"data.test={data_root / 'test'}", "train.max_steps=30", "train.zero_stage=1", "train.eval_every=15",
                "train.best_metric=val/mAP", "train.save_every=15", "train.record_sample_ids=false"],
        "ft2": ["objective.mode=ft2", "data.code_rows=[0,1]", f"objective.frozen_row_checkpoints=[{frozen}]",
                "train.max_steps=3", "train.save_every=0", "data.val=null", "train.record_sample_ids=false"],
        "zero3": ["train.max_steps=30", "train.zero_stage=3", "train.precision=bf16", "train.save_every=0"],
    }
    one_rank = {
        "one_rank": (["train.max_steps=16", "train.save_every=0", "train.zero_stage=2"],
                     reference / "checkpoints" / "step_00000008"),
        "zero0_one": (["train.max_steps=8", *ZERO0], root / "zero0_two" / "checkpoints" / "step_00000004"),
    }

    def log_of(name: str) -> Path:
        return root / name / "launcher.log" if name in ("reference", "interrupted") else root / f"{name}.log"

    run_sequence(2, [{"overrides": base_overrides(data_root, root / name) + extra, "log": log_of(name)}
                     for name, extra in two_ranks.items()], root / "two_ranks.log", timeout=900)
    run_sequence(1, [{"overrides": base_overrides(data_root, root / name) + extra, "log": log_of(name),
                      "resume": str(source)} for name, (extra, source) in one_rank.items()],
                 root / "one_rank_launcher.log", timeout=600)
    return root


@pytest.fixture(scope="module")
def reference(launched) -> Path:
    return launched / "reference"


def test_two_rank_zero2_reference_run(reference):
    records = train_records(reference)
    assert sorted(records) == list(range(1, REFERENCE_STEPS + 1))
    losses = [records[s]["loss"] for s in sorted(records)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses  # it learns
    first = records[1]
    for key in ("lr", "grad_norm", "samples_per_s", "tokens_per_s", "step_time_s", "memory_gb", "skipped_steps",
                "mlm_loss", "mlm_accuracy", "tokens", "samples"):
        assert key in first, key
    assert records[REFERENCE_STEPS]["samples"] == REFERENCE_STEPS * 8  # global batch 4 x 2 ranks
    evals = [r for r in read_metrics(reference) if "val/loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    # checkpoints: complete, latest -> last step, best recorded, DeepSpeed config from the recipe
    root = reference / "checkpoints"
    assert latest_complete(root).name == "step_00000040"
    assert json.loads((root / "best").read_text())["metric"] == "val/loss"
    meta = json.loads((root / "step_00000008" / "af_meta.json").read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == 2 and meta["global_batch"] == 8
    ds_config = json.loads((reference / "ds_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == 2 and ds_config["train_batch_size"] == 8
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    # consolidated weights load into a fresh encoder
    from af_train.model import load_encoder

    encoder = load_encoder(reference / "final" / "model.pt")
    assert encoder.config.hidden_size == 64
    assert "global batch 8 = micro batch 4 x gradient accumulation 1 x world size 2" in (
        reference / "launcher.log").read_text()


def _kill9_then_sigterm(data_root: Path, run_dir: Path) -> dict[str, int]:
    """A long 2-rank run killed with SIGKILL after a checkpoint, resumed, then stopped with SIGTERM: the steps
    where that happened (``launched`` then resumes it to the reference's length)."""
    log = run_dir / "launcher.log"
    run_dir.mkdir()
    long = base_overrides(data_root, run_dir) + ["train.max_steps=100000", "train.save_every=4",
                                                 "train.keep_last=3", "train.zero_stage=2"]
    root = run_dir / "checkpoints"

    # 1) kill -9 every process at an arbitrary step after a checkpoint exists
    process = start(2, long, log)
    wait_for(lambda: latest_complete(root) is not None and logged_steps(run_dir) >= 10, 180,
             "a checkpoint and step 10", process, log)
    signal_group(process)
    killed_at = logged_steps(run_dir)
    resumed_from = step_of(latest_complete(root).name)

    # 2) resume, then SIGTERM: a clean checkpoint at the step where it stopped
    process = start(2, long, log)
    # "resume: <path>" is logged after metrics.jsonl was cut back to the checkpoint's step
    def resumed_and_training() -> bool:
        parts = log.read_text(errors="replace").split("resumed from")
        return len(parts) > 1 and "  resume: " in parts[-1] and logged_steps(run_dir) >= resumed_from + 3

    wait_for(resumed_and_training, 180, "the resumed run to train", process, log)
    signal_group(process, signal.SIGTERM, timeout=60)  # as Ctrl-C or a scheduler would: the whole job
    sigterm_log = log.read_text(errors="replace")
    (run_dir.parent / "interrupted_sigterm.log").write_text(sigterm_log)  # the log up to here, for the test
    return {"killed_at": killed_at, "resumed_from": resumed_from, "stopped": step_of(latest_complete(root).name)}


def test_kill9_and_sigterm_then_resume_reproduce_losses_and_batches(launched, reference):
    run_dir = launched / "interrupted"
    steps = json.loads((launched / "interrupted_steps.json").read_text())
    resumed_from, stopped = steps["resumed_from"], steps["stopped"]
    # 1) killed with SIGKILL at an arbitrary step after a checkpoint existed
    assert resumed_from < steps["killed_at"] or resumed_from % 4 == 0
    # 2) resumed, then SIGTERM: a clean checkpoint at the step where it stopped
    text = (launched / "interrupted_sigterm.log").read_text(errors="replace")
    assert "stopped by SIGTERM" in text, text[-3000:]
    assert resumed_from < stopped < REFERENCE_STEPS, (resumed_from, stopped)
    # 3) resumed to the reference's length (first in the 2-rank launch of ``launched``)
    mine, theirs = train_records(run_dir), train_records(reference)
    assert sorted(mine) == list(range(1, REFERENCE_STEPS + 1))
    for step in range(1, REFERENCE_STEPS + 1):
        assert mine[step]["loss"] == theirs[step]["loss"], (step, mine[step]["loss"], theirs[step]["loss"])
        assert mine[step]["samples"] == theirs[step]["samples"]
    assert batch_ids(run_dir) == batch_ids(reference)


def test_resume_on_one_rank_converts_through_universal_checkpoint(launched, reference, tmp_path):
    run_dir = launched / "one_rank"
    source = reference / "checkpoints" / "step_00000008"
    log = (launched / "one_rank.log").read_text(errors="replace")
    assert "universal" in log
    assert "global batch 8 = micro batch 4 x gradient accumulation 2 x world size 1" in log
    mine, theirs = train_records(run_dir), train_records(reference)
    assert sorted(mine) == list(range(9, 17))
    # Same global batches, grouped into micro batches differently by one rank than by two. Losses are
    # normalised by the global masked-token count, so the gradients and losses agree up to float order
    # (the earlier mean of per-micro-batch means differed by ~2e-3 here).
    reference_ids = global_ids(reference)
    assert all(global_ids(run_dir)[s] == reference_ids[s] for s in range(9, 17))
    for step in range(9, 17):
        assert mine[step]["samples"] == theirs[step]["samples"]
        assert mine[step]["loss"] == pytest.approx(theirs[step]["loss"], rel=1e-4), step
    assert not (reference / "checkpoints" / "step_00000008_universal").exists()  # the source run is only read
    # The universal form holds exactly the fp32 master weights of the 2-rank checkpoint (the run removed
    # its copy once it had checkpoints of its own; convert again here to inspect it).
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from af_train.checkpoint import convert_to_universal

    master = get_fp32_state_dict_from_zero_checkpoint(str(source.parent), tag=source.name)
    universal = convert_to_universal(source, rank=0, out_root=tmp_path / "converted") / "zero"
    converted = [name for name in master if (universal / name / "fp32.pt").is_file()]
    assert len(converted) >= 10, sorted(p.name for p in universal.iterdir())
    for name in converted:
        assert torch.equal(torch.load(universal / name / "fp32.pt", weights_only=False)["param"], master[name]), name


def test_zero0_checkpoint_resumes_on_another_world_size(launched):
    """ZeRO-0 keeps whole (unpartitioned) states: 2 -> 1 ranks loads them directly, same global batches."""
    two, one = launched / "zero0_two", launched / "zero0_one"
    log = (launched / "zero0_one.log").read_text(errors="replace")
    assert "saved by 2 ranks, resuming on 1: ZeRO-0 state is not partitioned" in log, log[-3000:]
    assert "global batch 8 = micro batch 4 x gradient accumulation 2 x world size 1" in log
    mine, theirs = train_records(one), train_records(two)
    assert sorted(mine) == [5, 6, 7, 8]
    assert all(global_ids(one)[s] == global_ids(two)[s] for s in range(5, 9))
    for step in range(5, 9):  # same clips, other micro-batch grouping; losses over the global masked-token count
        assert mine[step]["samples"] == theirs[step]["samples"]
        assert mine[step]["loss"] == pytest.approx(theirs[step]["loss"], rel=1e-4), step


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="simulated nodes need `unshare -m` and root to mount a private /dev/shm")
def test_two_simulated_nodes_match_one_node(reference, data_root, tmp_path):
    run_dir = tmp_path / "two_nodes"
    run_dir.mkdir()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("fake-node-a slots=1\nfake-node-b slots=1\n")
    # Each fake node gets its own /dev/shm (streaming and DeepSpeed name shared memory per node).
    private_shm = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=512m tmpfs /dev/shm && exec "$@"', "sh"]
    overrides = base_overrides(data_root, run_dir) + ["train.max_steps=12", "train.save_every=6",
                                                      "train.zero_stage=2"]
    port = free_port()
    nodes = [start(1, overrides, tmp_path / f"node{n}.log", port=port, node_rank=n, hostfile=hostfile,
                   prefix=private_shm) for n in (0, 1)]
    for n, process in enumerate(nodes):
        wait(process, tmp_path / f"node{n}.log", timeout=240)
    mine, theirs = train_records(run_dir), train_records(reference)
    assert sorted(mine) == list(range(1, 13))
    assert global_ids(run_dir) == {s: ids for s, ids in global_ids(reference).items() if s <= 12}
    for step in range(1, 13):
        assert mine[step]["loss"] == theirs[step]["loss"], step  # same ranks, same reductions: bit-for-bit
    assert is_complete(run_dir / "checkpoints" / "step_00000012")
    meta = json.loads((run_dir / "checkpoints" / "step_00000012" / "af_meta.json").read_text())
    assert meta["world_size"] == 2


def test_zero1_fine_tuning_from_pretrained_weights(launched, tmp_path):
    run_dir = launched / "ft1"
    log = (launched / "ft1.log").read_text(errors="replace")
    assert "encoder initialised from" in log
    records = train_records(run_dir)
    losses = [records[s]["loss"] for s in sorted(records)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    final = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert final["val/mAP"] > 0.5 and "test/mAP" in final and "test/d_prime" in final
    assert final["best"]["metric"] == "val/mAP"
    # the test split is scored with the checkpoint selected on validation, not the last one
    selected = json.loads((run_dir / "checkpoints" / "best").read_text())["tag"]
    assert final["test_checkpoint"] == selected
    # the evaluate CLI (one process, consolidated weights) agrees with the engine's distributed evaluation
    result = subprocess.run(
        [os.sys.executable, "-m", "af_train.evaluate", str(run_dir), "--split", "test", "--batch-size", "7",
         "--checkpoint", str(run_dir / "checkpoints" / selected)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    standalone = json.loads((run_dir / "eval_test.json").read_text())
    assert standalone["test/mAP"] == pytest.approx(final["test/mAP"], abs=1e-5)
    assert standalone["test/num_samples"] == 40
    # ... and so does it from the DeepSpeed checkpoint of the last step (consolidated on the fly)
    out = tmp_path / "val_from_checkpoint.json"
    result = subprocess.run(
        [os.sys.executable, "-m", "af_train.evaluate", str(run_dir), "--split", "val", "--out", str(out),
         "--checkpoint", str(run_dir / "checkpoints" / "step_00000030")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(out.read_text())["val/mAP"] == pytest.approx(final["val/mAP"], abs=1e-5)


def test_zero3_bf16_pretraining_learns(launched):
    run_dir = launched / "zero3"
    assert "ZeRO stage 3, bf16" in (launched / "zero3.log").read_text(errors="replace")
    records = train_records(run_dir)
    losses = [records[s]["loss"] for s in sorted(records)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    payload = torch.load(run_dir / "final" / "model.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in payload["state_dict"].values())  # consolidated fp32 master
    assert payload["state_dict"]["encoder.embeddings.word_embeddings.weight"].shape == (1032, 64)


def test_ft2_global_negatives_log_the_global_micro_batch(launched):
    """2 ranks, FT2: MPC negatives default to global, N = 2 ranks x micro batch 4 x 2 rows, every step."""
    run_dir = launched / "ft2"
    records = train_records(run_dir)
    assert sorted(records) == [1, 2, 3]
    assert all(r["mpc_n"] == 2 * 4 * 2 and r["mpc_loss"] > 0 for r in records.values()), records
