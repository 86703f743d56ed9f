#!/usr/bin/env python3
"""``make demo``: the whole af_train pipeline on embedded, realistic speech data, end to end.

    python3 tools/demo.py [--out runs/demo] [--data data/demo] [--plan] [--redo STAGE ...]

Stages (each one is a command you can also run by hand; ``--plan`` prints them):

1. ``synth``       af-synth-speech: 10 spoken words from many synthetic voices (eSpeak NG), 1 s clips;
                   the validation and test speakers are never heard in training (chance accuracy 0.10).
2. ``fit_tokenizer`` af-fit-tokenizer (only without the official EnCodec weights): a ``mel-rvq``
                   tokenizer (residual k-means over log-mel frames, 75 Hz, 4 code rows) fitted on the
                   training split. With ``encodec_24khz-d7cc33bc.th`` in the torch hub cache (or
                   ``--codec-checkpoint``) the demo tokenizes with the official EnCodec instead.
3. ``prepare``     af-prepare: tokenize every split into MDS shards; the manifest records the tokenizer.
4. ``baselines``   on the test split: the label prior and a bag of codes (logistic regression on code
                   histograms), the bars a sequence model has to clear.
5. ``pretrain_rowR`` af-train: MLM pretraining of the tiny RoFormer on code row R through the DeepSpeed
                   launcher (all GPUs when present, else ``--num-cpu-ranks`` CPU processes): row 0 for
                   fine-tuning, the other rows as FT2's frozen encoders. ``train.probe`` scores the
                   encoder's frozen embeddings (a linear probe of each layer on the labelled train/val
                   clips, the best layer on val reported) every tenth of the run.
6. ``ft1``, ``ft2`` af-train: fine-tuning from the row-0 encoder (FT1: classification; FT2: + MPC
                   against the frozen row encoders); the checkpoint is selected on val/mAP.
7. ``evaluate_ft1``, ``evaluate_ft2`` af-evaluate on the held-out test speakers with the selected
                   checkpoint, plus per-class AP and the label-prior baseline (cross-checked).
8. ``plots``       tools/plot_run.py: loss curves (with the probe curve of pretraining), validation mAP,
                   per-class AP (PNG) in every run.

Then a results table (``OUT/results.md``, ``OUT/results.json``): test accuracy and mAP of FT1 and FT2
against chance, the label prior and the bag of codes. TensorBoard logs are in every run directory
(``tensorboard --logdir runs/demo``). Rerunning reuses finished stages (markers in ``OUT/.stages`` keyed
by a hash of the stage's configuration and its inputs) and resumes an interrupted training run from
its last checkpoint. ``--codec-random-init SEED`` tokenizes with a random-initialised EnCodec instead:
for plumbing checks only, its codes carry almost no information about speech.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make af_train and the sibling modules importable
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import demo_eval  # noqa: I001
    import demo_stages as st
else:
    from . import demo_eval
    from . import demo_stages as st
from af_train.checkpoint import latest_complete, read_best  # noqa: E402
from af_train.tokenizers.encodec import OFFICIAL_CHECKPOINT, OFFICIAL_URL, hub_checkpoint_dir  # noqa: E402

ENCODEC_WEIGHTS = OFFICIAL_CHECKPOINT
RECIPES = REPO / "recipes"
DEFAULT_DATA = Path("data/demo")


@dataclass
class Settings:
    """The demo's size; ``--smoke`` shrinks it to about a minute for the README test."""

    train_speakers: int = 40
    val_speakers: int = 8
    test_speakers: int = 12
    repeats: int = 2  # takes of every word per speaker
    clip_seconds: float = 1.0
    seed: int = 0
    codes: int = 1024  # mel-rvq codebook size (entries per code row)
    frozen_rows: tuple[int, ...] = (1, 2, 3)
    pretrain_steps: int = 500
    ft_steps: int = 500
    eval_every: int = 50
    # FT2's loss weights for the tiny setting, chosen on val/mAP among (alpha, T) = (0.8, 0.05) (the paper's
    # stage 1, recipes/tiny_ft2.yaml), (0.9, 0.2), (0.95, 0.1), (0.97, 0.05): with tiny frozen row encoders
    # a strong MPC term pulls row 0 towards embeddings that carry little class information (0.8 / 0.05 lost
    # 0.16 test mAP against FT1 on the earlier synthetic tones).
    ft2_alpha: float = 0.95
    ft2_temperature: float = 0.1
    micro_batch_size: int | None = None  # default: the recipe's (8)
    max_length: int | None = 77  # 1 s clips: 75 frames + BOA + EOA


SMOKE = Settings(train_speakers=2, val_speakers=1, test_speakers=1, repeats=1, frozen_rows=(1,),
                 pretrain_steps=3, ft_steps=3, eval_every=3, micro_batch_size=4)


@dataclass(frozen=True)
class TokenizerChoice:
    """How the demo tokenizes: ``mel-rvq`` (fitted here), the official ``encodec`` weights, or ``random``."""

    kind: str  # "mel-rvq" | "encodec" | "random"
    checkpoint: Path | None = None  # encodec: the official weights file
    seed: int = 0  # random: the random-init seed

    def note(self) -> str:
        if self.kind == "encodec":
            return f"official EnCodec weights {self.checkpoint}"
        if self.kind == "random":
            return f"RANDOM-INITIALISED EnCodec (seed {self.seed}; plumbing only)"
        return "mel-rvq fitted on the demo's training split"


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


def find_codec_weights(explicit: str | None) -> Path | None:
    """The official EnCodec checkpoint: ``--codec-checkpoint`` or the torch hub cache (never downloads)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise SystemExit(f"--codec-checkpoint {explicit}: no such file. Download {ENCODEC_WEIGHTS} "
                             f"({OFFICIAL_URL}) or leave the option out to use a random-initialised codec")
        return path
    candidate = hub_checkpoint_dir() / ENCODEC_WEIGHTS
    return candidate if candidate.is_file() else None


def ranks_args(num_gpus: int | None, num_cpu_ranks: int) -> list[str]:
    """af-train's resource flags: all visible GPUs when there are any, else CPU ranks."""
    if num_gpus is None:
        try:
            import torch

            num_gpus = torch.cuda.device_count()
        except Exception:  # noqa: BLE001 - a broken CUDA setup still lets the demo run on the CPU
            num_gpus = 0
    return ["--num_gpus", str(num_gpus)] if num_gpus > 0 else ["--num_cpu_ranks", str(num_cpu_ranks)]


def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint selected on validation (``checkpoints/best``), else the latest complete one."""
    root = run_dir / "checkpoints"
    best = read_best(root)
    if best is not None:
        return root / best[0]
    latest = latest_complete(root)
    if latest is None:
        raise FileNotFoundError(f"{root}: no complete checkpoint; did the training stage finish?")
    return latest


def build_plan(out: Path, data: Path, s: Settings, ranks: list[str], tokenizer: TokenizerChoice) -> list[st.Stage]:
    audio, shards = data / "audio", data / "shards"
    labels, vocabulary = audio / "labels.csv", audio / "vocabulary.txt"
    splits = {split: shards / split for split in ("train", "val", "test")}
    # recipes/tiny_*.yaml read data/demo/shards/{train,val,test}: name the splits only when elsewhere
    data_overrides = [] if data == DEFAULT_DATA else [f"data.{k}={v}" for k, v in splits.items()]
    if s.max_length is not None:
        data_overrides.append(f"data.max_length={s.max_length}")
    batch = [f"train.micro_batch_size={s.micro_batch_size}"] if s.micro_batch_size else []
    speakers = f"{s.train_speakers}/{s.val_speakers}/{s.test_speakers}"
    stages = [
        st.Stage("synth", f"speak 10 words ({s.clip_seconds:g} s clips), {speakers} train/val/test speakers (disjoint)",
                 ["af-synth-speech", "--out", str(audio), "--train-speakers", str(s.train_speakers),
                  "--val-speakers", str(s.val_speakers), "--test-speakers", str(s.test_speakers),
                  "--repeats", str(s.repeats), "--clip-seconds", f"{s.clip_seconds:g}", "--seed", str(s.seed)],
                 outputs=[labels, vocabulary], owned=[audio]),
    ]
    if tokenizer.kind == "mel-rvq":
        fitted = data / "mel_rvq.safetensors"
        stages.append(st.Stage(
            "fit_tokenizer", f"fit the mel-rvq tokenizer (4 rows x {s.codes} codes) on the training split",
            ["af-fit-tokenizer", "--kind", "mel-rvq", "--format", "csv", "--input", str(labels), "--out", str(fitted),
             "--rows", "4", "--codes", str(s.codes), "--seed", str(s.seed)],
            outputs=[fitted], owned=[fitted], depends=["synth"]))
        tokenizer_args, title, files = ["--tokenizer", str(fitted)], "tokenize with the fitted mel-rvq", []
    elif tokenizer.kind == "encodec":
        tokenizer_args = ["--tokenizer", "encodec", "--codec-checkpoint", str(tokenizer.checkpoint)]
        title, files = "tokenize with EnCodec (3 kbps, 4 code rows)", [tokenizer.checkpoint]
    else:
        tokenizer_args = ["--codec-random-init", str(tokenizer.seed)]
        title, files = "tokenize with a RANDOM-INITIALISED EnCodec (plumbing only)", []
    stages += [
        st.Stage("prepare", f"{title} into MDS shards",
                 ["af-prepare", "--format", "csv", "--input", str(labels), "--labels", str(vocabulary),
                  "--out", str(shards), "--clip-seconds", f"{s.clip_seconds:g}", "--single-label", *tokenizer_args],
                 outputs=[p / "manifest.json" for p in splits.values()], owned=[shards],
                 depends=["synth"] + (["fit_tokenizer"] if tokenizer.kind == "mel-rvq" else []), files=files),
        st.Stage("baselines", "baselines on the test split: label prior, bag of codes (logistic regression)",
                 ["python3", _rel(REPO / "tools" / "demo_eval.py"), str(shards), "--out", str(out / "baselines.json")],
                 outputs=[out / "baselines.json"], owned=[out / "baselines.json"], depends=["prepare"],
                 files=[REPO / "tools" / "demo_eval.py"]),
    ]
    pretrain_recipe = RECIPES / "tiny_pretrain.yaml"
    no_test = [o for o in data_overrides if not o.startswith("data.test=")]  # pretraining never sees test clips
    for row in (0, *s.frozen_rows):
        run = out / f"pretrain_row{row}"
        every = max(1, s.pretrain_steps // 4)
        stages.append(st.Stage(
            f"pretrain_row{row}", f"MLM pretraining on code row {row} ({s.pretrain_steps} steps)",
            ["af-train", *ranks, "--recipe", _rel(pretrain_recipe), *no_test, f"data.code_rows=[{row}]",
             f"train.run_dir={run}",
             f"train.max_steps={s.pretrain_steps}", f"train.eval_every={every}", f"train.save_every={every}",
             # the probe curve: a linear probe on frozen embeddings of the labelled train/val clips (never test),
             # each layer probed and the best on val reported (kNN stays flat here: README, "Probes"); every
             # probe runs: within the default 5 % time budget these one-minute runs would keep only the first
             # and the last (the README has the measured shares)
             f"train.probe.dataset={shards}", f"train.probe.every={max(1, s.pretrain_steps // 10)}",
             "train.probe.kind=linear", "train.probe.layer=best", "train.probe.max_time_share=null",
             f"optim.warmup_steps={max(1, s.pretrain_steps // 20)}", *batch],
            outputs=[run / "final" / "model.pt"], owned=[run], depends=["prepare"], files=[pretrain_recipe]))
    row0 = out / "pretrain_row0" / "final" / "model.pt"
    frozen = ",".join(str(out / f"pretrain_row{r}" / "final" / "model.pt") for r in s.frozen_rows)
    for mode in ("ft1", "ft2"):
        run = out / mode
        recipe = RECIPES / f"tiny_{mode}.yaml"
        extra = []
        depends = ["pretrain_row0"]
        if mode == "ft2":
            extra = [f"data.code_rows=[{','.join(str(r) for r in (0, *s.frozen_rows))}]",
                     f"objective.frozen_row_checkpoints=[{frozen}]", f"objective.alpha={s.ft2_alpha:g}",
                     f"objective.temperature={s.ft2_temperature:g}"]
            depends += [f"pretrain_row{r}" for r in s.frozen_rows]
        stages.append(st.Stage(
            mode, ("fine-tune: classification (FT1)" if mode == "ft1" else
                   f"fine-tune: classification + MPC against frozen rows {list(s.frozen_rows)} (FT2)")
            + f", {s.ft_steps} steps",
            ["af-train", *ranks, "--recipe", _rel(recipe), *data_overrides, *extra,
             f"objective.init_checkpoint={row0}", f"train.run_dir={run}", f"train.max_steps={s.ft_steps}",
             f"train.eval_every={s.eval_every}", f"train.save_every={s.eval_every}",
             f"optim.warmup_steps={max(1, s.ft_steps // 20)}", *batch],
            outputs=[run / "final" / "model.pt"], owned=[run], depends=depends, files=[recipe]))
    for mode in ("ft1", "ft2"):
        run = out / mode
        stages.append(st.Stage(
            f"evaluate_{mode}", f"{mode.upper()} on the held-out test clips (checkpoint selected on val/mAP)",
            ["af-evaluate", str(run), "--split", "test", "--out", str(run / "eval_test.json")],
            outputs=[run / "eval_test.json", run / "per_class_ap.json", run / "test_scores.npz"],
            owned=[run / "eval_test.json", run / "per_class_ap.json", run / "test_scores.npz"],
            depends=[mode], params={"checkpoint": "best by val/mAP", "per_class": 1},
            # the selected checkpoint is known only once training is done
            late_args=lambda run=run: ["--checkpoint", str(best_checkpoint(run))],
            late_note="--checkpoint <the checkpoint selected on val/mAP>",
            function=lambda run=run: evaluate_follow_up(run)))
    runs = [out / f"pretrain_row{r}" for r in (0, *s.frozen_rows)] + [out / "ft1", out / "ft2"]
    stages.append(st.Stage(
        "plots", "PNG plots: loss curves, validation mAP, per-class AP",
        ["python3", _rel(REPO / "tools" / "plot_run.py"), *map(str, runs), "--compare", str(out / "plots")],
        outputs=[out / "plots" / "compare_val.png", out / "ft1" / "plots" / "per_class_ap.png"],
        depends=["evaluate_ft1", "evaluate_ft2", *[f"pretrain_row{r}" for r in (0, *s.frozen_rows)]],
        files=[REPO / "tools" / "plot_run.py"]))
    return stages


def _rel(path: Path) -> str:
    """Paths inside the repository as the README writes them (the demo runs from the repository root)."""
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------------
# Running stages
# --------------------------------------------------------------------------------------------------

# Lines worth showing on the terminal (everything goes to the stage's log file).
_SHOW = re.compile(
    r"af_train\.(engine|evaluate)|af_train\.data\.loader: data\.train|^wrote |summary|written \d+|codec|"
    r"Traceback|Error|error:|exits with return code|^\s+\w+: written|^\s*\"test/mAP\"|random|^baselines:|^fit|"
    r"^wrote .*safetensors", re.IGNORECASE)
_HIDE = re.compile(r"streaming\.base|real_accelerator|MFU not computed|Setting accelerator", re.IGNORECASE)
_TQDM = re.compile(r"\d+%\|")
_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\[rank\d+\] )?(INFO |WARNING )?")
_LOG_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ")
_STEP = re.compile(r"engine: step (\d+)/(\d+) ")


def _reader(stream, lines: queue.Queue) -> None:
    buffer = b""
    while True:
        chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
        if not chunk:
            break
        buffer += chunk
        *parts, buffer = re.split(rb"[\r\n]", buffer)
        for part in parts:
            lines.put(part.decode("utf-8", errors="replace"))
    if buffer:
        lines.put(buffer.decode("utf-8", errors="replace"))
    lines.put(None)


def run_command(command: list[str], log_path: Path, verbose: bool, heartbeat: float = 20.0) -> int:
    """Run ``command``, all output to ``log_path``, the informative lines (and a heartbeat) to the terminal."""
    executable = sys.executable if command[0] == "python3" else shutil.which(command[0])
    if executable is None:
        raise SystemExit(f"'{command[0]}' is not on PATH: install af_train first (make install, or "
                         f"python3 -m pip install -c constraints.txt -e .)")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = last_shown = last_bar = time.time()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(command)}   # {st.now()}\n")
        process = subprocess.Popen([executable, *command[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   cwd=REPO, env=env, start_new_session=True)
        lines: queue.Queue = queue.Queue()
        reader = threading.Thread(target=_reader, args=(process.stdout, lines), daemon=True)
        reader.start()
        try:
            while True:
                try:
                    line = lines.get(timeout=1.0)
                except queue.Empty:
                    line = ""
                if line is None:
                    break
                if line:
                    log.write(line + "\n")
                    start = _LOG_START.search(line)
                    if start is not None and start.start() > 0:  # a log line glued to a progress bar's \r update
                        line = line[start.start():]
                    show = verbose or (_SHOW.search(line) is not None and _HIDE.search(line) is None)
                    step = _STEP.search(line)
                    if _TQDM.search(line) is not None or step is not None:  # progress: every 10 s and the end
                        last = step is not None and step.group(1) == step.group(2)
                        show = verbose or last or time.time() - last_bar > 10.0
                        last_bar = time.time() if show else last_bar
                    if show:
                        print("    " + _LOG_PREFIX.sub("", line.rstrip())[:200], flush=True)
                        last_shown = time.time()
                if time.time() - last_shown > heartbeat:
                    print(f"    ... still running ({st.format_seconds(time.time() - started)}; full log: {log_path})",
                          flush=True)
                    last_shown = time.time()
            return process.wait()
        except KeyboardInterrupt:
            # The child runs in its own session: pass Ctrl-C on (the engine saves a checkpoint after the
            # step and exits), give it a minute, then stop it for good. Rerunning resumes the stage.
            print(f"\n    interrupted: stopping {command[0]} (a training run saves a checkpoint first); rerun to "
                  "resume", flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            reader.join(timeout=5)
            while not lines.empty():  # what it said while stopping belongs in the log
                line = lines.get()
                if line is not None:
                    log.write(line + "\n")
            raise


def cpu_seconds() -> float:
    """User + system CPU time of this process and of every finished child process (and theirs) so far.

    On a shared machine a stage's wall time depends on the other load; its CPU time does not, so the demo
    reports both.
    """
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_stages(stages: list[st.Stage], out: Path, *, redo: set[str], verbose: bool) -> list[dict[str, Any]]:
    """Run (or reuse) every stage in order; returns the timing rows of the results table."""
    hashes: dict[str, str] = {}
    timings = []
    for index, stage in enumerate(stages, 1):
        digest = st.stage_hash(stage, hashes)
        hashes[stage.name] = digest
        marker = st.read_marker(out, stage.name)
        state, reason = st.decide(stage, digest, marker)
        if stage.name in redo and state != st.FRESH:
            state, reason = st.FRESH, "--redo"
        header = f"[{index}/{len(stages)}] {stage.name}: {stage.title}"
        if state == st.REUSE:
            print(f"{header}\n    reused: {reason}", flush=True)
            timings.append({"stage": stage.name, "title": stage.title, "state": "reused",
                            "seconds": marker.get("seconds"), "cpu_seconds": marker.get("cpu_seconds")})
            continue
        print(f"{header}\n    {'resuming' if state == st.RESUME else 'running'}: {reason}", flush=True)
        if state == st.FRESH:
            for path in st.clear_outputs(stage):
                print(f"    removed earlier output {path}", flush=True)
        print(f"    $ {stage.shell()}", flush=True)
        st.write_marker(out, stage.name, {"hash": digest, "status": "running", "started": st.now()})
        started, cpu_started = time.time(), cpu_seconds()
        if stage.command:
            rc = run_command(stage.argv(), out / "logs" / f"{stage.name}.log", verbose)
            if rc != 0:
                log = out / "logs" / f"{stage.name}.log"
                tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
                raise SystemExit(f"\nstage '{stage.name}' failed (exit {rc}). Last lines of {log}:\n{tail}\n\n"
                                 "Fix the cause and run the same command again: finished stages are reused.")
        if stage.function is not None:
            stage.function()
        seconds, cpu = time.time() - started, cpu_seconds() - cpu_started
        st.write_marker(out, stage.name, {"hash": digest, "status": "done", "seconds": seconds, "cpu_seconds": cpu,
                                          "finished": st.now(), "command": stage.shell()})
        print(f"    done in {st.format_seconds(seconds)} (CPU time {st.format_seconds(cpu)})", flush=True)
        timings.append({"stage": stage.name, "title": stage.title, "state": "resumed" if state == st.RESUME else "ran",
                        "seconds": seconds, "cpu_seconds": cpu})
    return timings


# --------------------------------------------------------------------------------------------------
# Evaluation follow-ups and the report
# --------------------------------------------------------------------------------------------------


def evaluate_follow_up(run: Path) -> None:
    """After af-evaluate: per-class AP + label prior on the same checkpoint; the two mAPs must agree."""
    checkpoint = best_checkpoint(run)
    scored = demo_eval.score_run(run, checkpoint, "test")
    summary = demo_eval.summarize(scored, "test", f"checkpoint {checkpoint.name}, selected on val/mAP")
    official = json.loads((run / "eval_test.json").read_text(encoding="utf-8"))
    if abs(official["test/mAP"] - summary["mAP"]) > 1e-6:
        raise SystemExit(f"{run}: af-evaluate test/mAP {official['test/mAP']:.6f} differs from the per-class "
                         f"evaluation {summary['mAP']:.6f}; the two must score the same clips with the same weights")
    summary["checkpoint"] = str(checkpoint)
    demo_eval.write_json(run / "per_class_ap.json", summary)
    demo_eval.save_scores(run / "test_scores.npz", scored)
    print(f"    test mAP {summary['mAP']:.3f} (label-prior baseline {summary['prior_mAP']:.3f}) on "
          f"{summary['num_clips']} clips; per-class AP in {run / 'per_class_ap.json'}", flush=True)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def collect_results(out: Path, s: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Rows of the model table (eval and per-class files), the pretraining table (final/metrics.json) and the
    baselines (``baselines.json``)."""
    models = []
    for mode in ("ft1", "ft2"):
        run = out / mode
        per_class, official = _read_json(run / "per_class_ap.json"), _read_json(run / "eval_test.json")
        best = _read_json(run / "final" / "metrics.json").get("best", {})
        models.append({
            "name": mode.upper(), "best_step": best.get("step"), "val_mAP": best.get("value"),
            "test_mAP": official.get("test/mAP"), "test_auc": official.get("test/auc"),
            "test_d_prime": official.get("test/d_prime"), "test_accuracy": official.get("test/accuracy"),
            "prior_mAP": per_class.get("prior_mAP"), "num_test": per_class.get("num_clips"),
        })
    pretraining = []
    for row in (0, *s.frozen_rows):
        run = out / f"pretrain_row{row}"
        final = _read_json(run / "final" / "metrics.json")
        pretraining.append({"name": run.name, "row": row, "steps": final.get("step"),
                            "val_mlm_loss": final.get("val/mlm_loss"),
                            "val_mlm_accuracy": final.get("val/mlm_accuracy")})
    return models, pretraining, _read_json(out / "baselines.json")


def report(out: Path, s: Settings, timings: list[dict[str, Any]], codec_note: str, wall: float,
           enforce: bool = True) -> int:
    models, pretraining, baselines = collect_results(out, s)
    difference = None
    a, b = out / "ft1" / "test_scores.npz", out / "ft2" / "test_scores.npz"
    if a.is_file() and b.is_file():
        sa, sb = demo_eval.load_scores(a), demo_eval.load_scores(b)
        if sa["ids"] != sb["ids"]:
            raise SystemExit("FT1 and FT2 were scored on different test clips; rerun with --redo evaluate_ft1 "
                             "evaluate_ft2")
        difference = demo_eval.paired_bootstrap(sa["scores"], sb["scores"], sa["targets"])
    text = st.results_tables(models, pretraining, timings, baselines)
    checks = st.verdicts({m["name"]: m for m in models if m["test_mAP"] is not None and m["prior_mAP"] is not None},
                         difference, baselines)
    lines = [f"af_train demo results ({st.now()}; tokenizer: {codec_note})", "", text]
    lines += [("PASS  " if ok else "CHECK ") + sentence for ok, sentence in checks]
    lines += ["", f"wall time of this invocation: {st.format_seconds(wall)}",
              f"plots: {out}/*/plots/*.png and {out}/plots/; TensorBoard: tensorboard --logdir {out}"]
    body = "\n".join(lines) + "\n"
    (out / "results.md").write_text(body, encoding="utf-8")
    demo_eval.write_json(out / "results.json", {"models": models, "pretraining": pretraining, "timings": timings,
                                                "baselines": baselines, "ft2_minus_ft1": difference,
                                                "tokenizer": codec_note,
                                                "checks": [{"passed": ok, "check": c} for ok, c in checks],
                                                "wall_seconds": wall})
    print("\n" + body, flush=True)
    print(f"(also in {out / 'results.md'} and {out / 'results.json'})")
    if not enforce:
        print("(--smoke: a few steps cannot learn; the checks above are shown, not enforced)")
        return 0
    return 0 if all(ok for ok, _ in checks) else 1


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="demo.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Stages: synth, fit_tokenizer, prepare, baselines, pretrain_row0.., ft1, "
                                            "ft2, evaluate_ft1, evaluate_ft2, plots. Exit status 1 when a result "
                                            "check fails.")
    parser.add_argument("--out", default="runs/demo", help="run directory of the demo (default runs/demo)")
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="where the spoken-word audio, the fitted tokenizer and the shards go (default data/demo, "
                             "where recipes/tiny_* look for them)")
    parser.add_argument("--plan", action="store_true", help="print the stages, their commands and state; run nothing")
    parser.add_argument("--redo", nargs="+", default=[], metavar="STAGE", help="run these stages again from scratch")
    parser.add_argument("--verbose", action="store_true", help="show every line of every command")
    parser.add_argument("--num-cpu-ranks", type=int, default=2, help="CPU processes when there is no GPU (default 2)")
    parser.add_argument("--num-gpus", type=int, help="GPUs to use (default: all visible; 0: start --num-cpu-ranks "
                                                     "processes as on a machine without GPU)")
    tokenizer = parser.add_mutually_exclusive_group()
    tokenizer.add_argument("--codec-checkpoint", help=f"official EnCodec weights ({ENCODEC_WEIGHTS}); default: the "
                                                      "torch hub cache when the file is there, else a mel-rvq "
                                                      "tokenizer fitted on the training split")
    tokenizer.add_argument("--mel-rvq", action="store_true",
                           help="fit and use the mel-rvq tokenizer even when the official EnCodec weights are present")
    tokenizer.add_argument("--codec-random-init", type=int, metavar="SEED",
                           help="plumbing checks only: a random-initialised EnCodec, whose codes carry almost no "
                                "information about speech")
    size = parser.add_argument_group("size (defaults: about 10 minutes on 2 CPU cores)")
    size.add_argument("--train-speakers", type=int, help=f"training speakers (default {Settings.train_speakers})")
    size.add_argument("--frozen-rows", help="FT2's frozen code rows, comma-separated (default 1,2,3)")
    size.add_argument("--pretrain-steps", type=int, help=f"per pretraining run (default {Settings.pretrain_steps})")
    size.add_argument("--ft-steps", type=int, help=f"per fine-tuning run (default {Settings.ft_steps})")
    size.add_argument("--smoke", action="store_true", help="a miniature for tests (about a minute): 4 speakers, 40 "
                                                           "clips, 3 steps per run, one frozen row; checks not "
                                                           "enforced")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings(**vars(SMOKE)) if args.smoke else Settings()
    if args.train_speakers is not None:
        if args.train_speakers < 1:
            raise SystemExit(f"--train-speakers {args.train_speakers}: give at least 1")
        s.train_speakers = args.train_speakers
    if args.frozen_rows is not None:
        try:
            rows = tuple(int(r) for r in args.frozen_rows.split(",") if r.strip())
        except ValueError:
            raise SystemExit(f"--frozen-rows {args.frozen_rows!r}: give code rows like 1,2,3") from None
        if not rows or any(r < 1 or r > 3 for r in rows) or len(set(rows)) != len(rows):
            raise SystemExit(f"--frozen-rows {args.frozen_rows!r}: distinct rows among 1, 2, 3 (the tokenizers have 4 "
                             "rows; row 0 is the trainable one)")
        s.frozen_rows = rows
    if args.pretrain_steps is not None:
        s.pretrain_steps = args.pretrain_steps
    if args.ft_steps is not None:
        s.ft_steps = args.ft_steps
        s.eval_every = max(1, min(s.eval_every, args.ft_steps))
    return s


def choose_tokenizer(args: argparse.Namespace) -> tuple[TokenizerChoice, str | None]:
    """The tokenizer and, when it is not the official EnCodec, why (for the banner)."""
    if args.codec_random_init is not None:
        return TokenizerChoice("random", seed=args.codec_random_init), "--codec-random-init was given"
    if args.mel_rvq:
        return TokenizerChoice("mel-rvq"), "--mel-rvq was given"
    weights = find_codec_weights(args.codec_checkpoint)
    if weights is not None:
        return TokenizerChoice("encodec", checkpoint=weights), None
    return TokenizerChoice("mel-rvq"), (f"the official EnCodec weights ({ENCODEC_WEIGHTS}) are not in the torch hub "
                                        f"cache ({hub_checkpoint_dir()})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Commands run from the repository root; paths inside it are written relative to it (readable, as in README).
    out, data = (Path(_rel(Path(p).resolve())) for p in (args.out, args.data))
    previous = os.getcwd()
    os.chdir(REPO)
    try:
        return _main(args, out, data)
    finally:
        os.chdir(previous)


def _main(args: argparse.Namespace, out: Path, data: Path) -> int:
    s = settings_from(args)
    tokenizer, why = choose_tokenizer(args)
    ranks = ranks_args(args.num_gpus, args.num_cpu_ranks)
    stages = build_plan(out, data, s, ranks, tokenizer)
    names = {stage.name for stage in stages}
    unknown = sorted(set(args.redo) - names)
    if unknown:
        raise SystemExit(f"--redo {' '.join(unknown)}: no such stage; stages are {', '.join(sorted(names))}")
    if args.plan:
        hashes: dict[str, str] = {}
        for stage in stages:
            hashes[stage.name] = digest = st.stage_hash(stage, hashes)
            state, reason = st.decide(stage, digest, st.read_marker(out, stage.name))
            print(f"# {stage.name} [{state}: {reason}]\n{stage.shell()}")
        return 0

    print(f"af_train demo -> {out}  (data in {data}; {' '.join(ranks[:2])})", flush=True)
    if tokenizer.kind == "mel-rvq":
        print("\n" + "=" * 100 + f"\n== {why[0].upper()}{why[1:]}.\n== Tokenizing with mel-rvq instead: a residual "
              f"k-means over log-mel frames (75 Hz, 4 rows x {s.codes} codes),\n== fitted on the demo's training "
              f"split (stage fit_tokenizer) and recorded in the shards' manifest.\n" + "=" * 100 + "\n", flush=True)
    elif tokenizer.kind == "random":
        print("\n" + "!" * 100 + f"\n!! {why}: tokenizing with a RANDOM-INITIALISED EnCodec (seed {tokenizer.seed}).\n"
              "!! For plumbing checks only: its codes carry almost no information about speech, so expect the "
              "checks to fail.\n" + "!" * 100 + "\n", flush=True)
    started = time.time()
    try:
        timings = run_stages(stages, out, redo=set(args.redo), verbose=args.verbose)
    except KeyboardInterrupt:
        print("\ndemo stopped; run it again to continue (finished stages are reused, training resumes from its "
              "last checkpoint)", flush=True)
        return 130
    return report(out, s, timings, tokenizer.note(), time.time() - started, enforce=not args.smoke)


if __name__ == "__main__":
    sys.exit(main())
