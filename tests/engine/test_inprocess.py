"""The Trainer in this process as a 1-rank DeepSpeed job: RNG-exact resume, NaN skipping, crash mid-save."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from engine_helpers import TINY, base_overrides, single_process_rank
from torch import nn

import af_train.checkpoint.manager
import af_train.objectives
from af_train.checkpoint.files import (
    MARKER,
    META,
    CheckpointError,
    is_complete,
    latest_complete,
    resolve_resume,
    verify,
)
from af_train.checkpoint.manager import CheckpointManager
from af_train.config import Recipe
from af_train.objectives import LossTerm
from af_train.run_logging import read_metrics


@pytest.fixture(scope="module")
def one_rank():
    with single_process_rank():
        yield


def make_trainer(data_root: Path, run_dir: Path, overrides: list[str], resume: str = "auto"):
    from af_train.engine import Trainer

    recipe = Recipe.load(TINY, base_overrides(data_root, run_dir) + overrides)
    return Trainer(recipe, resume=resume)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_resume_restores_dropout_rng_bit_for_bit(one_rank, data_root, tmp_path):
    overrides = ["model.hidden_dropout_prob=0.1", "train.max_steps=6", "train.save_every=3", "data.val=null"]
    first = make_trainer(data_root, tmp_path / "a", overrides)
    first.fit()
    first.close()
    second = make_trainer(data_root, tmp_path / "b", overrides, resume=str(tmp_path / "a/checkpoints/step_00000003"))
    assert second.progress.step == 3
    second.fit()
    second.close()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == [4, 5, 6]
    assert all(a[s] == b[s] for s in (4, 5, 6)), (a, b)


def test_mfu_counts_the_model_flops_of_real_tokens(one_rank, data_root, tmp_path):
    trainer = make_trainer(data_root, tmp_path / "mfu", ["train.max_steps=3", "train.save_every=0", "data.val=null",
                                                         "train.peak_flops=1e9"])
    trainer.fit()
    trainer.close()
    records = [r for r in read_metrics(tmp_path / "mfu") if "loss" in r]
    assert len(records) == 3
    previous = 0
    for r in records:
        step_tokens = r["tokens"] - previous
        previous = r["tokens"]
        # real tokens only: at most a full global batch of max_length (32) positions
        assert 0 < step_tokens <= trainer.plan.global_batch * 32
        assert r["mfu"] == pytest.approx(trainer.flops_per_token * r["tokens_per_s"] / 1e9, rel=1e-9)


class NaNAtCalls(nn.Module):
    """Wraps a training module; its loss is NaN on the given forward calls. Snapshots weights per call."""

    def __init__(self, inner: nn.Module, bad_calls: set[int] | None = None, bad_from: int | None = None):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "encoder", inner.encoder)  # what the engine reads (not a second submodule)
        self.bad_calls, self.bad_from = bad_calls or set(), bad_from
        self.calls = 0
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def forward(self, batch):
        self.calls += 1
        self.snapshots[self.calls] = {k: v.detach().float().clone() for k, v in self.inner.state_dict().items()}
        out = self.inner(batch)
        if self.calls in self.bad_calls or (self.bad_from is not None and self.calls >= self.bad_from):
            nan_terms = {name: LossTerm(term.total * float("nan"), term.count_key, term.weight)
                         for name, term in out["terms"].items()}
            out = {**out, "loss": out["loss"] * float("nan"), "terms": nan_terms}
        return out

    def loss_counts(self, batch):
        return self.inner.loss_counts(batch)


def _base_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) or hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


@pytest.mark.parametrize("zero_stage,precision", [(0, "fp32"), (2, "bf16")])
def test_nonfinite_loss_skips_the_step_and_too_many_stop_the_run(one_rank, data_root, tmp_path, monkeypatch,
                                                                  zero_stage, precision):
    from af_train.engine import TrainingStopped

    wrappers = []
    build = af_train.objectives.build_training_module

    def build_with_nans(*args, **kwargs):
        # 2 micro batches per step: step 2 has one bad micro batch, steps 4, 5, 6 are all bad.
        wrappers.append(NaNAtCalls(build(*args, **kwargs), bad_calls={4}, bad_from=7))
        return wrappers[-1]

    monkeypatch.setattr(af_train.objectives, "build_training_module", build_with_nans)
    run_dir = tmp_path / "nan"
    trainer = make_trainer(data_root, run_dir, [
        "train.max_steps=50", "train.grad_accum_steps=2", "train.max_nonfinite_steps=3", "data.val=null",
        f"train.zero_stage={zero_stage}", f"train.precision={precision}", "train.save_every=0"])
    with pytest.raises(TrainingStopped, match="max_nonfinite_steps=3"):
        trainer.fit()
    wrapper = wrappers[0]
    after_step = {step: wrapper.snapshots[2 * step + 1] for step in range(1, 6)}  # weights entering step+1
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(after_step[1], after_step[2])  # step 2 skipped: no parameter change
    assert not same(after_step[2], after_step[3])  # step 3 applied
    assert same(after_step[3], after_step[5])  # steps 4, 5 skipped
    # the optimizer and the lr schedule advanced only for the two applied steps
    base = _base_optimizer(trainer.engine)
    assert {int(s["step"]) for s in base.state.values()} == {2}
    assert trainer.lr_scheduler.last_epoch == 2
    p = trainer.progress
    assert (p.step, p.nonfinite_steps, p.skipped_steps, p.consecutive_nonfinite) == (6, 4, 4, 3)
    # the stop left a complete checkpoint and a log record that says what happened
    assert latest_complete(run_dir / "checkpoints").name == "step_00000006"
    last = [r for r in read_metrics(run_dir) if "loss" in r][-1]
    assert last["step"] == 6 and last["nonfinite_steps"] == 4
    trainer.close()


def test_crash_during_save_keeps_previous_checkpoint(one_rank, data_root, tmp_path, monkeypatch):
    run_dir = tmp_path / "crash"
    overrides = ["train.max_steps=4", "train.save_every=2", "data.val=null"]
    trainer = make_trainer(data_root, run_dir, overrides)
    real_write = af_train.checkpoint.manager.atomic_write

    def crash_on_second_marker(path, text):
        if path.name == MARKER and path.parent.name == "step_00000004":
            raise OSError("simulated crash while saving")
        real_write(path, text)

    monkeypatch.setattr(af_train.checkpoint.manager, "atomic_write", crash_on_second_marker)
    with pytest.raises(OSError, match="simulated crash"):
        trainer.fit()
    trainer.close()
    monkeypatch.setattr(af_train.checkpoint.manager, "atomic_write", real_write)
    root = run_dir / "checkpoints"
    assert (root / "step_00000004" / "mp_rank_00_model_states.pt").is_file()  # DeepSpeed's files were written
    assert not is_complete(root / "step_00000004")
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert resolve_resume("auto", run_dir) == root / "step_00000002"
    crashed_losses = losses(run_dir)

    resumed = make_trainer(data_root, run_dir, overrides)
    assert resumed.progress.step == 2 and resumed.progress.samples == 2 * 4
    resumed.fit()
    resumed.close()
    assert is_complete(root / "step_00000004")
    assert losses(run_dir) == crashed_losses  # steps 3-4 replayed identically
    meta = json.loads((root / "step_00000004" / "af_meta.json").read_text())
    assert meta["progress"]["step"] == 4 and meta["recipe_hash"] == resumed.recipe.hash()


@pytest.mark.parametrize("zero_stage", [1, 2])  # DeepSpeed keeps frozen parameters out of ZeRO-1 checkpoints
def test_ft2_trains_only_the_trainable_row_and_consolidates_frozen_encoders(one_rank, data_root, tmp_path,
                                                                            zero_stage):
    from af_train.model import AudioFormerConfig, RoFormerEncoder, save_encoder

    frozen_paths = []
    for row in (1, 2, 3):
        torch.manual_seed(row)
        path = tmp_path / f"row{row}.pt"
        save_encoder(RoFormerEncoder(AudioFormerConfig.preset("tiny")), path, code_row=row)
        frozen_paths.append(str(path))
    run_dir = tmp_path / "ft2"
    trainer = make_trainer(data_root, run_dir, [
        "objective.mode=ft2", "data.code_rows=[0,1,2,3]",
        f"objective.frozen_row_checkpoints=[{','.join(frozen_paths)}]",
        "train.max_steps=4", "train.save_every=0", f"train.zero_stage={zero_stage}", "train.best_metric=val/mAP"])
    assert trainer.frozen_params == 3 * sum(
        p.numel() for p in RoFormerEncoder(AudioFormerConfig.preset("tiny")).parameters())
    metrics = trainer.fit()
    trainer.close()
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert all("mpc_loss" in r and "cls_loss" in r for r in records)
    assert all(r["mpc_n"] == 4 * 4 for r in records)  # micro batch 4 x 4 code rows (1 rank: local = global)
    assert "val/mAP" in metrics and "val/mpc_loss" in metrics
    state = torch.load(run_dir / "final" / "model.pt", weights_only=True)["state_dict"]
    for index, path in enumerate(frozen_paths):
        original = torch.load(path, weights_only=True)["state_dict"]
        for name, tensor in original.items():
            assert torch.equal(state[f"frozen_encoders.{index}.{name}"], tensor), name  # untouched, consolidated
    initial = torch.load(frozen_paths[0], weights_only=True)["state_dict"]  # same shapes as the trainable row
    assert set(f"encoder.{k}" for k in initial) <= set(state)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_test_split_is_scored_with_the_checkpoint_selected_on_validation(one_rank, data_root, tmp_path,
                                                                          monkeypatch, zero_stage):
    from af_train.evaluate import main as evaluate_main

    # Only the first validation counts as an improvement: the selected checkpoint is step 2, not the last.
    verdicts = iter([True])
    monkeypatch.setattr(CheckpointManager, "is_better", lambda self, value: next(verdicts, False))
    run_dir = tmp_path / "ft1"
    trainer = make_trainer(data_root, run_dir, [
        "objective.mode=ft1", f"data.test={data_root / 'test'}", "train.max_steps=4", "train.eval_every=2",
        "train.save_every=2", "train.keep_last=1", f"train.zero_stage={zero_stage}", "train.best_metric=val/mAP"])
    metrics = trainer.fit()
    trainer.close()
    final = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert final["best"]["step"] == 2 and final["test_checkpoint"] == "step_00000002"
    assert final["test/mAP"] == metrics["test/mAP"]
    # an independent single-process evaluation of that checkpoint gives the same test metrics
    selected = run_dir / "checkpoints" / "step_00000002"
    out = tmp_path / "eval.json"
    assert evaluate_main([str(run_dir), "--split", "test", "--out", str(out), "--checkpoint", str(selected)]) == 0
    standalone = json.loads(out.read_text())
    assert standalone["test/mAP"] == pytest.approx(final["test/mAP"], abs=1e-5)


def _copy_split_as_other_tokenizer(src: Path, dst: Path) -> Path:
    """The same shards, with a manifest that says another tokenizer made them."""
    import shutil

    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["tokenizer"] = {"kind": "mel-rvq", "rows": 4, "codes": 1024, "sha256": "ab" * 32,
                             "file": "other.safetensors"}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_tokenizer_identity_is_recorded_and_mixing_tokenizers_is_refused(one_rank, data_root, tmp_path):
    from af_train.data.dataset import DataError
    from af_train.model.checkpoint import CheckpointError
    from af_train.shards import Manifest

    identity = Manifest.load(data_root / "train").tokenizer
    assert identity["kind"] == "encodec"  # a manifest without the field reads as the EnCodec its codec section names
    run_dir = tmp_path / "pre"
    trainer = make_trainer(data_root, run_dir, ["train.max_steps=2", "train.save_every=2", "data.val=null"])
    trainer.fit()
    trainer.close()
    meta = json.loads((run_dir / "checkpoints" / "step_00000002" / "af_meta.json").read_text())
    assert meta["tokenizer"] == identity
    weights = run_dir / "final" / "model.pt"
    assert torch.load(weights, weights_only=True)["tokenizer"] == identity

    other_val = _copy_split_as_other_tokenizer(data_root / "val", tmp_path / "val_other")
    with pytest.raises(DataError, match=r"data\.train .*and data\.val .*different tokenizers.*mel-rvq"):
        make_trainer(data_root, tmp_path / "mixed", ["train.max_steps=1", f"data.val={other_val}"])
    other_train = _copy_split_as_other_tokenizer(data_root / "train", tmp_path / "train_other")
    for overrides in (["objective.mode=ft1", f"objective.init_checkpoint={weights}"],
                      [f"objective.init_checkpoint={weights}"]):
        with pytest.raises(CheckpointError, match=r"objective\.init_checkpoint .*model\.pt.*training data.*encodec"):
            make_trainer(data_root, tmp_path / "ft", ["train.max_steps=1", "data.val=null",
                                                      f"data.train={other_train}", *overrides])
    # resuming a checkpoint on shards of another tokenizer is refused too
    with pytest.raises(CheckpointError, match=r"checkpoint .*step_00000002.*training data"):
        make_trainer(data_root, run_dir, ["train.max_steps=4", "data.val=null", f"data.train={other_train}"])


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_damaged_newest_checkpoint_falls_back_naming_the_file(one_rank, data_root, tmp_path):
    run_dir = tmp_path / "damaged"
    overrides = ["train.max_steps=4", "train.save_every=2", "data.val=null", "train.zero_stage=2"]
    trainer = make_trainer(data_root, run_dir, overrides)
    trainer.fit()
    trainer.close()
    root = run_dir / "checkpoints"
    newest, previous = root / "step_00000004", root / "step_00000002"
    recorded = json.loads((newest / META).read_text())["files"]
    assert "af_state/rank_00000.pt" in recorded and any(name.endswith("optim_states.pt") for name in recorded)
    assert verify(newest) is None and resolve_resume("auto", run_dir) == newest
    records = _Records()
    logging.getLogger("af_train.checkpoint.files").addHandler(records)
    try:
        # half of the optimizer shard cut off (disk damage after a complete save)
        shard = next(newest.glob("*optim_states.pt"))
        intact = shard.read_bytes()
        shard.write_bytes(intact[: len(intact) // 2])
        assert resolve_resume("auto", run_dir) == previous
        assert any(str(shard) in m and "bytes" in m for m in records.messages), records.messages
        with pytest.raises(CheckpointError, match=f"{shard}.*bytes"):
            resolve_resume(str(newest), run_dir)
        shard.write_bytes(intact)
        # one flipped bit, same size: only the hash sees it
        weights = newest / "mp_rank_00_model_states.pt"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x10
        weights.write_bytes(bytes(data))
        records.messages.clear()
        assert resolve_resume("auto", run_dir) == previous
        assert any(str(weights) in m and "xxh64" in m for m in records.messages), records.messages
        with pytest.raises(CheckpointError, match=f"{weights}.*xxh64"):
            resolve_resume(str(newest), run_dir)
        assert resolve_resume("auto", run_dir, hashes=False) == newest  # sizes only: not detected
    finally:
        logging.getLogger("af_train.checkpoint.files").removeHandler(records)
    resumed = make_trainer(data_root, run_dir, overrides)  # --resume auto: from the newest intact checkpoint
    assert resumed.progress.step == 2
    resumed.close()
