"""The training engine: a ``Trainer`` with an explicit ``train_step`` on top of DeepSpeed ZeRO.

One ``Trainer`` per process (rank). It builds its parts from the recipe: the process and DeepSpeed
engine (``runtime``, ``ds_config``), the data loaders, the training module (``objectives``), a
``CheckpointManager`` (``checkpoint``: resume, save, consolidated weights; it also saves the weight
average, ``ema``), an ``Evaluator`` (``evaluate``: periodic validation, best-checkpoint selection,
test scoring), with ``train.probe`` a ``Prober`` (``probe``: a frozen-embedding probe of the encoder)
and the run log (``run_logging``). ``fit()``
loops: draw ``grad_accum`` micro batches, run ``train_step`` (forward, backward and DeepSpeed's step
per micro batch; the optimizer steps at the accumulation boundary), log, probe, evaluate, checkpoint.

Non-finite losses: a micro batch whose loss is NaN/inf is back-propagated as NaN on purpose, so the
reduced gradient is non-finite on every rank and DeepSpeed's overflow check skips the optimizer step
everywhere at once (no parameter, optimizer-state or lr-schedule change). ZeRO-0 in fp32 has no
such check in DeepSpeed; ``guard_plain_optimizer`` adds it. Skips are counted and logged;
``train.max_nonfinite_steps`` in a row stop the run with a checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from af_train import run_logging, runtime
from af_train.checkpoint.manager import CheckpointManager
from af_train.checkpoint.state import Progress, rng_state, seed_everything, set_rng_state
from af_train.config import Recipe
from af_train.ds_config import build_ds_config, plan_batch
from af_train.ema import EMA, raw_metric_names
from af_train.evaluate import THRESHOLDS_NAME, Evaluator, move_batch
from af_train.objectives import global_loss_counts
from af_train.run_logging import StepResult, StepTotals

__all__ = ["EXIT_NONFINITE", "StepResult", "Trainer", "TrainingStopped"]
log = logging.getLogger(__name__)
EXIT_NONFINITE = 3  # process exit code when too many non-finite steps stopped the run


class TrainingStopped(RuntimeError):
    """The run stopped early on purpose (non-finite steps); a checkpoint was written."""


class Trainer:
    """Builds everything from a recipe and trains; see the module docstring."""

    def __init__(self, recipe: Recipe, resume: str = "auto", verify_hashes: bool = True):
        from af_train.data.loader import build_dataloader
        from af_train.data.splits import check_splits
        from af_train.objectives import build_training_module

        self.recipe, cfg = recipe, recipe.train
        self.run_dir = Path(cfg.run_dir)
        place = runtime.init_process()
        self.rank, self.world_size, self.local_rank, self.device = (place.rank, place.world_size, place.local_rank,
                                                                    place.device)

        # where we resume from decides the DeepSpeed config (universal loading, batch plan)
        self.checkpoints = CheckpointManager(recipe, self.run_dir, self.rank, self.world_size)
        point = self.checkpoints.resume_point(resume, self.run_dir, verify_hashes)
        self.plan = plan_batch(recipe, self.world_size, keep_global_batch=point and point.keep_global_batch)
        self.ds_config = build_ds_config(recipe, self.plan, on_cpu=place.on_cpu, load_universal=bool(
            point and point.universal), fp16_supported=place.fp16_supported)

        mask = recipe.objective.mode == "pretrain"
        self.train_loader = build_dataloader(recipe.data, "train", self.plan.micro_batch, mask=mask, seed=cfg.seed,
                                             local_cache=str(self.run_dir / "cache"), finetune_masking=not mask,
                                             global_batch=self.plan.global_batch)
        self.manifest = self.train_loader.dataset.manifest
        # val/test: codes from the same tokenizer, and (fine-tuning) classes meaning the same in every split
        warnings = check_splits(recipe.data, self.manifest, same_labels=not mask)
        for warning in warnings if self.rank == 0 else []:  # the checks run on every rank, one rank logs
            log.warning(warning)
        self.checkpoints.set_tokenizer(self.manifest.tokenizer, point)
        self.checkpoints.set_labels(self.manifest.labels, point)
        self.evaluator = Evaluator(recipe, self.run_dir, self.device, self.rank, self.checkpoints)

        seed_everything(cfg.seed)  # the same initial weights on every rank, then per-rank dropout streams
        module = build_training_module(recipe, self.manifest.num_classes, self.manifest.multi_label,
                                       self.manifest.tokenizer, labels=self.manifest.labels)
        self.trainable_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
        self.frozen_params = sum(p.numel() for p in module.parameters() if not p.requires_grad)
        self.flops_per_token = run_logging.training_flops_per_token(
            recipe, module.encoder.config, recipe.data.max_length, module.encoder.config.vocab_size)
        self.prober = None
        if cfg.probe.dataset is not None:  # reads and checks its data set before DeepSpeed starts
            from af_train.probe import Prober

            self.prober = Prober(cfg.probe, recipe.data, self.manifest, module.encoder.config.num_hidden_layers,
                                 self.device, default_every=cfg.eval_every)
        self._probed: tuple[int, dict[str, float]] | None = None  # the last probe: (step, metrics)
        self.engine, self.optimizer, self.lr_scheduler = runtime.initialize_engine(recipe, module, self.ds_config)
        self.ema = EMA(self.engine.module, cfg.ema_decay) if cfg.ema_decay else None
        seed_everything(cfg.seed + 1000 * self.rank + 1)

        self.progress = Progress()
        self.stop = runtime.StopSignals()
        self._train_iter = None
        self._pending_rng: dict[str, Any] | None = None  # restored once the first batch is drawn
        if point is not None:
            self.progress, self._pending_rng = self.checkpoints.load(point, self.engine, self.train_loader, self.ema)
        self.start_step = self.progress.step
        resume_step = self.start_step if point is not None else None
        self.logger = run_logging.RunLogger(self.run_dir, self.rank == 0, resume_step)
        self.sample_ids = run_logging.SampleIdLog(self.run_dir, self.rank, cfg.record_sample_ids, resume_step)
        self.peak_flops, self.peak_note = run_logging.peak_flops_per_device(self.device, cfg.precision,
                                                                            cfg.peak_flops)
        if self.rank == 0:
            run_logging.write_run_files(self, point.path if point is not None else None)

    def _next_micro_batch(self) -> dict[str, Any]:
        for _ in range(2):  # a fresh epoch that yields nothing means no batch fits at all
            if self._train_iter is None:
                self._train_iter = iter(self.train_loader)
            try:
                batch = next(self._train_iter)
            except StopIteration:
                self._train_iter = None
                self.progress.epoch += 1
                continue
            if self._pending_rng is not None:
                set_rng_state(self._pending_rng)
                self._pending_rng = None
            return batch
        raise RuntimeError(f"the training split yields no batch of {self.plan.micro_batch} per rank on "
                           f"{self.world_size} ranks ({self.train_loader.dataset.size} clips); lower "
                           "train.micro_batch_size or add data")

    def train_step(self, micro_batches: list[dict[str, Any]]) -> StepResult:
        """One optimizer step over ``grad_accum`` micro batches (collective across ranks).

        Each loss term is a sum over the whole global batch divided by its global count (masked tokens,
        clips; all-reduced before the first backward), and the loss is scaled by accumulation x world
        size, which DeepSpeed divides by: the gradient then does not depend on how the global batch is
        split over ranks and micro batches. Sums stay on the device (float64, ``StepTotals``) so a step
        syncs with the host at the two all-reduces.
        """
        engine, batches = self.engine, [move_batch(b, self.device) for b in micro_batches]
        counts = global_loss_counts(engine.module, batches, self.device)
        scale = engine.gradient_accumulation_steps() * self.world_size
        totals = StepTotals(self.device)
        for batch in batches:
            out = engine(batch)
            terms = {name: (term.total / counts[term.count_key], term.weight) for name, term in out["terms"].items()}
            loss = sum((weight * value for value, weight in terms.values() if weight), totals.zero.float())
            finite = torch.isfinite(loss.detach())
            # A non-finite loss is back-propagated as NaN: the reduced gradient is then non-finite on
            # every rank and DeepSpeed's overflow check skips this optimizer step everywhere at once.
            engine.backward(loss * (scale * torch.where(finite, 1.0, float("nan"))).to(loss.dtype))
            engine.step()
            totals.add(batch, loss, finite, {name: value for name, (value, _) in terms.items()}, out.get("logs", {}))
            self.sample_ids.write(self.progress.step + 1, batch["ids"])
        # One small all-reduce carries the counters, the losses and the stop request.
        return totals.result(bool(engine.was_step_applied()), stop_requested=self.stop.received is not None,
                             skip_means_nonfinite=self.recipe.train.precision != "fp16")

    def fit(self) -> dict[str, float]:
        """Train to ``train.max_steps`` (or a signal / too many non-finite steps); returns final metrics."""
        cfg, p = self.recipe.train, self.progress
        self.stop.install()
        bar = run_logging.progress_bar(self.rank == 0, cfg.max_steps, p.step)
        window, stopped_by = run_logging.MetricWindow(), None
        try:
            if self.prober is not None and p.step == 0:  # the curve starts at the initial weights
                self._probe(0)
            while p.step < cfg.max_steps:
                started = time.perf_counter()
                result = self.train_step([self._next_micro_batch() for _ in range(self.plan.grad_accum)])
                p.count_step(result.samples, result.tokens, result.applied, result.nonfinite)
                if self.ema is not None and result.applied:
                    self.ema.update(self.engine.module)
                window.add(result, time.perf_counter() - started)
                step = p.step
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    record = window.record(p, self.lr_scheduler.get_last_lr()[0], self.engine.get_global_grad_norm(),
                                           self.device, self.flops_per_token, self.peak_flops, self.world_size)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
                    self.logger.log(record)
                    if self.rank == 0 and not sys.stderr.isatty():  # batch jobs: one line per log step
                        run_logging.log_step_line(record, cfg.max_steps)
                    window = run_logging.MetricWindow()
                if p.consecutive_nonfinite >= cfg.max_nonfinite_steps or result.stop_requested:
                    stopped_by = "nonfinite" if p.consecutive_nonfinite >= cfg.max_nonfinite_steps else "signal"
                    break
                evaluating = bool(cfg.eval_every) and step % cfg.eval_every == 0 and step < cfg.max_steps
                if self._probe_due(step, evaluating):
                    self._probe(step)
                if evaluating:
                    self._evaluate("val", step)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps \
                        and self.checkpoints.last_saved_step != step:
                    self.save()
            if stopped_by is None:
                return self._finish()
            self.save()
            if stopped_by == "signal":
                log.warning("stopped by %s at step %d: checkpoint saved; resume with --resume auto",
                            runtime.signal_name(self.stop.received), p.step)
                return {}
            message = (f"{p.consecutive_nonfinite} optimizer steps in a row were skipped for a non-finite loss or "
                       f"gradient norm (train.max_nonfinite_steps={cfg.max_nonfinite_steps}), at step {p.step}; a "
                       "checkpoint was saved. Lower optim.lr, check the data, or use train.precision=fp32 to find the "
                       "cause")
            log.error(message)
            raise TrainingStopped(message)
        finally:
            self.stop.restore()
            bar.close()
            self.logger.flush()
            self.sample_ids.flush()

    def _probe_due(self, step: int, evaluating: bool) -> bool:
        """A probe after this step: every ``train.probe.every`` steps (within ``train.probe.max_time_share``), at
        the last step, and at each evaluation when it selects checkpoints (``train.best_metric: probe/...``)."""
        if self.prober is None:
            return False
        selects = (self.recipe.train.best_metric or "").startswith("probe/")
        # the forced probes first: Prober.due is collective and counts the probes its time budget leaves out
        return step == self.recipe.train.max_steps or (selects and evaluating) or self.prober.due(step)

    def _probe(self, step: int) -> dict[str, float]:
        """Collective: the probe of the encoder as evaluated (the weight average with ``train.ema_decay``)."""
        module = self.engine.module
        with self.ema.applied(module) if self.ema is not None else contextlib.nullcontext():
            metrics = self.prober.run(module.encoder, step)
        self._probed = (step, metrics)
        self.logger.log({"step": step, **metrics})
        return metrics

    def _evaluate(self, split: str, step: int) -> dict[str, float]:
        module = self.engine.module
        # the probe of this step (its own val split) may select the checkpoint
        probed = self._probed[1] if self._probed is not None and self._probed[0] == step else None
        if self.ema is None:
            metrics = self.evaluator.evaluate_and_select(split, step, module, self.progress, self.save, probed)
        else:  # the average is evaluated (and selects checkpoints); the raw weights are logged beside it
            raw = raw_metric_names(self.evaluator.evaluate(split, module))
            with self.ema.applied(module):
                metrics = {**self.evaluator.evaluate_and_select(split, step, module, self.progress, self.save,
                                                                probed), **raw}
        self.logger.log({"step": step, **metrics})
        return metrics

    def save(self) -> Path:
        """Collective: a complete checkpoint of the current step."""
        self.sample_ids.sync()  # records up to this step must survive a later kill -9
        rng = self._pending_rng if self._pending_rng is not None else rng_state()  # (no batch drawn yet)
        with self.ema.raw_weights(self.engine.module) if self.ema is not None else contextlib.nullcontext():
            path = self.checkpoints.save(self.engine, self.progress, self.plan, rng, self.train_loader, self.ema)
        if self.recipe.train.save_weights_every_checkpoint:
            self.checkpoints.save_weights(self.engine.module, path / "model.pt", path, self.manifest)
        self.logger.flush()
        return path

    def _finish(self) -> dict[str, float]:
        cfg, step = self.recipe.train, self.progress.step
        path = self.save() if self.checkpoints.last_saved_step != step else self.checkpoints.path_for(step)
        metrics = self._evaluate("val", step) if self.evaluator.has("val") else {}
        final = self.run_dir / "final"
        self.checkpoints.save_weights(self.engine.module, final / "model.pt", path, self.manifest)
        self.evaluator.write_thresholds(final, step)  # chosen on val for these weights
        tested = None
        if cfg.test_at_end and self.evaluator.has("test"):
            with self.ema.applied(self.engine.module) if self.ema is not None else contextlib.nullcontext():
                tested, test_metrics = self.evaluator.score_test(path, step, self.engine.module, self.manifest,
                                                                 self.progress, self.save)
            metrics.update(test_metrics)
            self.logger.log({"step": step, **test_metrics})
        self.checkpoints.save_best_weights(self.engine.module, self.run_dir / "best", self.manifest,
                                           copy_beside=(THRESHOLDS_NAME,))
        if self.rank == 0:
            run_logging.write_final_metrics(final, self.progress, path, tested, metrics)
        self.logger.flush()
        return metrics

    def close(self) -> None:
        self.logger.close()
        self.sample_ids.close()
        if self.device.type == "cpu":
            runtime.release_cpu_allreduce_buffer(self.rank)
