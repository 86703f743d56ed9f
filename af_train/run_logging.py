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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from af_train import distributed
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


# --------------------------------------------------------------------------------------------------
# The Trainer's logging component: process logging, metric windows, per-step records, sample ids
# --------------------------------------------------------------------------------------------------


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings only on the others; every line names its rank."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)


@dataclass
class StepResult:
    """What one optimizer step reports (``Trainer.train_step``), summed over every rank."""

    loss: float  # sum over terms of (global sum / global count) x weight (NaN when a micro batch was non-finite)
    logs: dict[str, float]
    applied: bool
    nonfinite: bool
    samples: int
    tokens: int
    padded_tokens: int
    stop_requested: bool


class StepTotals:
    """What one optimizer step sums over its micro batches, on the device in float64 (no host sync), then
    sums over every rank by name in one small all-reduce (``result``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.zero = torch.zeros((), dtype=torch.float64, device=device)
        self.loss, self.nonfinite, self.tokens = self.zero.clone(), self.zero.clone(), self.zero.clone()
        self.samples = self.padded_tokens = self.micro_batches = 0
        self.terms: dict[str, torch.Tensor] = {}  # loss terms, already divided by their global counts
        self.logs: dict[str, torch.Tensor] = {}  # the other per-micro-batch logs (counts, N): averaged

    def add(self, batch: dict[str, Any], loss: torch.Tensor, finite: torch.Tensor, terms: dict[str, torch.Tensor],
            logs: dict[str, torch.Tensor]) -> None:
        """Count one micro batch: its loss, whether it was finite, its normalised ``terms`` and ``logs``."""
        self.micro_batches += 1
        self.nonfinite += (~finite).double()
        self.loss += loss.detach().double()
        for name, value in terms.items():
            self.terms[name] = self.terms.get(name, self.zero) + value.detach().double()
        for name, value in logs.items():
            if name not in terms:
                self.logs[name] = self.logs.get(name, self.zero) + value.detach().double().to(self.device)
        mask, rows = batch["attention_mask"], int(batch["input_ids"].shape[1])
        self.samples += int(mask.shape[0])
        self.tokens += mask.sum().double() * rows
        self.padded_tokens += int(mask.numel()) * rows

    def result(self, applied: bool, stop_requested: bool, skip_means_nonfinite: bool) -> StepResult:
        """Collective: the step's ``StepResult`` over every rank. ``skip_means_nonfinite``: a skipped update
        can only come from a non-finite gradient (no fp16 loss scaling)."""
        totals = distributed.sum_over_ranks({
            "samples": self.samples, "padded_tokens": self.padded_tokens, "stop_requested": float(stop_requested),
            "tokens": self.tokens, "nonfinite": self.nonfinite, "loss": self.loss,
            **{f"log/{name}": self.logs[name] for name in sorted(self.logs)},
            **{f"term/{name}": self.terms[name] for name in sorted(self.terms)},
        }, self.device)
        count = self.micro_batches * distributed.world_size()  # every rank's micro batches: logs are their mean
        logs = {name.removeprefix("log/"): value / count for name, value in totals.items() if name.startswith("log/")}
        logs.update((name.removeprefix("term/"), value) for name, value in totals.items() if name.startswith("term/"))
        return StepResult(
            loss=totals["loss"], logs=logs, applied=applied,
            nonfinite=totals["nonfinite"] > 0 or (not applied and skip_means_nonfinite),
            samples=int(totals["samples"]), tokens=int(totals["tokens"]), padded_tokens=int(totals["padded_tokens"]),
            stop_requested=totals["stop_requested"] > 0,
        )


class MetricWindow:
    """Sums over the steps since the last log line; ``record`` turns them into one metrics record."""

    def __init__(self) -> None:
        self.steps = 0
        self.applied = 0
        self.loss = 0.0
        self.logs: dict[str, float] = {}
        self.samples = self.tokens = 0
        self.seconds = 0.0

    def add(self, result: StepResult, seconds: float) -> None:
        """Count one step; only applied, finite steps enter the means."""
        self.steps += 1
        self.samples += result.samples
        self.tokens += result.tokens
        self.seconds += seconds
        if result.applied and math.isfinite(result.loss):
            self.applied += 1
            self.loss += result.loss
            for k, v in result.logs.items():
                self.logs[k] = self.logs.get(k, 0.0) + v

    def mean_loss(self) -> float:
        return self.loss / self.applied if self.applied else float("nan")

    def mean_logs(self) -> dict[str, float]:
        return {k: v / self.applied for k, v in self.logs.items()} if self.applied else {}

    def record(self, progress: Any, lr: float, grad_norm: Any, device: torch.device, flops_per_token: float,
               peak_flops: float | None, world_size: int) -> dict[str, Any]:
        """The ``metrics.jsonl`` record of this window at ``progress`` (MFU only with a known peak)."""
        p = progress
        record: dict[str, Any] = {
            "step": p.step, "samples": p.samples, "tokens": p.tokens, "epoch": p.epoch,
            "loss": self.mean_loss(), **self.mean_logs(),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "skipped_steps": p.skipped_steps, "nonfinite_steps": p.nonfinite_steps,
            "samples_per_s": self.samples / self.seconds,
            "tokens_per_s": self.tokens / self.seconds,
            "step_time_s": self.seconds / self.steps,
            "memory_gb": memory_gb(device),
        }
        if peak_flops is not None:
            record["mfu"] = flops_per_token * self.tokens / self.seconds / (peak_flops * world_size)
        return record


def log_step_line(record: dict[str, Any], max_steps: int) -> None:
    """One INFO line per logged step (for batch jobs, where the progress bar does not redraw)."""
    grad_norm = record["grad_norm"]
    log.info("step %d/%d loss %.4f lr %.3g grad_norm %s %.1f samples/s%s", record["step"], max_steps, record["loss"],
             record["lr"], "n/a" if grad_norm is None else f"{grad_norm:.3g}", record["samples_per_s"],
             f" MFU {record['mfu']:.1%}" if "mfu" in record else "")


def progress_bar(enabled: bool, total: int, initial: int) -> Any:
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                mininterval=1.0 if interactive else 30.0, desc="train")


class SampleIdLog:
    """``<run>/sample_ids/rank_NNNNN.jsonl``: the clip ids each step drew on this rank (``train.record_sample_ids``).

    On resume, records after the resumed step are dropped: the resumed run writes those steps again.
    A disabled log (``enabled=False``) accepts every call and writes nothing.
    """

    def __init__(self, run_dir: Path, rank: int, enabled: bool, resume_step: int | None):
        self._file = None
        if not enabled:
            return
        directory = run_dir / "sample_ids"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"rank_{rank:05d}.jsonl"
        if resume_step is not None and path.is_file():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and _record_step(line) <= resume_step]
            atomic_write(path, "".join(f"{line}\n" for line in kept))
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the run; close() closes it

    def write(self, step: int, ids: list[str]) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"step": step, "ids": list(ids)}) + "\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def sync(self) -> None:
        """Flush and fsync: the records up to a checkpoint must survive a later kill -9."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return 1 << 62  # unreadable (cut by a kill -9): dropped


def write_run_files(trainer: Any, resume_from: Path | None) -> None:
    """Rank 0: ``config.yaml`` (resolved recipe), ``ds_config.json``, and the run summary in the log and
    TensorBoard. ``trainer``: the engine's Trainer (recipe, run_dir, plan, device, ranks, parameter
    counts, FLOPs, data and logger are read from it)."""
    t, recipe, cfg = trainer, trainer.recipe, trainer.recipe.train
    t.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(t.run_dir / "config.yaml",
                 f"# resolved recipe (hash {recipe.hash()}) from {recipe.source}\n" + recipe.to_yaml())
    atomic_write(t.run_dir / "ds_config.json", json.dumps(t.ds_config, indent=2) + "\n")
    summary = [
        f"af_train run in {t.run_dir}",
        f"  device {t.device} x {t.world_size} ranks ({distributed.backend()}), kernels {recipe.model.kernels}",
        f"  {t.plan.describe()}",
        f"  ZeRO stage {cfg.zero_stage}, {cfg.precision}, offload_optimizer={cfg.offload_optimizer}",
        f"  parameters: {t.trainable_params:,} trainable, {t.frozen_params:,} frozen",
        f"  model FLOPs per real token (fwd+bwd, all rows; MFU ignores padding): {t.flops_per_token:.3e}; "
        f"{t.peak_note}",
        f"  data: {t.train_loader.dataset.size} training clips, {t.manifest.num_classes} classes "
        f"({'multi-label' if t.manifest.multi_label else 'single-label'})",
        f"  resume: {resume_from if resume_from is not None else 'fresh start'}",
    ]
    if cfg.allow_test_selection and (cfg.best_metric or "").startswith("test/"):
        summary.append(f"  WARNING: checkpoints are selected on the test split ({cfg.best_metric}),"
                       " allowed by train.allow_test_selection")
    for line in summary:
        log.info(line)
    t.logger.text("run", "\n".join(summary))


def write_final_metrics(final: Path, progress: Any, checkpoint: Path, tested: str | None,
                        metrics: dict[str, float]) -> None:
    """Rank 0: ``<run>/final/metrics.json``: counters, the last checkpoint, the best, the tested one, metrics."""
    summary = {"step": progress.step, "samples": progress.samples, "tokens": progress.tokens,
               "checkpoint": str(checkpoint), "best": progress.best, "test_checkpoint": tested, **metrics}
    atomic_write(final / "metrics.json", json.dumps(summary, indent=2) + "\n")
    log.info("finished at step %d; weights in %s", progress.step, final / "model.pt")
