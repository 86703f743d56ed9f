"""What a run reports: ``metrics.jsonl`` + TensorBoard on rank 0, throughput, MFU and memory.

MFU = achieved model FLOP/s ÷ (peak FLOP/s per device × devices). Model FLOPs count the matmuls of
the encoders (training = 3 × forward for trainable encoders, 1 × forward for frozen FT2 rows) and
the attention score/value products at the padded sequence length; activation recomputation is not
counted (it is hardware FLOPs, not model FLOPs). Peak FLOP/s come from ``PEAK_FLOPS`` (dense, no
sparsity) or ``train.peak_flops``; the log states which was used. On CPU there is no table entry,
so MFU is left out unless ``train.peak_flops`` is set.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from af_train.files import atomic_write

log = logging.getLogger(__name__)

# Dense peak FLOP/s per device: (bf16/fp16 tensor cores, fp32 without TF32). Matched by substring of
# torch.cuda.get_device_name(), most specific first.
PEAK_FLOPS: list[tuple[str, float, float]] = [
    ("GB200", 2.5e15, 80e12),
    ("B200", 2.25e15, 80e12),
    ("H200", 989.4e12, 66.9e12),
    ("H100 PCIe", 756.5e12, 51.2e12),
    ("H100 NVL", 835.5e12, 60.0e12),
    ("H100", 989.4e12, 66.9e12),  # SXM
    ("H800", 989.4e12, 66.9e12),
    ("A100", 312e12, 19.5e12),
    ("A800", 312e12, 19.5e12),
    ("L40S", 362.1e12, 91.6e12),
    ("L40", 181.0e12, 90.5e12),
    ("L4", 121.0e12, 30.3e12),
    ("A10G", 70.0e12, 31.2e12),
    ("A10", 125.0e12, 31.2e12),
    ("RTX 4090", 165.2e12, 82.6e12),
    ("RTX 3090", 71.0e12, 35.6e12),
    ("V100", 125e12, 15.7e12),
    ("T4", 65e12, 8.1e12),
]


def peak_flops_per_device(device: torch.device, precision: str, override: float | None) -> tuple[float | None, str]:
    """(peak FLOP/s or None, a sentence saying where it came from)."""
    if override is not None:
        return override, f"peak {override:.3g} FLOP/s per device from train.peak_flops"
    if device.type != "cuda":
        return None, (f"MFU not computed: device is {device.type} (no peak FLOP/s table for it); "
                      "set train.peak_flops to report it")
    name = torch.cuda.get_device_name(device)
    for key, half, fp32 in PEAK_FLOPS:
        if key in name:
            peak = fp32 if precision == "fp32" else half
            kind = "fp32 (no TF32)" if precision == "fp32" else f"{precision} dense tensor-core"
            return peak, f"peak {peak / 1e12:.1f} TFLOP/s per device: {name}, {kind} (af_train.run_logging table)"
    return None, f"MFU not computed: '{name}' is not in the peak FLOP/s table; set train.peak_flops"


def encoder_forward_flops_per_token(hidden: int, layers: int, intermediate: int, seq_len: int) -> float:
    """Matmul FLOPs of one encoder forward per token: projections, FFN and attention products."""
    projections = 4 * hidden * hidden + 2 * hidden * intermediate
    attention = 2 * seq_len * hidden  # QK^T and AV, multiply-adds per token
    return layers * 2.0 * (projections + attention)


def training_flops_per_token(recipe: Any, encoder_config: Any, seq_len: int, vocab_size: int) -> float:
    """Model FLOPs (forward + backward) per real token of a batch, counted over all its code rows.

    MFU = this x real tokens/s / peak: padding is not useful work and is not counted. Attention is
    costed at a span of ``seq_len`` (an upper bound when batches are padded only to their longest
    clip). Trainable encoders cost 3x a forward, frozen FT2 row encoders 1x; the MLM head runs on
    the masked positions only (it gathers them first), i.e. on ``data.mask_rate`` of the tokens.
    """
    c = encoder_config
    per_token = encoder_forward_flops_per_token(c.hidden_size, c.num_hidden_layers, c.intermediate_size, seq_len)
    rows = len(recipe.data.code_rows)
    mode = recipe.objective.mode
    if mode == "pretrain":
        trainable_rows = rows if recipe.objective.joint_rows else 1
        head = 2.0 * (c.hidden_size * c.hidden_size + c.hidden_size * vocab_size)
        return 3.0 * trainable_rows * (per_token + recipe.data.mask_rate * head) / rows
    frozen_rows = rows - 1 if mode == "ft2" else 0
    return (3.0 + 1.0 * frozen_rows) * per_token / rows


def memory_gb(device: torch.device) -> float:
    """Peak accelerator memory (CUDA) or this process's resident memory (CPU), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss / 2**30
    except ImportError:  # pragma: no cover - psutil comes with deepspeed
        return float("nan")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


class RunLogger:
    """Rank 0 writes ``metrics.jsonl`` and TensorBoard events; other ranks hold a no-op logger."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run logged after the checkpoint we resume from
        self.writer = SummaryWriter(
            log_dir=str(run_dir / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1
        )

    def _truncate_after(self, step: int) -> None:
        """Keep only records up to ``step``: the resumed run logs the later steps again."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill -9
        atomic_write(self.path, "".join(f"{line}\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        step = int(record["step"])
        for key, value in clean.items():
            if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            tag = key if "/" in key else f"train/{key}"
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, 0)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (for tests, notebooks and plots)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
