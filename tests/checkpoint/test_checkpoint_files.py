"""af_train.checkpoint.files in one process, without DeepSpeed: naming, verification, fallback to an
intact checkpoint, retention and consolidation with the weight average."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import xxhash

from af_train.checkpoint.files import (
    BEST,
    EMA_KEY,
    LATEST,
    MARKER,
    META,
    UNIVERSAL_SUFFIX,
    CheckpointError,
    consolidated_state,
    describe_files,
    load_rank_state,
    newest_intact,
    prune,
    rank_file,
    read_weight_average,
    resolve_resume,
    step_of,
    tag_for,
    verify,
)
from af_train.checkpoint.manager import CheckpointManager
from af_train.config import Recipe
from af_train.ema import EMA

FILES = {"mp_rank_00_model_states.pt": b"model states " * 50, "af_state/rank_00000.pt": b"rank zero state",
         "zero_pp_rank_0_optim_states.pt": bytes(range(256)) * 8}


def write_checkpoint(root: Path, step: int, files: dict[str, bytes] = FILES, record: bool = True) -> Path:
    """A complete checkpoint whose meta records each file's size and xxh64 (computed here with xxhash)."""
    path = root / f"step_{step:08d}"
    recorded = {}
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
        recorded[name] = {"size": len(data), "xxh64": xxhash.xxh64(data).hexdigest()}
    meta = {"step": step, "zero_stage": 0, **({"files": recorded} if record else {})}
    (path / META).write_text(json.dumps(meta))
    (path / MARKER).write_text("complete\n")
    return path


def test_tags_name_steps_and_nothing_else():
    assert tag_for(42) == "step_00000042" and step_of("step_00000042") == 42
    assert step_of(tag_for(123456789)) == 123456789  # more than 8 digits still parse
    for other in ("step_42", "step_00000042_universal", "latest", "best", "step_0000004x"):
        assert step_of(other) is None, other


def test_describe_files_records_size_and_xxh64_of_every_file_but_meta_and_marker(tmp_path):
    path = write_checkpoint(tmp_path, 1)
    described = describe_files(path, rank=0, world_size=1)
    assert described == {name: {"size": len(data), "xxh64": xxhash.xxh64(data).hexdigest()}
                         for name, data in sorted(FILES.items())}


def test_verify_names_the_damaged_file(tmp_path):
    path = write_checkpoint(tmp_path, 1)
    assert verify(path) is None
    shard = path / "zero_pp_rank_0_optim_states.pt"
    shard.write_bytes(FILES["zero_pp_rank_0_optim_states.pt"][:100])  # truncated
    problem = verify(path)
    assert str(shard) in problem and "100 bytes" in problem and "2048 were recorded" in problem
    flipped = bytearray(FILES["zero_pp_rank_0_optim_states.pt"])
    flipped[7] ^= 1
    shard.write_bytes(bytes(flipped))  # same size, other contents: only the hash sees it
    assert str(shard) in verify(path) and "xxh64" in verify(path)
    assert verify(path, hashes=False) is None
    shard.unlink()
    assert verify(path, hashes=False) == f"checkpoint {path} is damaged: {shard} is missing"


def test_verify_reports_an_unreadable_meta_and_accepts_one_without_file_records(tmp_path):
    old = write_checkpoint(tmp_path, 1, record=False)  # saved by an af_train that recorded no files
    assert verify(old) is None
    broken = write_checkpoint(tmp_path, 2)
    (broken / META).write_text('{"step": 2, "files"')
    assert "cannot be read" in verify(broken) and "damaged" in verify(broken)


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    write_checkpoint(root, 10)
    write_checkpoint(root, 20)
    newest = write_checkpoint(root, 30)
    (root / LATEST).write_text("step_00000030\n")
    (newest / "mp_rank_00_model_states.pt").write_bytes(b"cut")
    with caplog.at_level(logging.WARNING, logger="af_train.checkpoint.files"):
        assert resolve_resume("auto", tmp_path) == root / "step_00000020"
    assert "mp_rank_00_model_states.pt has 3 bytes" in caplog.text
    with pytest.raises(CheckpointError, match="resume from an earlier checkpoint"):
        resolve_resume(str(newest), tmp_path)  # named explicitly: refused, not replaced
    for step in (10, 20):
        (root / tag_for(step) / "af_state" / "rank_00000.pt").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint in .*rank_00000.pt is missing"):
        newest_intact(root)


def test_prune_keeps_the_last_k_the_best_and_newer_partial_saves(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        write_checkpoint(root, step)
    (root / f"step_00000020{UNIVERSAL_SUFFIX}").mkdir()  # the universal form of a pruned checkpoint goes too
    (root / f"step_00000040{UNIVERSAL_SUFFIX}").mkdir()
    (root / "step_00000025").mkdir()  # partial, older than the newest complete one: garbage
    (root / "step_00000050").mkdir()  # partial, newer: a save in progress elsewhere, kept
    (root / BEST).write_text(json.dumps({"tag": "step_00000010", "value": 0.5}))
    prune(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "step_00000010", "step_00000030", "step_00000040", f"step_00000040{UNIVERSAL_SUFFIX}", "step_00000050"]


def test_consolidated_weights_carry_the_weight_average_from_rank_zero(tmp_path):
    module = torch.nn.Linear(3, 2)
    ema = EMA(module, decay=0.5)
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.update(module)  # average = old weight + 0.5
    path = tmp_path / "step_00000001"
    (path / "af_state").mkdir(parents=True)
    trained = {k: v.detach().to(torch.bfloat16) for k, v in module.state_dict().items()}
    torch.save({"module": trained}, path / "mp_rank_00_model_states.pt")
    (path / META).write_text(json.dumps({"zero_stage": 0}))
    torch.save({"rng": None, EMA_KEY: ema.state_dict()}, rank_file(path, 0))

    raw = consolidated_state(path, raw=True)
    assert {k: v.dtype for k, v in raw.items()} == {"weight": torch.float32, "bias": torch.float32}
    assert torch.equal(raw["weight"], trained["weight"].float())
    averaged = consolidated_state(path)  # every trainable tensor is the average's, in float32
    assert all(torch.equal(averaged[name], ema.shadow[name]) for name in ("weight", "bias"))
    assert not torch.equal(averaged["weight"], raw["weight"])

    torch.save({"rng": None}, rank_file(path, 0))  # a run without train.ema_decay
    assert read_weight_average(path) is None
    assert torch.equal(consolidated_state(path)["weight"], raw["weight"])


def test_a_missing_rank_file_says_why(tmp_path):
    with pytest.raises(CheckpointError, match="rank_00003.pt is missing: the checkpoint was saved with fewer ranks"):
        load_rank_state(tmp_path, 3)


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / tag_for(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (path / META).write_text(json.dumps({"step": step}))
        (path / MARKER).write_text("complete\n")
    return path


def test_latest_and_resume_resolution_skip_incomplete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    assert resolve_resume("auto", tmp_path) is None
    _fake_checkpoint(root, 10)
    _fake_checkpoint(root, 20)
    _fake_checkpoint(root, 30, complete=False)  # a crash mid-save
    (root / LATEST).write_text("step_00000030\n")  # even a stale pointer is not trusted blindly
    assert resolve_resume("auto", tmp_path) == root / "step_00000020"
    assert resolve_resume(str(root / "step_00000010"), tmp_path) == root / "step_00000010"
    assert resolve_resume(str(tmp_path), tmp_path / "other") == root / "step_00000020"
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        resolve_resume(str(root / "step_00000030"), tmp_path)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        resolve_resume("none", tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        resolve_resume(str(tmp_path / "missing"), tmp_path)


def test_retention_keeps_last_k_and_the_best(tmp_path):
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(Recipe.from_dict({"train": {"keep_last": 2, "best_mode": "max"}}), tmp_path, rank=0,
                                world_size=1)
    for step in (10, 20, 30):
        _fake_checkpoint(root, step)
    manager.mark_best(10, "val/mAP", 0.7)
    _fake_checkpoint(root, 25, complete=False)  # older than the newest complete one: garbage
    _fake_checkpoint(root, 40)
    prune(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000010", "step_00000030", "step_00000040"]
    assert manager.is_better(0.8) and not manager.is_better(0.6)
    assert not CheckpointManager(Recipe.from_dict({"train": {"best_mode": "min"}}), tmp_path, 0, 1).is_better(0.8)
