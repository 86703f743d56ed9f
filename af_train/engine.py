"""The training engine: a ``Trainer`` with an explicit ``train_step`` on top of DeepSpeed ZeRO.

One ``Trainer`` per process (rank). ``fit()`` loops: draw ``grad_accum`` micro batches, run
``train_step`` (forward, backward and DeepSpeed's step per micro batch; the optimizer steps at the
accumulation boundary), log, evaluate, checkpoint. Everything else lives in small modules:
``ds_config`` (DeepSpeed config from the recipe), ``schedule`` (lr), ``checkpoint`` (complete-or-
ignored checkpoints, universal conversion), ``run_logging`` (metrics.jsonl, TensorBoard, MFU),
``evaluate`` (metrics over all ranks).

Non-finite losses: a micro batch whose loss is NaN/inf is back-propagated as NaN on purpose, so the
reduced gradient is non-finite on every rank and DeepSpeed's overflow check skips the optimizer step
everywhere at once (no parameter, optimizer-state or lr-schedule change). ZeRO-0 in fp32 has no
such check in DeepSpeed; ``_guard_plain_optimizer`` adds it. Skips are counted and logged;
``train.max_nonfinite_steps`` in a row stop the run with a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from af_train import checkpoint as ckpt
from af_train.config import Recipe, RecipeError
from af_train.ds_config import BatchPlan, build_ds_config, optimizer_groups, plan_batch
from af_train.evaluate import evaluate_module, move_batch
from af_train.run_logging import RunLogger, memory_gb, peak_flops_per_device, training_flops_per_token
from af_train.schedule import build_lr_scheduler

log = logging.getLogger("af_train.engine")

EXIT_NONFINITE = 3  # process exit code when too many non-finite steps stopped the run


class TrainingStopped(RuntimeError):
    """The run stopped early on purpose (non-finite steps); a checkpoint was written."""


@dataclass
class Progress:
    """Counters that make a run resumable (saved in every checkpoint)."""

    step: int = 0  # optimizer steps attempted (applied + skipped)
    samples: int = 0  # samples consumed, all ranks
    tokens: int = 0  # real (non-pad) tokens consumed, all ranks and rows
    epoch: int = 0
    skipped_steps: int = 0  # steps whose update was skipped (non-finite loss/gradients, fp16 overflow)
    nonfinite_steps: int = 0  # of those, skipped for a non-finite loss or gradient (not fp16 scaling)
    consecutive_nonfinite: int = 0
    best: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    loss: float  # mean over micro batches and ranks (NaN when a micro batch was non-finite)
    logs: dict[str, float]
    applied: bool
    nonfinite: bool
    samples: int
    tokens: int
    padded_tokens: int
    stop_requested: bool


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Builds everything from a recipe and trains; see the module docstring."""

    def __init__(self, recipe: Recipe, resume: str = "auto"):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from af_train.data import build_dataloader, setup_distributed_env
        from af_train.objectives import build_training_module
        from kernels.dispatch import set_backend

        self.recipe = recipe
        cfg = recipe.train
        self.run_dir = Path(cfg.run_dir)
        setup_distributed_env()
        accelerator = get_accelerator()
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        _setup_logging(self.rank)
        on_cpu = accelerator.device_name() == "cpu"
        local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if on_cpu and local_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            # N ranks x all cores each would oversubscribe the CPU many times over
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
        self.device = torch.device("cpu") if on_cpu else torch.device(accelerator.device_name(self.local_rank))
        if not on_cpu:
            accelerator.set_device(self.local_rank)
        set_backend(recipe.model.kernels)

        # -- where we resume from decides the DeepSpeed config (universal loading, batch plan) ----
        resume_from = self._agree(_capture(ckpt.resolve_resume, resume, self.run_dir) if self.rank == 0 else None)
        self.resume_meta = ckpt.read_meta(resume_from) if resume_from is not None else None
        keep_global = None
        universal = False
        if self.resume_meta is not None:
            universal, keep_global = self._check_resume_compatible(self.resume_meta, resume_from)
        self.plan: BatchPlan = plan_batch(recipe, self.world_size, keep_global_batch=keep_global)
        self.ds_config = build_ds_config(recipe, self.plan, on_cpu=on_cpu,
                                         fp16_supported=accelerator.is_fp16_supported(), load_universal=universal)

        # -- data ------------------------------------------------------------------------------
        mask = recipe.objective.mode == "pretrain"
        cache = str(self.run_dir / "cache")
        self.train_loader = build_dataloader(recipe.data, "train", self.plan.micro_batch, mask=mask,
                                             seed=cfg.seed, local_cache=cache)
        self.manifest = self.train_loader.dataset.manifest
        eval_batch = cfg.eval_batch_size or cfg.micro_batch_size
        self._eval_builders = {
            split: (lambda s=split: build_dataloader(recipe.data, s, eval_batch, mask=mask, seed=cfg.seed,
                                                     local_cache=cache))
            for split in ("val", "test")
            if getattr(recipe.data, split) is not None or (recipe.data.remote and split == "val")
        }
        self.eval_loaders: dict[str, Any] = dict.fromkeys(self._eval_builders)  # built on first use, reused
        if cfg.eval_every and "val" not in self.eval_loaders:
            raise RecipeError(f"train.eval_every={cfg.eval_every} needs data.val (the validation shards)")

        # -- model and DeepSpeed engine (same init on every rank, then per-rank dropout streams) ----
        seed_everything(cfg.seed)
        module = build_training_module(recipe, self.manifest.num_classes, self.manifest.multi_label)
        self.trainable_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
        self.frozen_params = sum(p.numel() for p in module.parameters() if not p.requires_grad)
        encoder_config = module.encoder.config
        self.flops_per_token = training_flops_per_token(recipe, encoder_config, recipe.data.max_length,
                                                        encoder_config.vocab_size)
        groups = optimizer_groups(module, recipe.optim.weight_decay)
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=module, model_parameters=groups, config=self.ds_config,
            lr_scheduler=lambda opt: build_lr_scheduler(opt, recipe.optim, cfg.max_steps),
        )
        if cfg.zero_stage == 0 and cfg.precision == "fp32":
            _guard_plain_optimizer(self.engine.optimizer)
        seed_everything(cfg.seed + 1000 * self.rank + 1)

        # -- state, checkpoints, logging ---------------------------------------------------------
        self.progress = Progress()
        self.checkpoints = ckpt.CheckpointManager(self.run_dir / "checkpoints", self.rank, cfg.keep_last, cfg.best_mode)
        self._stop_signal: int | None = None
        self._last_saved_step: int | None = None
        self._train_iter = None
        self._pending_rng: dict[str, Any] | None = None
        if resume_from is not None:
            self._load(resume_from, universal)
        self.start_step = self.progress.step
        self.logger = RunLogger(self.run_dir, self.rank == 0, self.start_step if resume_from is not None else None)
        self._ids_file = None
        if cfg.record_sample_ids:
            self._ids_file = self._open_ids_file(resume_from is not None)
        self.peak_flops, self.peak_note = peak_flops_per_device(self.device, cfg.precision, cfg.peak_flops)
        if self.rank == 0:
            self._write_run_files(resume_from)

    # ------------------------------------------------------------------------------------------
    # Setup helpers
    # ------------------------------------------------------------------------------------------
    def _agree(self, value: Any) -> Any:
        """Rank 0's value on every rank (so all ranks resume from the same checkpoint)."""
        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]

    def _check_resume_compatible(self, meta: dict[str, Any], path: Path) -> tuple[bool, int | None]:
        """(convert through the universal format?, global batch to keep or None)."""
        cfg = self.recipe.train
        saved_stage, saved_world = meta["zero_stage"], meta["world_size"]
        if (saved_stage == 3) != (cfg.zero_stage == 3):
            raise ckpt.CheckpointError(
                f"{path} was saved with ZeRO stage {saved_stage}; this run uses train.zero_stage={cfg.zero_stage}. "
                "Crossing between ZeRO-1/2 and ZeRO-3 is not supported by DeepSpeed's checkpoint conversion; "
                f"resume with train.zero_stage={saved_stage}, or start a new run from consolidated weights "
                "(objective.init_checkpoint=<run>/final/model.pt)"
            )
        if (saved_stage == 0) != (cfg.zero_stage == 0):
            raise ckpt.CheckpointError(
                f"{path} was saved with ZeRO stage {saved_stage}; this run uses train.zero_stage={cfg.zero_stage}. "
                f"Resume with train.zero_stage={saved_stage}"
            )
        if meta.get("recipe_hash") != self.recipe.hash() and self.rank == 0:
            changed = _changed_keys(meta.get("recipe", {}), self.recipe.to_dict())
            log.warning("resuming with a different recipe than %s was saved with; changed: %s", path,
                        ", ".join(changed) or "(unknown)")
        if saved_world == self.world_size:
            return False, None
        if saved_stage == 0:  # ZeRO-0 state is not partitioned: it loads at any world size as it is
            log.info("checkpoint %s was saved by %d ranks, resuming on %d: ZeRO-0 state is not partitioned, loading "
                     "it directly, keeping the global batch %d", path, saved_world, self.world_size,
                     meta["global_batch"])
            return False, meta["global_batch"]
        log.info("checkpoint %s was saved by %d ranks, resuming on %d: converting through DeepSpeed's universal "
                 "checkpoint, keeping the global batch %d", path, saved_world, self.world_size, meta["global_batch"])
        return True, meta["global_batch"]

    def _load(self, path: Path, universal: bool) -> None:
        meta = self.resume_meta
        load_path = ckpt.convert_to_universal(path, self.rank, self.checkpoints.root) if universal else path
        load_dir, tag = str(load_path.parent), load_path.name
        loaded, _ = self.engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise ckpt.CheckpointError(f"DeepSpeed could not load {load_path}")
        saved_world = meta["world_size"]
        state = ckpt.load_rank_state(load_path, self.rank % saved_world)
        if state.get("loader") is not None:
            self.train_loader.load_state_dict(state["loader"])
        if saved_world == self.world_size:
            # Restored after the first batch is drawn: starting a DataLoader iterator draws a seed from
            # the global RNG, which the uninterrupted run did at its start, not at this step.
            self._pending_rng = state["rng"]
        else:
            seed_everything(self.recipe.train.seed + 1000 * self.rank + 1 + meta["step"])
        p = meta["progress"]
        self.progress = Progress(**p)
        if path.parent.resolve() == self.checkpoints.root.resolve():
            self._last_saved_step = self.progress.step  # (a checkpoint of another run is not ours to reuse)
        log.info("resumed from %s at step %d (%d samples, epoch %d)", path, self.progress.step,
                 self.progress.samples, self.progress.epoch)

    def _open_ids_file(self, resumed: bool):
        directory = self.run_dir / "sample_ids"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"rank_{self.rank:05d}.jsonl"
        if resumed and path.is_file():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and _safe_step(line) <= self.start_step]
            path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        return open(path, "a", encoding="utf-8")

    def _write_run_files(self, resume_from: Path | None) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(
            f"# resolved recipe (hash {self.recipe.hash()}) from {self.recipe.source}\n" + self.recipe.to_yaml(),
            encoding="utf-8")
        (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2) + "\n", encoding="utf-8")
        summary = [
            f"af_train run in {self.run_dir}",
            f"  device {self.device} x {self.world_size} ranks ({dist.get_backend()}), "
            f"kernels {self.recipe.model.kernels}",
            f"  {self.plan.describe()}",
            f"  ZeRO stage {self.recipe.train.zero_stage}, {self.recipe.train.precision}, "
            f"offload_optimizer={self.recipe.train.offload_optimizer}",
            f"  parameters: {self.trainable_params:,} trainable, {self.frozen_params:,} frozen",
            f"  model FLOPs per real token (fwd+bwd, all rows; MFU ignores padding): {self.flops_per_token:.3e}; "
            f"{self.peak_note}",
            f"  data: {self.train_loader.dataset.size} training clips, {self.manifest.num_classes} classes "
            f"({'multi-label' if self.manifest.multi_label else 'single-label'})",
            f"  resume: {resume_from if resume_from is not None else 'fresh start'}",
        ]
        if self.recipe.train.allow_test_selection and (self.recipe.train.best_metric or "").startswith("test/"):
            summary.append(f"  WARNING: checkpoints are selected on the test split ({self.recipe.train.best_metric}),"
                           " allowed by train.allow_test_selection")
        for line in summary:
            log.info(line)
        self.logger.text("run", "\n".join(summary))

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------
    def _next_micro_batch(self) -> dict[str, Any]:
        empty_epochs = 0
        while True:
            if self._train_iter is None:
                self._train_iter = iter(self.train_loader)
            try:
                batch = next(self._train_iter)
                if self._pending_rng is not None:
                    ckpt.set_rng_state(self._pending_rng)
                    self._pending_rng = None
                return batch
            except StopIteration:
                self._train_iter = None
                self.progress.epoch += 1
                empty_epochs += 1
                if empty_epochs > 1:
                    raise RuntimeError(
                        f"the training split yields no batch of {self.plan.micro_batch} per rank on "
                        f"{self.world_size} ranks ({self.train_loader.dataset.size} clips); lower "
                        "train.micro_batch_size or add data") from None

    def train_step(self, micro_batches: list[dict[str, Any]]) -> StepResult:
        """One optimizer step over ``grad_accum`` micro batches (collective across ranks).

        Sums stay on the device (float64) so a step syncs with the host once, at the all-reduce.
        """
        engine = self.engine
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        loss_sum, nonfinite_local, tokens = zero.clone(), zero.clone(), zero.clone()
        log_sums: dict[str, torch.Tensor] = {}
        samples = padded = 0
        for batch in micro_batches:
            batch = move_batch(batch, self.device)
            out = engine(batch)
            loss = out["loss"]
            finite = torch.isfinite(loss.detach())
            # A non-finite loss is back-propagated as NaN: the reduced gradient is then non-finite on
            # every rank and DeepSpeed's overflow check skips this optimizer step everywhere at once.
            scale = torch.where(finite, 1.0, float("nan")).to(loss.dtype)
            engine.backward(loss * scale)
            engine.step()
            nonfinite_local += (~finite).double()
            loss_sum += loss.detach().double()
            for name, value in out.get("logs", {}).items():
                log_sums[name] = log_sums.get(name, zero) + value.detach().double().to(self.device)
            mask = batch["attention_mask"]
            rows = int(batch["input_ids"].shape[1])
            samples += int(mask.shape[0])
            tokens += mask.sum().double() * rows
            padded += int(mask.numel()) * rows
            if self._ids_file is not None:
                self._ids_file.write(json.dumps({"step": self.progress.step + 1, "ids": list(batch["ids"])}) + "\n")
        applied = bool(engine.was_step_applied())
        # One small all-reduce carries the counters, the losses and the stop request.
        names = sorted(log_sums)
        host = torch.tensor([samples, padded, float(self._stop_signal is not None)], dtype=torch.float64,
                            device=self.device)
        reduced = torch.cat([host, torch.stack([tokens, nonfinite_local, loss_sum, *(log_sums[n] for n in names)])])
        dist.all_reduce(reduced)
        values = reduced.tolist()
        count = len(micro_batches) * self.world_size
        nonfinite = values[4] > 0 or (not applied and self.recipe.train.precision != "fp16")
        return StepResult(
            loss=values[5] / count,
            logs={n: v / count for n, v in zip(names, values[6:])},
            applied=applied,
            nonfinite=nonfinite,
            samples=int(values[0]),
            tokens=int(values[3]),
            padded_tokens=int(values[1]),
            stop_requested=values[2] > 0,
        )

    def fit(self) -> dict[str, float]:
        """Train to ``train.max_steps`` (or a signal / too many non-finite steps); returns final metrics."""
        cfg = self.recipe.train
        previous_handlers = self._install_signal_handlers()
        bar = _progress_bar(self.rank == 0, cfg.max_steps, self.progress.step)
        window = _Window()
        final_metrics: dict[str, float] = {}
        stopped_by = None
        try:
            while self.progress.step < cfg.max_steps:
                started = time.perf_counter()
                micro_batches = [self._next_micro_batch() for _ in range(self.plan.grad_accum)]
                result = self.train_step(micro_batches)
                elapsed = time.perf_counter() - started
                self._account(result)
                window.add(result, elapsed)
                step = self.progress.step
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    record = self._record(window)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
                    self.logger.log(record)
                    if self.rank == 0 and not sys.stderr.isatty():  # batch jobs: one line per log step
                        log.info("step %d/%d loss %.4f lr %.3g grad_norm %s %.1f samples/s%s", step, cfg.max_steps,
                                 record["loss"], record["lr"], _fmt(record["grad_norm"]), record["samples_per_s"],
                                 f" MFU {record['mfu']:.1%}" if "mfu" in record else "")
                    window = _Window()
                if self.progress.consecutive_nonfinite >= cfg.max_nonfinite_steps:
                    stopped_by = "nonfinite"
                    break
                if result.stop_requested:
                    stopped_by = "signal"
                    break
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                    self._evaluate_and_select("val", step)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps \
                        and self._last_saved_step != step:
                    self.save()
            if stopped_by is None:
                final_metrics = self._finish()
            elif stopped_by == "signal":
                self.save()
                log.warning("stopped by %s at step %d: checkpoint saved; resume with --resume auto",
                            _signal_name(self._stop_signal), self.progress.step)
            else:
                self.save()
                message = (f"{self.progress.consecutive_nonfinite} optimizer steps in a row were skipped for a "
                           f"non-finite loss or gradient norm (train.max_nonfinite_steps={cfg.max_nonfinite_steps}),"
                           f" at step {self.progress.step}; a checkpoint was saved. Lower optim.lr, check the data, "
                           "or use train.precision=fp32 to find the cause")
                log.error(message)
                raise TrainingStopped(message)
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            bar.close()
            self.logger.flush()
            if self._ids_file is not None:
                self._ids_file.flush()
        return final_metrics

    def _account(self, result: StepResult) -> None:
        p = self.progress
        p.step += 1
        p.samples += result.samples
        p.tokens += result.tokens
        if not result.applied:
            p.skipped_steps += 1
        if result.nonfinite:
            p.nonfinite_steps += 1
            p.consecutive_nonfinite += 1
            log.warning("step %d skipped: non-finite loss or gradient norm (%d in a row, %d in total)",
                        p.step, p.consecutive_nonfinite, p.nonfinite_steps)
        elif result.applied:
            p.consecutive_nonfinite = 0

    def _record(self, window: _Window) -> dict[str, Any]:
        p = self.progress
        grad_norm = self.engine.get_global_grad_norm()
        record: dict[str, Any] = {
            "step": p.step, "samples": p.samples, "tokens": p.tokens, "epoch": p.epoch,
            "loss": window.mean_loss(), **window.mean_logs(),
            "lr": self.lr_scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "skipped_steps": p.skipped_steps, "nonfinite_steps": p.nonfinite_steps,
            "samples_per_s": window.samples / window.seconds,
            "tokens_per_s": window.tokens / window.seconds,
            "step_time_s": window.seconds / window.steps,
            "memory_gb": memory_gb(self.device),
        }
        if self.peak_flops is not None:
            achieved = self.flops_per_token * window.tokens / window.seconds
            record["mfu"] = achieved / (self.peak_flops * self.world_size)
        return record

    # ------------------------------------------------------------------------------------------
    # Evaluation and checkpoints
    # ------------------------------------------------------------------------------------------
    def evaluate(self, split: str, module: torch.nn.Module | None = None) -> dict[str, float]:
        """Collective: metrics of ``module`` (default: the engine's) on a split."""
        if self.eval_loaders[split] is None:
            self.eval_loaders[split] = self._eval_builders[split]()
        return evaluate_module(module or self.engine.module, self.eval_loaders[split], self.device, split)

    def _evaluate_and_select(self, split: str, step: int) -> dict[str, float]:
        metrics = self.evaluate(split)
        self.logger.log({"step": step, **metrics})
        if self.rank == 0:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if not k.endswith("eval_seconds"))
            log.info("step %d %s", step, shown)
        best = self.recipe.train.best_metric
        if best and best.startswith(f"{split}/"):
            if best not in metrics:
                raise RecipeError(f"train.best_metric={best!r} is not measured; {split} metrics are "
                                  f"{', '.join(sorted(metrics))}")
            value = metrics[best]
            better = self._agree(self.checkpoints.is_better(value) if self.rank == 0 else None)
            if better:
                if self._last_saved_step != step:
                    self.save()
                self.progress.best = {"metric": best, "value": value, "step": step}
                self.checkpoints.mark_best(step, best, value)
                ckpt.barrier()
        return metrics

    def save(self) -> Path:
        """Collective: a complete checkpoint of the current step."""
        p = self.progress
        meta = {
            "step": p.step, "world_size": self.world_size, "zero_stage": self.recipe.train.zero_stage,
            "precision": self.recipe.train.precision, "global_batch": self.plan.global_batch,
            "micro_batch": self.plan.micro_batch, "grad_accum": self.plan.grad_accum,
            "progress": {k: getattr(p, k) for k in p.__dataclass_fields__},
            "recipe": self.recipe.to_dict(), "recipe_hash": self.recipe.hash(),
            "allow_test_selection": self.recipe.train.allow_test_selection,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if self._ids_file is not None:  # records up to this step must survive a later kill -9
            self._ids_file.flush()
            os.fsync(self._ids_file.fileno())
        loader_state = self.train_loader.state_dict()
        rng = self._pending_rng if self._pending_rng is not None else ckpt.rng_state()  # (no batch drawn yet)
        rank_state = {"rng": rng, "loader": loader_state}
        path = self.checkpoints.save(self.engine, p.step, meta, rank_state)
        self._last_saved_step = p.step
        if self.recipe.train.save_weights_every_checkpoint:
            self.save_weights(path / "model.pt", path)
        self.logger.flush()
        return path

    def save_weights(self, out: Path, checkpoint_dir: Path) -> None:
        """Collective: consolidated fp32 module weights (``save_module_weights``) from a checkpoint."""
        from af_train.model.checkpoint import save_module_weights

        if self.rank == 0:
            state = self._consolidated_weights(checkpoint_dir)
            save_module_weights(self.engine.module, out, self.recipe.to_dict(), self.manifest.num_classes,
                                self.manifest.multi_label, state_dict=state)
            log.info("wrote consolidated weights %s", out)
        ckpt.barrier()

    def _finish(self) -> dict[str, float]:
        cfg = self.recipe.train
        path = self.save() if self._last_saved_step != self.progress.step else (
            self.checkpoints.root / ckpt.tag_for(self.progress.step))
        metrics: dict[str, float] = {}
        if "val" in self.eval_loaders:
            metrics.update(self._evaluate_and_select("val", self.progress.step))
        final = self.run_dir / "final"
        self.save_weights(final / "model.pt", path)
        tested = None
        if cfg.test_at_end and "test" in self.eval_loaders:
            if cfg.best_metric and cfg.best_metric.startswith("test/"):
                tested = path.name
                metrics.update(self._evaluate_and_select("test", self.progress.step))
            else:
                tested, test_metrics = self._evaluate_selected_on_test(path)
                metrics.update(test_metrics)
                self.logger.log({"step": self.progress.step, **test_metrics})
        if self.rank == 0:
            summary = {"step": self.progress.step, "samples": self.progress.samples, "tokens": self.progress.tokens,
                       "checkpoint": str(path), "best": self.progress.best, "test_checkpoint": tested, **metrics}
            (final / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
            log.info("finished at step %d; weights in %s", self.progress.step, final / "model.pt")
        self.logger.flush()
        return metrics

    def _consolidated_weights(self, checkpoint_dir: Path) -> dict[str, torch.Tensor]:
        """fp32 module weights of one of this run's checkpoints, frozen parameters included.

        DeepSpeed leaves frozen parameters out of ZeRO-1 checkpoints (it saves them from stage 2 on):
        take them from the live module, where they are whole below stage 3 and never change."""
        state = ckpt.consolidated_state(checkpoint_dir)
        if self.recipe.train.zero_stage >= 3:
            return state
        frozen = {name for name, p in self.engine.module.named_parameters() if not p.requires_grad}
        missing = frozen - set(state)
        if not missing:
            return state
        live = self.engine.module.state_dict()
        return {**state, **{name: live[name].detach().float().cpu() for name in missing}}

    def _evaluate_selected_on_test(self, last: Path) -> tuple[str, dict[str, float]]:
        """Collective: test metrics of the checkpoint selected on validation (the last one without a
        selection metric). A selected checkpoint other than the last is consolidated to fp32 and
        evaluated in a fresh module, so the engine's own weights stay untouched."""
        best = self._agree(self.checkpoints.best() if self.rank == 0 else None)
        if best is None or best[0] == last.name:
            return last.name, self.evaluate("test")
        from af_train.model.checkpoint import check_and_load_state
        from af_train.objectives import build_training_module

        tag = best[0]
        selected = self.checkpoints.root / tag
        state = self._consolidated_weights(selected)
        module = build_training_module(self.recipe, self.manifest.num_classes, self.manifest.multi_label)
        check_and_load_state(module, state, f"checkpoint '{selected}'")
        module.to(self.device)
        if self.rank == 0:
            log.info("test split: evaluating %s, selected on %s = %.4f", tag, self.recipe.train.best_metric, best[1])
        return tag, self.evaluate("test", module)

    def close(self) -> None:
        self.logger.close()
        if self._ids_file is not None:
            self._ids_file.close()
            self._ids_file = None
        if self.device.type == "cpu":
            _release_cpu_allreduce_buffer(self.rank)

    # ------------------------------------------------------------------------------------------
    # Signals
    # ------------------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGTERM/SIGINT only set a flag; all ranks agree on it after the step, save and exit."""

        def request_stop(signum: int, frame: Any) -> None:
            if self._stop_signal is None:
                log.warning("received %s: saving a checkpoint after this step", _signal_name(signum))
            self._stop_signal = signum

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, request_stop)
        return previous


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


class _Window:
    """Sums over the steps since the last log line."""

    def __init__(self) -> None:
        self.steps = 0
        self.applied = 0
        self.loss = 0.0
        self.logs: dict[str, float] = {}
        self.samples = self.tokens = 0
        self.seconds = 0.0

    def add(self, result: StepResult, seconds: float) -> None:
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


def _guard_plain_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """ZeRO-0 fp32: DeepSpeed steps a plain torch optimizer without an overflow check; add one.

    The engine reads ``optimizer.overflow`` after ``step()``: True counts a skipped step and leaves
    the lr schedule where it is. Gradients are all-reduced before ``step()``, so every rank agrees.
    """
    original_step = optimizer.step

    def step(*args: Any, **kwargs: Any) -> Any:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) \
            if grads else torch.tensor(0.0)
        optimizer._global_grad_norm = float(norm)
        optimizer.overflow = not math.isfinite(float(norm))
        optimizer._opt_called = True  # what torch's lr scheduler checks (it wrapped the original step)
        if optimizer.overflow:
            return None
        return original_step(*args, **kwargs)

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.overflow = False
    optimizer.step = step


def _capture(fn: Any, *args: Any) -> Any:
    """fn(*args), or the exception it raised (broadcast, then raised on every rank by ``_agree``)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - re-raised on all ranks
        return exc


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changed


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _safe_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return 1 << 62


def _signal_name(signum: int | None) -> str:
    try:
        return signal.Signals(signum).name if signum is not None else "signal"
    except ValueError:
        return f"signal {signum}"


def _progress_bar(enabled: bool, total: int, initial: int):
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                mininterval=1.0 if interactive else 30.0, desc="train")


def _release_cpu_allreduce_buffer(rank: int) -> None:
    """Unlink this rank's ~66 MB /dev/shm buffer of DeepSpeed's CPU all-reduce (it is never removed)."""
    ckpt.barrier()  # every rank is past its last collective
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    with contextlib.suppress(OSError):
        os.unlink(f"/dev/shm/{name}")
