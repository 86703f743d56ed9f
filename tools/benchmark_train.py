"""End-to-end training throughput: af_train's engine against Hugging Face RoFormer, in one run.

Every implementation trains the same synthetic clips (random codes, full-length clips), at the same
micro batch, sequence length, precision and DeepSpeed config, in one process:

- ``af_train``: the real engine path. A ``Trainer`` is built from a recipe (its public construction
  path: DeepSpeed engine, ``af_train.objectives``, kernels through ``kernels.dispatch``, i.e. Triton
  on GPU) and each step is ``Trainer.train_step``.
- ``af_train_reference``: the same with ``model.kernels=reference`` (SDPA), so the kernels' share of
  the gain is visible (on CPU ``auto`` already means the reference, so it is left out by default).
- ``hf_roformer``: Hugging Face ``RoFormerForMaskedLM`` (pretrain) or ``RoFormerModel`` under
  af_train's mean-pool classification head and losses (ft1; ft2 adds frozen ``RoFormerModel`` rows and
  the plain PyTorch MPC loss), in a DeepSpeed engine built from the identical DeepSpeed config and
  optimizer groups, stepped as a user would: ``engine(batch)``, ``engine.backward``, ``engine.step``.

Implementations take turns in blocks (A/B/A/B, ``--rounds``), so drift of a shared machine hits all of
them alike. Per implementation: tokens/s and samples/s (real tokens over all code rows, as the engine
counts them), model TFLOP/s and MFU from the engine's own FLOP formula
(``af_train.run_logging.training_flops_per_token``) and peak table, peak memory (CUDA), a step-time
breakdown (data wait, forward, backward, optimizer step, other) and the ratio to the Hugging Face
baseline. Writes ``train.csv``, ``train.json`` (device, versions, commit, date, argv, DeepSpeed config,
every timed step) and ``train.png`` into ``--out`` (default ``benchmarks/results/<device>/``), after
each mode, so an interrupted run keeps what it measured.

    af-benchmark-train                                        # GPU: base, seq 752, bf16, pretrain
    af-benchmark-train --mode pretrain ft1 --preset base --seq-len 752
    af-benchmark-train --device cpu                           # CPU: small preset, fp32, honest CPU numbers
    af-benchmark-train --device cpu --preset tiny --seq-len 32 --steps 2 --warmup 1 --out /tmp/b   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_ROOT = REPO_ROOT if (REPO_ROOT / "kernels").is_dir() else Path.cwd()
MODES = ("pretrain", "ft1", "ft2")
IMPLS = ("af_train", "af_train_reference", "hf_roformer")
BASELINE = "hf_roformer"
PHASES = ("data", "forward", "backward", "optimizer", "other")
NUM_CLASSES = 527  # AudioSet's label count (multi-label, as the benchmark data)
FT2_ROWS = [0, 1, 2, 3]
CSV_FIELDS = (
    "mode", "impl", "status", "preset", "seq_len", "micro_batch", "precision", "zero_stage", "kernels",
    "steps", "tokens_per_s", "samples_per_s", "model_tflops", "mfu", "ratio_to_baseline", "ratio_median",
    "ratio_min", "ratio_max", "step_ms", "data_ms", "forward_ms", "backward_ms", "optimizer_ms", "other_ms",
    "peak_mem_gb", "loss_first", "loss_last",
)

log = logging.getLogger("af_benchmark_train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="af-benchmark-train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Outputs: train.csv, train.json, train.png in --out. Defaults differ by device: "
               "cuda: base, micro batch 32, bf16, 20 steps; cpu: small, micro batch 4, fp32, 8 steps.")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="cuda (default when a GPU is visible) or cpu")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=["pretrain"], help="objectives to measure")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=None,
                        help="implementations (default: all on cuda; af_train and hf_roformer on cpu)")
    parser.add_argument("--preset", choices=("tiny", "small", "base", "large"), default=None,
                        help="model size (default: base on cuda, small on cpu)")
    parser.add_argument("--seq-len", type=int, default=752, help="tokens per sequence incl. BOA/EOA (default 752)")
    parser.add_argument("--micro-batch", type=int, default=None, help="clips per step (default: 32 cuda, 4 cpu)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per implementation (default 20/8)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per implementation first (5/1)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="A/B/A/B blocks the timed steps are split into (default: one step per block)")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                        help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=2)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (data.num_workers)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="peak FLOP/s per device for MFU (default: af_train's table; none for CPUs)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/<device>)")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary shards and run dirs")
    args = parser.parse_args(argv)
    for name in ("seq_len", "micro_batch", "steps", "rounds", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.seq_len < 4:
        parser.error("--seq-len must be >= 4 (BOA + at least two codes + EOA)")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be >= 0")
    args.mode = list(dict.fromkeys(args.mode))
    return args


def _defaults(args: argparse.Namespace, device: str) -> None:
    gpu = device == "cuda"
    args.preset = args.preset or ("base" if gpu else "small")
    args.micro_batch = args.micro_batch or (32 if gpu else 4)
    args.steps = args.steps or (20 if gpu else 8)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.impls = list(dict.fromkeys(args.impls or (IMPLS if gpu else ("af_train", BASELINE))))
    args.rounds = min(args.rounds or args.steps, args.steps)


# ------------------------------------------------------------------------------------------ timing


class PhaseClock:
    """Times the forward, backward and optimizer-step calls of one DeepSpeed engine.

    Wraps the three methods on this engine instance only. On CUDA it records events (no extra
    synchronisation inside a step); ``collect()`` is called after the step has synchronised.
    """

    WRAPPED = (("forward", "forward"), ("backward", "backward"), ("optimizer", "step"))

    def __init__(self, engine: Any, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: list[tuple[str, Any, Any]] = []
        for phase, method in self.WRAPPED:
            setattr(engine, method, self._timed(phase, getattr(engine, method)))

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _timed(self, phase: str, method: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = self._now()
            try:
                return method(*args, **kwargs)
            finally:
                self.marks.append((phase, start, self._now()))

        return timed

    def collect(self) -> dict[str, float]:
        """Seconds per phase since the last call."""
        seconds = dict.fromkeys(("forward", "backward", "optimizer"), 0.0)
        for phase, start, end in self.marks:
            seconds[phase] += start.elapsed_time(end) / 1e3 if self.cuda else end - start
        self.marks.clear()
        return seconds


@dataclass
class Impl:
    """One implementation of one mode, ready to step."""

    name: str
    kernels: str  # the kernels backend its model runs with (model.kernels; the baseline's own loss: reference)
    engine: Any
    loader: Any
    step: Callable[[dict[str, Any]], float]  # one optimizer step on a micro batch -> loss
    close: Callable[[], None]
    clock: PhaseClock | None = None
    trainer: Any = None  # the af_train Trainer it came from (None for the baseline)
    iterator: Any = None
    persistent_bytes: int | None = None  # CUDA memory it holds between steps (weights, optimizer state)
    transient_bytes: int = 0  # largest extra memory inside one of its steps
    steps: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None

    def next_batch(self) -> dict[str, Any]:
        for _ in range(2):
            if self.iterator is None:
                self.iterator = iter(self.loader)
            try:
                return next(self.iterator)
            except StopIteration:
                self.iterator = None
        raise RuntimeError(f"{self.name}: the benchmark data yields no batch")


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def run_step(impl: Impl, cuda: bool, round_index: int, timed: bool) -> None:
    """One step of ``impl``: draw a batch (data wait), then the implementation's step, synchronised."""
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    batch = impl.next_batch()
    data_s = time.perf_counter() - start
    mask = batch["attention_mask"]
    tokens = int(mask.sum()) * int(batch["input_ids"].shape[1])
    loss = impl.step(batch)
    _sync(cuda)
    wall = time.perf_counter() - start
    phases = impl.clock.collect() if impl.clock is not None else {}
    if cuda:
        impl.transient_bytes = max(impl.transient_bytes, torch.cuda.max_memory_allocated() - base)
    if not timed:
        return
    other = wall - data_s - sum(phases.values())
    impl.steps.append({"round": round_index, "wall_s": wall, "data_s": data_s, "forward_s": phases.get("forward"),
                       "backward_s": phases.get("backward"), "optimizer_s": phases.get("optimizer"),
                       "other_s": other if phases else None, "tokens": tokens, "samples": int(mask.shape[0]),
                       "loss": loss})


# -------------------------------------------------------------------------------------- building


def write_benchmark_data(root: Path, impls: list[str], clips: int, frames: int) -> dict[str, Path]:
    """One identical copy of the synthetic shards per implementation (streaming refuses two live
    datasets on one local directory in a process)."""
    from af_train_tools.benchmark_data import write_synthetic_shards

    first = root / "shards" / impls[0]
    write_synthetic_shards(first, clips, frames, num_classes=NUM_CLASSES)
    paths = {impls[0]: first}
    for name in impls[1:]:
        paths[name] = root / "shards" / name
        shutil.copytree(first, paths[name])
    return paths


def write_frozen_rows(root: Path, preset: str) -> list[str]:
    """Random-init encoder checkpoints for FT2's frozen rows (their weights do not change the cost)."""
    from af_train.model import AudioFormerConfig, RoFormerEncoder, save_encoder

    paths = []
    for row in FT2_ROWS[1:]:
        torch.manual_seed(100 + row)
        path = root / "frozen" / f"row{row}.pt"
        save_encoder(RoFormerEncoder(AudioFormerConfig.preset(preset)), path, code_row=row)
        paths.append(str(path))
    return paths


def build_recipe(args: argparse.Namespace, mode: str, kernels: str, shards: Path, run_dir: Path,
                 frozen: list[str]) -> Any:
    from af_train.config import Recipe

    data = {"train": str(shards), "code_rows": FT2_ROWS if mode == "ft2" else [0], "max_length": args.seq_len,
            "num_workers": args.workers, "num_canonical_nodes": 1}
    objective: dict[str, Any] = {"mode": mode}
    if mode == "ft2":
        objective["frozen_row_checkpoints"] = frozen
    train = {"run_dir": str(run_dir), "seed": 0, "max_steps": args.warmup + args.steps + 1,
             "micro_batch_size": args.micro_batch, "precision": args.precision, "zero_stage": args.zero_stage,
             "log_every": 10**9, "eval_every": 0, "save_every": 0, "test_at_end": False,
             "peak_flops": args.peak_flops}
    return Recipe.from_dict({"data": data, "model": {"preset": args.preset, "kernels": kernels},
                             "objective": objective, "optim": {"lr": 1e-4, "schedule": "constant"},
                             "train": train}, source=f"af-benchmark-train ({mode}, kernels={kernels})")


def build_af_train(name: str, recipe: Any, cuda: bool) -> Impl:
    """af_train through its public construction path: a Trainer from the recipe."""
    from af_train.engine import Trainer

    trainer = Trainer(recipe, resume="none")
    def close() -> None:
        trainer.close()
        trainer.train_loader.dataset.close()  # its shared memory now, not at exit (the next mode builds anew)

    return Impl(name, recipe.model.kernels, trainer.engine, trainer.train_loader,
                step=lambda batch: trainer.train_step([batch]).loss, close=close, trainer=trainer)


class HFEncoder(torch.nn.Module):
    """Hugging Face ``RoFormerModel`` behind af_train's encoder call, so FT heads and losses are shared."""

    # what af_train's FT module passes to kernels.dispatch for the MPC loss (ft2): the plain PyTorch
    # loss a user would write, never af_train's Triton kernel
    kernels = "reference"

    def __init__(self, af_config: Any) -> None:
        from transformers import RoFormerModel

        from af_train.model.hf import hf_config

        super().__init__()
        self.config = af_config  # what af_train's heads read (hidden_size, row_embedding)
        self.model = RoFormerModel(hf_config(af_config))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, embedding_mix: Any = None) -> torch.Tensor:
        if embedding_mix is not None:  # FineTuneModule passes it only when objective.mixup is on
            raise ValueError("the Hugging Face baseline has no mixup of input embeddings: benchmark with "
                             "objective.mixup off")
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


class HFPretrain(torch.nn.Module):
    """Hugging Face ``RoFormerForMaskedLM`` as a user runs it (MLM head and loss over every position)."""

    def __init__(self, af_config: Any) -> None:
        from transformers import RoFormerForMaskedLM

        from af_train.model.hf import hf_config

        super().__init__()
        self.model = RoFormerForMaskedLM(hf_config(af_config))

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = self.model(input_ids=batch["input_ids"][:, 0], attention_mask=batch["attention_mask"],
                         labels=batch["mlm_labels"][:, 0])
        return {"loss": out.loss}


def build_hf_module(recipe: Any, mode: str) -> torch.nn.Module:
    from af_train.model import AudioFormerConfig
    from af_train.objectives import FineTuneModule

    config = AudioFormerConfig.from_recipe(recipe.model)
    torch.manual_seed(recipe.train.seed)
    if mode == "pretrain":
        return HFPretrain(config)
    frozen = []
    if mode == "ft2":  # frozen rows run without dropout, as af_train loads them
        frozen_config = AudioFormerConfig.from_dict({**config.to_dict(), "hidden_dropout_prob": 0.0,
                                                     "attention_probs_dropout_prob": 0.0})
        frozen = [HFEncoder(frozen_config) for _ in FT2_ROWS[1:]]
    rows = FT2_ROWS if mode == "ft2" else [0]
    return FineTuneModule(HFEncoder(config), NUM_CLASSES, True, rows, frozen, use_classifier=True,
                          alpha=recipe.objective.alpha, temperature=recipe.objective.temperature)


def build_hf(name: str, recipe: Any, mode: str, device: Any, ds_config: dict[str, Any]) -> Impl:
    """Hugging Face RoFormer in a DeepSpeed engine made by the Trainer's own engine factory."""
    from af_train.data.loader import build_dataloader
    from af_train.evaluate import move_batch
    from af_train.runtime import initialize_engine

    module = build_hf_module(recipe, mode)
    engine, _, _ = initialize_engine(recipe, module, ds_config)
    loader = build_dataloader(recipe.data, "train", recipe.train.micro_batch_size, mask=mode == "pretrain",
                              seed=recipe.train.seed, local_cache=str(Path(recipe.train.run_dir) / "cache"))

    def step(batch: dict[str, Any]) -> float:
        loss = engine(move_batch(batch, device))["loss"]
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    def close() -> None:
        loader.dataset.close()

    return Impl(name, HFEncoder.kernels, engine, loader, step, close)


def deepspeed_config_for(recipe: Any, place: Any) -> dict[str, Any]:
    """The DeepSpeed config the Trainer builds for ``recipe`` here (same function, same inputs)."""
    from af_train.ds_config import build_ds_config, plan_batch

    return build_ds_config(recipe, plan_batch(recipe, place.world_size), on_cpu=place.on_cpu,
                           fp16_supported=place.fp16_supported)


# ---------------------------------------------------------------------------------------- measure


def measure_mode(args: argparse.Namespace, mode: str, place: Any, work: Path) -> tuple[list[dict], dict]:
    """Build every implementation of ``mode``, warm each, then time them in alternating blocks."""
    from af_train.model import AudioFormerConfig
    from af_train.run_logging import peak_flops_per_device, training_flops_per_token

    device = place.device
    cuda = device.type == "cuda"
    root = work / mode
    clips = (args.warmup + args.steps + 2) * args.micro_batch
    shards = write_benchmark_data(root, args.impls, clips, args.seq_len - 2)
    frozen = write_frozen_rows(root, args.preset) if mode == "ft2" else []
    kernels_of = {"af_train": "auto", "af_train_reference": "reference", BASELINE: "auto"}
    recipes = {name: build_recipe(args, mode, kernels_of[name], shards[name], root / "runs" / name, frozen)
               for name in args.impls}
    any_recipe = recipes[args.impls[0]]
    ds_config = deepspeed_config_for(any_recipe, place)
    impls: list[Impl] = []
    failed: list[dict] = []
    for name in args.impls:
        gc.collect()
        before = torch.cuda.memory_allocated() if cuda else 0
        try:
            impl = (build_hf(name, recipes[name], mode, device, ds_config) if name == BASELINE
                    else build_af_train(name, recipes[name], cuda))
            if impl.trainer is not None and impl.trainer.ds_config != ds_config:
                raise RuntimeError(f"{name}: the Trainer's DeepSpeed config differs from the baseline's: "
                                   f"{impl.trainer.ds_config} vs {ds_config}")
            impl.clock = PhaseClock(impl.engine, cuda)
            for _ in range(args.warmup):
                run_step(impl, cuda, -1, timed=False)
            if cuda:
                impl.persistent_bytes = torch.cuda.memory_allocated() - before
                impl.transient_bytes = 0
            impls.append(impl)
        except Exception as err:  # noqa: BLE001 - recorded as this implementation's row, the others go on
            log.exception("%s %s failed to build or warm up", mode, name)
            failed.append({"mode": mode, "impl": name, "status": f"error: {type(err).__name__}: {err}"[:300]})
    per_round = [args.steps // args.rounds + (1 if r < args.steps % args.rounds else 0) for r in range(args.rounds)]
    for round_index, count in enumerate(per_round):
        for impl in impls:  # A/B/A/B: every round runs each implementation once, in the same order
            if impl.error is not None:
                continue
            try:
                for _ in range(count):
                    run_step(impl, cuda, round_index, timed=True)
                block = impl.steps[-count:]
                print(f"{mode} round {round_index + 1}/{len(per_round)} {impl.name}: "
                      f"{sum(s['tokens'] for s in block) / sum(s['wall_s'] for s in block):.1f} tokens/s", flush=True)
            except Exception as err:  # noqa: BLE001
                log.exception("%s %s failed in round %d", mode, impl.name, round_index)
                impl.error = f"error: {type(err).__name__}: {err}"[:300]
    for impl in impls:
        with contextlib.suppress(Exception):
            impl.close()

    encoder_config = AudioFormerConfig.from_recipe(any_recipe.model)
    flops_per_token = training_flops_per_token(any_recipe, encoder_config, args.seq_len, encoder_config.vocab_size)
    peak, peak_note = peak_flops_per_device(device, args.precision, args.peak_flops)
    rows = [summarise(args, mode, impl, flops_per_token, peak) for impl in impls] + failed
    add_ratios(rows, impls)
    detail = {"flops_per_token": flops_per_token, "peak_flops": peak, "peak_note": peak_note,
              "deepspeed_config": ds_config,
              "steps": {impl.name: impl.steps for impl in impls}}
    del impls
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rows, detail


def summarise(args: argparse.Namespace, mode: str, impl: Impl, flops_per_token: float, peak: float | None) -> dict:
    steps = impl.steps
    row: dict[str, Any] = {"mode": mode, "impl": impl.name, "status": impl.error or "ok", "preset": args.preset,
                           "seq_len": args.seq_len, "micro_batch": args.micro_batch, "precision": args.precision,
                           "zero_stage": args.zero_stage, "kernels": impl.kernels, "steps": len(steps)}
    if not steps:
        return row
    wall = sum(s["wall_s"] for s in steps)
    tokens = sum(s["tokens"] for s in steps)
    row["tokens_per_s"] = tokens / wall
    row["samples_per_s"] = sum(s["samples"] for s in steps) / wall
    row["model_tflops"] = flops_per_token * tokens / wall / 1e12
    row["mfu"] = flops_per_token * tokens / wall / peak if peak else None
    row["step_ms"] = 1e3 * wall / len(steps)
    for phase in PHASES:
        values = [s[f"{phase}_s"] for s in steps if s.get(f"{phase}_s") is not None]
        row[f"{phase}_ms"] = 1e3 * sum(values) / len(values) if values else None
    if impl.persistent_bytes is not None:
        row["peak_mem_gb"] = (impl.persistent_bytes + impl.transient_bytes) / 2**30
    losses = [s["loss"] for s in steps]
    row["loss_first"], row["loss_last"] = losses[0], losses[-1]
    return row


def _round_rates(impl: Impl) -> dict[int, float]:
    rates: dict[int, list[float]] = {}
    for s in impl.steps:
        rates.setdefault(s["round"], [0.0, 0.0])
        rates[s["round"]][0] += s["tokens"]
        rates[s["round"]][1] += s["wall_s"]
    return {r: tokens / wall for r, (tokens, wall) in rates.items()}


def add_ratios(rows: list[dict], impls: list[Impl]) -> None:
    """Tokens/s over the baseline's, overall and per round (the spread shows how steady the machine was)."""
    by_name = {impl.name: impl for impl in impls}
    base_row = next((r for r in rows if r["impl"] == BASELINE and r.get("tokens_per_s")), None)
    if base_row is None:
        return
    base_rounds = _round_rates(by_name[BASELINE])
    for row in rows:
        if not row.get("tokens_per_s"):
            continue
        row["ratio_to_baseline"] = row["tokens_per_s"] / base_row["tokens_per_s"]
        mine = _round_rates(by_name[row["impl"]])
        per_round = [mine[r] / base_rounds[r] for r in mine if r in base_rounds]
        if per_round:
            row["ratio_median"] = statistics.median(per_round)
            row["ratio_min"], row["ratio_max"] = min(per_round), max(per_round)
            row["ratio_per_round"] = per_round


# -------------------------------------------------------------------------------------------- output


def write_outputs(out_dir: Path, rows: list[dict], meta: dict, details: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "train.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _cell(r.get(k)) for k in CSV_FIELDS})
    with open(out_dir / "train.json", "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows, "modes": details}, f, indent=2, default=str)
        f.write("\n")
    plot(out_dir / "train.png", rows, meta)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def plot(path: Path, rows: list[dict], meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("tokens_per_s")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['mode']}\n{r['impl']}" for r in ok]
    bars = left.bar(range(len(ok)), [r["tokens_per_s"] for r in ok],
                    color=["tab:gray" if r["impl"] == BASELINE else "tab:blue" for r in ok])
    for bar, r in zip(bars, ok):
        text = f"{r['ratio_to_baseline']:.2f}x" if r.get("ratio_to_baseline") else ""
        if r.get("mfu"):
            text += f"\nMFU {r['mfu']:.1%}"
        left.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                      fontsize=8)
    left.set_xticks(range(len(ok)), labels, fontsize=7)
    left.set_ylabel("tokens/s (real tokens, all code rows)")
    left.set_title("throughput (ratio to hf_roformer)")
    bottom = [0.0] * len(ok)
    for phase in PHASES:
        values = [r.get(f"{phase}_ms") or 0.0 for r in ok]
        right.bar(range(len(ok)), values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    right.set_xticks(range(len(ok)), labels, fontsize=7)
    right.set_ylabel("ms per step (mean)")
    right.set_title("step time breakdown")
    right.legend(fontsize=8)
    commit = str(meta["git"].get("commit", "unknown"))[:10]
    fig.suptitle(f"{meta['device']} · {meta['preset']} · seq {meta['seq_len']} · micro batch {meta['micro_batch']} · "
                 f"{meta['precision']} · ZeRO-{meta['zero_stage']} · {commit} · {meta['date_utc']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(rows: list[dict]) -> None:
    header = (f"{'mode':<9}{'impl':<20}{'tokens/s':>11}{'samples/s':>10}{'TFLOP/s':>9}{'MFU':>7}{'x base':>8}"
              f"{'median':>8}{'step ms':>9}{'data':>7}{'fwd':>8}{'bwd':>8}{'opt':>7}{'other':>7}{'mem GB':>8}")
    print(header)
    print("-" * len(header))

    def f(value: Any, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    for r in rows:
        if not r.get("tokens_per_s"):
            print(f"{r['mode']:<9}{r['impl']:<20}  {r['status']}")
            continue
        print(f"{r['mode']:<9}{r['impl']:<20}{r['tokens_per_s']:>11.1f}{r['samples_per_s']:>10.2f}"
              f"{r['model_tflops']:>9.3f}{f(r.get('mfu'), '.1%'):>7}{f(r.get('ratio_to_baseline'), '.3f'):>8}"
              f"{f(r.get('ratio_median'), '.3f'):>8}"
              f"{r['step_ms']:>9.1f}{f(r['data_ms'], '.1f'):>7}{f(r['forward_ms'], '.1f'):>8}"
              f"{f(r['backward_ms'], '.1f'):>8}{f(r['optimizer_ms'], '.1f'):>7}{f(r['other_ms'], '.1f'):>7}"
              f"{f(r.get('peak_mem_gb'), '.2f'):>8}")


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in ("torch", "deepspeed", "transformers", "triton", "streaming"):
        try:
            versions[name] = getattr(__import__(name), "__version__", None)
        except Exception:  # noqa: BLE001 - a missing package is recorded, not fatal
            versions[name] = None
    return versions


def source_commit() -> dict[str, Any]:
    """The checkout's commit (``af_train.files.git_commit``), or ``$AF_COMMIT`` on a copy without .git."""
    from af_train.files import git_commit

    found = git_commit(REPO_ROOT)
    if found["commit"] is None and os.environ.get("AF_COMMIT"):
        return {"commit": os.environ["AF_COMMIT"], "dirty": None, "source": "AF_COMMIT"}
    return {**found, "commit": found["commit"] or "unknown"}


def device_label(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from af_train_tools.benchmark_kernels import _slug

    from af_train.runtime import init_process
    from af_train.train import _single_process_env

    device_kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_kind == "cuda" and not torch.cuda.is_available():
        print("af-benchmark-train: --device cuda but no GPU is visible; use --device cpu", file=sys.stderr)
        return 2
    if device_kind == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # DeepSpeed picks its accelerator from what it sees
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _defaults(args, device_kind)
    if args.threads:
        torch.set_num_threads(args.threads)
    _single_process_env()
    place = init_process()  # the Trainer's own process setup: DeepSpeed's process group, device, logging
    label = device_label(device_kind)
    out_dir = args.out or RESULTS_ROOT / "benchmarks" / "results" / (_slug(label) if device_kind == "cuda" else "cpu")
    meta = {
        "device": label, "device_kind": device_kind, "preset": args.preset, "seq_len": args.seq_len,
        "micro_batch": args.micro_batch, "precision": args.precision, "zero_stage": args.zero_stage,
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "impls": args.impls,
        "torch_threads": torch.get_num_threads(), "versions": _versions(), "cuda": torch.version.cuda,
        "python": platform.python_version(), "git": source_commit(),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "definitions": {
            "tokens": "real (non-padding) tokens x code rows per batch, as af_train's engine counts them",
            "mfu": "af_train.run_logging.training_flops_per_token x tokens/s / peak FLOP/s per device "
                   "(the engine's formula and peak table); the same model FLOPs for every implementation",
            "timing": "wall clock per step from drawing the batch to a synchronised end; phases from CUDA events "
                      "(GPU) or perf_counter (CPU) around the DeepSpeed engine's forward/backward/step; "
                      "other = wall - data - phases (host-to-device copy, loss bookkeeping, all-reduce)",
            "peak_mem_gb": "CUDA only: memory held after warm-up (weights, optimizer state) + the largest extra "
                           "allocation inside one timed step",
            "alternation": "implementations run in turns of blocks (A/B/A/B) over --rounds rounds (default: "
                           "one step each); ratio_to_baseline = total tokens/s over the baseline's; "
                           "ratio_median/min/max summarise the per-round ratios (robust to a drifting machine)",
        },
    }
    print(f"af-benchmark-train on {label}: {args.preset}, seq {args.seq_len}, micro batch {args.micro_batch}, "
          f"{args.precision}, ZeRO-{args.zero_stage}, modes {' '.join(args.mode)}, impls {' '.join(args.impls)}, "
          f"{args.warmup} warm-up + {args.steps} timed steps each in {args.rounds} rounds", flush=True)
    work = Path(tempfile.mkdtemp(prefix="af_bench_train_"))
    rows: list[dict] = []
    details: dict[str, Any] = {}
    try:
        for mode in args.mode:
            mode_rows, details[mode] = measure_mode(args, mode, place, work)
            rows += mode_rows
            write_outputs(out_dir, rows, meta, details)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    for mode in args.mode:
        note = details[mode]["peak_note"]
        print(f"{mode}: model FLOPs per token {details[mode]['flops_per_token']:.4g}; {note}")
    print(f"wrote {out_dir / 'train.csv'}, {out_dir / 'train.json'}, {out_dir / 'train.png'}")
    failed = [r for r in rows if r["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
