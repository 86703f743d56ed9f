"""The experiment file: a strict YAML schema (unknown keys and wrong types are errors naming the key).

An experiment file describes one question::

    name: ft2_tau_alpha
    question: Does FT2 beat FT1, and at which temperature and weight?
    protocol: tiny model on CPU, spoken words of unseen speakers
    data:                      # made once (each step is skipped when its outputs exist with the same command)
      root: data/experiments/speech10
      steps:
        - {name: synth, command: [af-synth-speech, --out, "{data}/audio", ...], outputs: ["{data}/audio/labels.csv"]}
        - ...
      train: "{data}/shards/train"
      val: "{data}/shards/val"
      test: "{data}/shards/test"
    launch: {num_cpu_ranks: 2}  # af-train's resource flags for every run
    pretrain:                   # MLM on every code row an arm needs (row 0, plus FT2's frozen rows)
      recipe: recipes/tiny_pretrain.yaml
      overrides: [data.max_length=77, train.max_steps=500]
    finetune:
      recipe: recipes/tiny_ft1.yaml
      overrides: [data.max_length=77, train.max_steps=500]
    arms:
      - {name: ft1}
      - name: ft2_a0.8_t0.05
        finetune: {recipe: recipes/tiny_ft2.yaml, frozen_rows: [1, 2, 3],
                   overrides: [objective.alpha=0.8, objective.temperature=0.05]}
    baseline: ft1
    seeds: [0, 1, 2]

An arm's stage merges onto the base stage: its ``recipe`` and ``frozen_rows`` replace the base's when
given, its ``overrides`` come after the base's. Placeholders in commands, paths and overrides:
``{data}`` (data.root), ``{fold}`` and ``{val_fold}`` (with ``folds``), ``{seed}`` (seed_overrides),
``{row}`` (the pretraining recipe's path). Relative paths are relative to the working directory, as
for af-train.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from af_train.config import RecipeError, build_dataclass

PLACEHOLDERS = ("data", "fold", "val_fold", "seed", "row")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_]+)\}")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class ExperimentError(ValueError):
    """An experiment file, or a state of its runs, that cannot be used as asked; the message says why and how
    to fix it."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise RecipeError(message)


def placeholders_in(text: str) -> set[str]:
    return set(_PLACEHOLDER.findall(text))


def fill(text: str, values: dict[str, Any], where: str) -> str:
    """``text`` with its ``{name}`` placeholders replaced; an unknown or unavailable one is an error."""

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in PLACEHOLDERS:
            raise ExperimentError(f"{where}: unknown placeholder {{{name}}} in {text!r}; placeholders are "
                                  + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS))
        if values.get(name) is None:
            raise ExperimentError(f"{where}: placeholder {{{name}}} in {text!r} has no value here "
                                  f"({'give folds' if 'fold' in name else 'it is not defined at this point'})")
        return str(values[name])

    return _PLACEHOLDER.sub(replace, text)


@dataclass
class DataStep:
    """One command that makes (part of) the data, run once: ``outputs`` must exist afterwards."""

    name: str
    command: list[str]
    outputs: list[str] = field(default_factory=list)

    def validate(self) -> None:
        _require(bool(NAME.match(self.name)), f"data step name {self.name!r} must be letters, digits, _ . + -")
        _require(len(self.command) >= 1, f"data step '{self.name}' needs a command (a list: program and arguments)")
        _require(len(self.outputs) >= 1, f"data step '{self.name}' needs outputs: the files it makes, which say it "
                 "is done")


@dataclass
class DataSpec:
    """Where the shards come from. ``steps`` run in order, once (per fold when they use {fold} or
    {val_fold}); ``train``/``val``/``test`` are the shard directories every run reads (MLM pretraining
    reads ``pretrain_train``/``pretrain_val`` when given, and never the test split)."""

    root: str
    train: str
    val: str
    test: str
    steps: list[DataStep] = field(default_factory=list)
    pretrain_train: str | None = None  # MLM pretraining's shards, when not the fine-tuning ones (AudioSet-2M)
    pretrain_val: str | None = None

    def validate(self) -> None:
        names = [s.name for s in self.steps]
        _require(len(set(names)) == len(names), f"data.steps: names must be unique, got {names}")


@dataclass
class FoldSpec:
    """K-fold cross-validation: the k-th run tests on fold ``test[k]`` and selects on fold ``val[k]``; the rest
    train. The data steps that use {fold}/{val_fold} run once per fold."""

    test: list[int]
    val: list[int]

    def validate(self) -> None:
        _require(len(self.test) >= 2, f"folds.test needs at least two folds, got {self.test}")
        _require(len(set(self.test)) == len(self.test), f"folds.test repeats a fold: {self.test}")
        _require(len(self.val) == len(self.test), f"folds.val needs one validation fold per test fold "
                 f"({len(self.test)}), got {self.val}")
        same = [t for t, v in zip(self.test, self.val) if t == v]
        _require(not same, f"folds: fold {same[0] if same else ''} is both the test and the validation fold of a run")


@dataclass
class StageSpec:
    """A training stage: a recipe and overrides. In an arm every key is optional and merges onto the base."""

    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    frozen_rows: list[int] | None = None  # fine-tuning: FT2's frozen code rows (their MLM runs are made)

    def validate(self) -> None:
        if self.frozen_rows is not None:
            _require(all(r >= 1 for r in self.frozen_rows) and len(set(self.frozen_rows)) == len(self.frozen_rows),
                     f"frozen_rows must be distinct code rows >= 1 (row 0 is the trainable one), got "
                     f"{self.frozen_rows}")
        for text in self.overrides:
            key = text.split("=", 1)[0].strip()
            _require("=" in text, f"override {text!r} must look like key.sub=value")
            if key in MANAGED_KEYS:
                raise RecipeError(f"override {text!r}: af-experiment sets {key} itself ({MANAGED_KEYS[key]}); "
                                  "remove it")


# Recipe keys the experiment wires itself; an override of one would silently break the plan.
MANAGED_KEYS = {
    "train.run_dir": "one directory per run under the experiment's runs folder",
    "objective.frozen_row_checkpoints": "from frozen_rows and the MLM runs of those rows",
    "data.test": "from data.test: every arm is scored on the same test clips, so that they can be paired",
}


@dataclass
class ArmSpec:
    name: str
    about: str = ""
    pretrain: StageSpec = field(default_factory=StageSpec)
    finetune: StageSpec = field(default_factory=StageSpec)
    stage2: StageSpec = field(default_factory=StageSpec)

    def validate(self) -> None:
        _require(bool(NAME.match(self.name)), f"arm name {self.name!r} must be letters, digits, _ . + -")


@dataclass
class LaunchSpec:
    """af-train's resources for every run: GPUs of this machine or CPU processes (gloo)."""

    num_gpus: int | None = None
    num_cpu_ranks: int | None = None

    def validate(self) -> None:
        _require(self.num_gpus is None or self.num_gpus >= 0, "launch.num_gpus must be >= 0")
        _require(self.num_cpu_ranks is None or self.num_cpu_ranks >= 1, "launch.num_cpu_ranks must be >= 1")

    def args(self) -> list[str]:
        if self.num_gpus:
            return ["--num_gpus", str(self.num_gpus)]
        return ["--num_cpu_ranks", str(self.num_cpu_ranks or 1)]

    def ranks(self) -> int:
        return self.num_gpus or self.num_cpu_ranks or 1


@dataclass
class SlurmSpec:
    """``af-experiment FILE --emit-slurm DIR``: one array job per stage, one task per run."""

    partition: str | None = None
    account: str | None = None
    time: str = "24:00:00"
    cpus_per_task: int = 8
    mem: str | None = None
    extra: list[str] = field(default_factory=list)  # more #SBATCH lines, e.g. "--constraint=h100"
    setup: list[str] = field(default_factory=list)  # shell lines before each task (module load, venv)


@dataclass
class StatsSpec:
    metrics: list[str] = field(default_factory=lambda: ["mAP"])  # the first is the primary one
    rounds: int = 2000
    seed: int = 0
    confidence: float = 0.95
    resample_seeds: bool = True  # the interval covers seed-to-seed variation too, not only the test clips

    def validate(self) -> None:
        from af_train.metrics import RUN_METRICS

        _require(len(self.metrics) >= 1, "stats.metrics needs at least one metric")
        bad = [m for m in self.metrics if m not in RUN_METRICS]
        _require(not bad, f"stats.metrics: {bad[0] if bad else ''!r} is not one of {', '.join(RUN_METRICS)}")
        _require(self.rounds >= 100, f"stats.rounds must be >= 100, got {self.rounds}")
        _require(0.5 < self.confidence < 1.0, f"stats.confidence must be in (0.5, 1), got {self.confidence}")


@dataclass
class ExperimentSpec:
    name: str
    question: str
    protocol: str  # what it is run as: "tiny, CPU, spoken words" or "peers' protocol (AudioSet), not run here"
    data: DataSpec
    finetune: StageSpec
    arms: list[ArmSpec]
    baseline: str
    seeds: list[int]
    pretrain: StageSpec | None = None
    stage2: StageSpec | None = None
    launch: LaunchSpec = field(default_factory=LaunchSpec)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    folds: FoldSpec | None = None
    seed_overrides: list[str] = field(default_factory=lambda: ["train.seed={seed}", "data.shuffle_seed={seed}"])
    pretrain_per_seed: bool = True  # False: one MLM run per row and configuration, shared by every seed
    runs: str | None = None  # where the runs go; default runs/experiments/<name>
    results: str | None = None  # where results.json/.md and the plots go; default experiments/results/<name>
    stats: StatsSpec = field(default_factory=StatsSpec)
    notes: list[str] = field(default_factory=list)  # printed under the results table
    source: str = field(default="<dict>", init=False, compare=False, repr=False)

    def validate(self) -> None:
        _require(bool(NAME.match(self.name)), f"name {self.name!r} must be letters, digits, _ . + -")
        names = [a.name for a in self.arms]
        _require(len(names) >= 1, "arms: give at least one arm")
        _require(len(set(names)) == len(names), f"arms: names must be unique, got {names}")
        _require(self.baseline in names, f"baseline {self.baseline!r} is not an arm; arms are {', '.join(names)}")
        _require(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds),
                 f"seeds must be distinct and at least one, got {self.seeds}")
        _require(self.finetune.recipe is not None, "finetune.recipe is required (the base fine-tuning recipe)")
        if self.pretrain is not None:
            _require(self.pretrain.recipe is not None, "pretrain.recipe is required when pretrain is given")
            _require(self.pretrain.frozen_rows is None, "pretrain takes no frozen_rows (fine-tuning does)")
        for arm in self.arms:
            if self.pretrain is None and (arm.pretrain.recipe or arm.pretrain.overrides):
                raise RecipeError(f"arm '{arm.name}' overrides pretrain, but the experiment has no pretrain stage")
            if self.stage2 is None and (arm.stage2.recipe or arm.stage2.overrides or arm.stage2.frozen_rows):
                raise RecipeError(f"arm '{arm.name}' overrides stage2, but the experiment has no stage2")
        for text in self.seed_overrides:
            _require("{seed}" in text, f"seed_overrides entry {text!r} must use {{seed}}")

    @property
    def runs_dir(self) -> Path:
        return Path(self.runs or f"runs/experiments/{self.name}")

    @property
    def results_dir(self) -> Path:
        return Path(self.results or f"experiments/results/{self.name}")

    def arm(self, name: str) -> ArmSpec:
        return next(a for a in self.arms if a.name == name)


def load_experiment(path: str | Path) -> ExperimentSpec:
    """The experiment file at ``path``, checked strictly (``ExperimentError`` names the key and the file)."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file '{path}' does not exist (experiments/*.yaml are the shipped ones)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ExperimentError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ExperimentError(f"{path}: an experiment file is a YAML mapping (name, question, data, ...)")
    try:
        spec = build_dataclass(ExperimentSpec, data, str(path))
    except RecipeError as exc:
        raise ExperimentError(str(exc)) from None
    spec.source = str(path)
    return spec
