"""af-benchmark-train: the MFU FLOP formula against PyTorch's FLOP counter, and a CPU smoke run of the tool."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from af_train.config import Recipe
from af_train.model import AudioFormerConfig, RoFormerEncoder, save_encoder
from af_train.objectives import build_training_module
from af_train.run_logging import training_flops_per_token

REPO = Path(__file__).resolve().parents[2]
SEQ, BATCH, MASKED = 32, 2, 8  # 8 of 32 positions masked per row: mask rate exactly 0.25


def _recipe(mode: str, rows: list[int], frozen: list[str]) -> Recipe:
    objective = {"mode": mode, **({"frozen_row_checkpoints": frozen} if frozen else {})}
    return Recipe.from_dict({
        "data": {"train": "unused", "code_rows": rows, "max_length": SEQ, "mask_rate": MASKED / SEQ},
        "model": {"preset": "tiny", "kernels": "reference", "hidden_dropout_prob": 0.0},
        "objective": objective,
    })


def _batch(rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1024, (BATCH, rows, SEQ), generator=g)
    labels = torch.full_like(ids, -100)
    for b in range(BATCH):
        for r in range(rows):
            where = torch.randperm(SEQ, generator=g)[:MASKED]
            labels[b, r, where] = ids[b, r, where]
    return {"input_ids": ids, "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long), "mlm_labels": labels,
            "labels": torch.randint(0, 2, (BATCH, 5), generator=g).float()}


@pytest.mark.parametrize("mode", ["pretrain", "ft1", "ft2"])
def test_mfu_flop_formula_matches_torch_flop_counter(mode, tmp_path):
    """The engine's model-FLOP formula (what MFU divides by) against FLOPs counted op by op.

    SDPA runs its math backend so that the attention products are visible to the counter as matmuls;
    the classifier and the MPC similarity (tiny here) are the only matmuls the formula leaves out.
    """
    rows = [0, 1, 2, 3] if mode == "ft2" else [0]
    frozen = []
    if mode == "ft2":
        for row in rows[1:]:
            frozen.append(str(save_encoder(RoFormerEncoder(AudioFormerConfig.preset("tiny")),
                                           tmp_path / f"row{row}.pt", code_row=row)))
    recipe = _recipe(mode, rows, frozen)
    torch.manual_seed(0)
    module = build_training_module(recipe, num_classes=5, multi_label=True).train()
    batch = _batch(len(rows))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(batch)["loss"].backward()
    counted = counter.get_total_flops()
    tokens = int(batch["attention_mask"].sum()) * len(rows)  # as the engine counts them: real tokens x rows
    config = module.encoder.config
    formula = training_flops_per_token(recipe, config, SEQ, config.vocab_size) * tokens
    assert counted > 0
    assert formula == pytest.approx(counted, rel=2e-3), (mode, formula, counted, formula / counted)


def test_cpu_smoke_run_writes_results(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / ".wtpath"),
                                                        os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    argv = ["--device", "cpu", "--preset", "tiny", "--seq-len", "32", "--micro-batch", "4", "--steps", "2",
            "--warmup", "1", "--rounds", "2", "--mode", "pretrain", "ft1", "--out", str(out)]
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark_train.py"), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["mode"], r["impl"]) for r in rows] == [
        ("pretrain", "af_train"), ("pretrain", "hf_roformer"), ("ft1", "af_train"), ("ft1", "hf_roformer")]
    for r in rows:
        assert r["status"] == "ok" and r["steps"] == "2"
        # full-length clips, one code row: every step moves micro batch x seq len real tokens
        assert float(r["tokens_per_s"]) * float(r["step_ms"]) / 1e3 == pytest.approx(4 * 32, rel=1e-4)
        assert float(r["samples_per_s"]) * float(r["step_ms"]) / 1e3 == pytest.approx(4, rel=1e-4)
        phases = sum(float(r[f"{p}_ms"]) for p in ("data", "forward", "backward", "optimizer", "other"))
        assert phases == pytest.approx(float(r["step_ms"]), rel=1e-4)
        assert float(r["forward_ms"]) > 0 and float(r["backward_ms"]) > 0 and float(r["optimizer_ms"]) > 0
        assert r["mfu"] == ""  # no peak FLOP/s for a CPU unless --peak-flops is given
    assert all(float(r["ratio_to_baseline"]) == 1.0 for r in rows if r["impl"] == "hf_roformer")
    result = json.loads((out / "train.json").read_text())
    meta = result["meta"]
    assert meta["device_kind"] == "cpu" and meta["argv"] == argv
    assert len(meta["git"]["commit"]) == 40 and meta["date_utc"]
    assert meta["versions"]["torch"] and meta["versions"]["deepspeed"] and meta["versions"]["transformers"]
    # every implementation ran under the identical DeepSpeed config, recorded once per mode
    assert result["modes"]["pretrain"]["deepspeed_config"]["zero_optimization"]["stage"] == 2
    assert len(result["modes"]["ft1"]["steps"]["af_train"]) == 2
    assert (out / "train.png").stat().st_size > 10_000
