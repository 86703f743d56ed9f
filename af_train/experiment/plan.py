"""An experiment file expanded into units: data steps and training runs, each keyed by what it depends on.

Every unit has a key: a hash of its command (recipe content, overrides, resources) and of the keys of
the units it reads from. A run's directory ends in its key (``RUNS/finetune/ft1-seed0-3f2a9c1d``), so
a changed configuration gets a new directory and an unchanged one finds its finished or interrupted
run again, whatever the arms are called or in which order they come. Arms that resolve to the same
configuration share their runs (FT1 and FT2 arms share their MLM runs, for example).

Nothing here runs anything or needs the data: ``build_plan`` only loads each run's recipe with its
overrides through the strict recipe loader, so a wrong key stops the experiment before the first
run, naming the arm and the key.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from af_train.config import Recipe, RecipeError
from af_train.experiment.spec import ExperimentError, ExperimentSpec, StageSpec, fill, placeholders_in
from af_train.files import sha256_file

TRAINABLE_ROW = 0  # FT1/FT2 fine-tune the encoder of code row 0 (the paper's setting)
FOLD_PLACEHOLDERS = {"fold", "val_fold"}


@dataclass
class Unit:
    """One thing to run: a data step or a training run (with its test scoring when it is evaluated)."""

    key: str  # hash of what it does and of the keys of its inputs
    kind: str  # "data" | "train"
    stage: str  # data step name, "pretrain", "finetune" or "stage2"
    label: str  # readable part of the name, e.g. "row0-seed1" or "ft1-seed0-fold2"
    command: list[str]
    outputs: list[Path]  # all exist once it is done
    directory: Path  # the run directory (data steps: where the marker goes)
    depends: list[str] = field(default_factory=list)  # keys of the units it reads from
    evaluate: bool = False  # the run whose test scores are an arm's result
    arms: list[str] = field(default_factory=list)  # arms that use it
    seed: int | None = None
    fold: int | None = None

    @property
    def name(self) -> str:
        return f"{self.stage}/{self.label}"

    def shell(self) -> str:
        return shlex.join(self.command)


@dataclass
class Result:
    """Where one arm × seed × fold finds its evaluated run."""

    arm: str
    seed: int
    fold: int | None
    unit: str  # key of the evaluated training run


@dataclass
class Plan:
    spec: ExperimentSpec
    units: dict[str, Unit]  # by key, in the order they must run
    results: list[Result]

    def unit(self, key: str) -> Unit:
        return self.units[key]

    def waves(self) -> list[list[Unit]]:
        """Units grouped so that every unit depends only on earlier groups (one SLURM array each)."""
        level: dict[str, int] = {}
        for unit in self.units.values():
            level[unit.key] = 1 + max((level[d] for d in unit.depends), default=-1)
        groups: list[list[Unit]] = [[] for _ in range(1 + max(level.values(), default=-1))]
        for unit in self.units.values():
            groups[level[unit.key]].append(unit)
        return groups


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ExperimentError(f"recipe '{path}' does not exist (paths are relative to the working directory: run "
                              "af-experiment from the repository root)")
    return sha256_file(p)[:16]


def merge_stage(base: StageSpec, arm: StageSpec) -> StageSpec:
    return StageSpec(recipe=arm.recipe or base.recipe, overrides=[*base.overrides, *arm.overrides],
                     frozen_rows=arm.frozen_rows if arm.frozen_rows is not None else base.frozen_rows)


def _weights(run_dir: Path) -> Path:
    return run_dir / "final" / "model.pt"


def _check_recipe(recipe: str, overrides: list[str], where: str) -> Recipe:
    """The run's recipe as af-train will load it: a wrong key or value stops the plan here, and test-split
    selection is refused (each run selects on val and reports test once)."""
    try:
        loaded = Recipe.load(recipe, overrides)
    except RecipeError as exc:
        raise ExperimentError(f"{where}: {exc}") from None
    train = loaded.train
    if train.allow_test_selection or (train.best_metric or "").startswith("test/"):
        raise ExperimentError(f"{where}: the run selects checkpoints on the test split (train.best_metric="
                              f"{train.best_metric!r}, train.allow_test_selection={train.allow_test_selection}); an "
                              "experiment selects on val and reports test once: use a val/ metric")
    return loaded


class _Builder:
    def __init__(self, spec: ExperimentSpec):
        self.spec = spec
        self.units: dict[str, Unit] = {}
        self.runs = spec.runs_dir
        self.recipe_digests: dict[str, str] = {}

    def recipe_digest(self, path: str) -> str:
        if path not in self.recipe_digests:
            self.recipe_digests[path] = _file_digest(path)
        return self.recipe_digests[path]

    def add(self, unit: Unit, arm: str | None) -> Unit:
        existing = self.units.get(unit.key)
        if existing is None:
            self.units[unit.key] = existing = unit
        if arm is not None and arm not in existing.arms:
            existing.arms.append(arm)
        return existing

    # -- data ----------------------------------------------------------------------------------------
    def data_units(self, values: dict[str, Any]) -> list[str]:
        """The data steps for one fold (or the only data), chained in order; returns their keys."""
        keys: list[str] = []
        root = Path(fill(self.spec.data.root, values, "data.root"))
        for step in self.spec.data.steps:
            where = f"data step '{step.name}'"
            texts = [*step.command, *step.outputs]
            per_fold = any(placeholders_in(t) & FOLD_PLACEHOLDERS for t in texts)
            command = [fill(t, values, where) for t in step.command]
            outputs = [Path(fill(t, values, where)) for t in step.outputs]
            label = f"{step.name}-fold{values['fold']}" if per_fold and values.get("fold") is not None else step.name
            key = digest({"kind": "data", "command": command, "outputs": [str(o) for o in outputs], "after": keys})
            self.add(Unit(key, "data", "data", label, command, outputs, root / ".af_experiment" / label,
                          depends=list(keys), fold=values.get("fold") if per_fold else None), None)
            keys.append(key)
        return keys

    # -- training runs --------------------------------------------------------------------------------
    def train_unit(self, stage: str, label: str, recipe: str, overrides: list[str], depends: list[str],
                   arm: str, seed: int | None, fold: int | None, evaluate: bool = False) -> Unit:
        where = f"arm '{arm}', {stage}" + (f", seed {seed}" if seed is not None else "") + (
            f", fold {fold}" if fold is not None else "")
        launch = self.spec.launch
        key = digest({"kind": "train", "stage": stage, "recipe": recipe, "recipe_sha": self.recipe_digest(recipe),
                      "overrides": overrides, "ranks": launch.args(), "after": sorted(depends),
                      "evaluate": evaluate})
        directory = self.runs / stage / f"{label}-{key[:8]}"
        full = [*overrides, f"train.run_dir={directory}"]
        _check_recipe(recipe, full, where)
        command = ["af-train", *launch.args(), "--recipe", recipe, *full]
        outputs = [_weights(directory), directory / "final" / "metrics.json"]
        if evaluate:
            outputs += [directory / "experiment" / "test_scores.npz", directory / "experiment" / "eval_test.json"]
        return self.add(Unit(key, "train", stage, label, command, outputs, directory, depends=sorted(depends),
                             evaluate=evaluate, seed=seed, fold=fold), arm)

    def seed_overrides(self, seed: int) -> list[str]:
        return [fill(text, {"seed": seed}, "seed_overrides") for text in self.spec.seed_overrides]

    def build(self) -> Plan:
        spec = self.spec
        results: list[Result] = []
        folds = list(zip(spec.folds.test, spec.folds.val)) if spec.folds else [(None, None)]
        for fold, val_fold in folds:
            values = {"fold": fold, "val_fold": val_fold}
            values["data"] = fill(spec.data.root, values, "data.root")
            data_keys = self.data_units(values)
            splits = {s: fill(getattr(spec.data, s), values, f"data.{s}") for s in ("train", "val", "test")}
            for split in ("train", "val"):
                given = getattr(spec.data, f"pretrain_{split}")
                splits[f"pretrain_{split}"] = fill(given, values, f"data.pretrain_{split}") if given else splits[split]
            for arm in spec.arms:
                for seed in spec.seeds:
                    key = self.arm_runs(arm.name, seed, fold, values, splits, data_keys)
                    results.append(Result(arm.name, seed, fold, key))
        return Plan(spec, self.units, results)

    def arm_runs(self, arm_name: str, seed: int, fold: int | None, values: dict[str, Any],
                 splits: dict[str, str], data_keys: list[str]) -> str:
        spec, arm = self.spec, self.spec.arm(arm_name)
        suffix = f"-fold{fold}" if fold is not None else ""
        seeded = self.seed_overrides(seed)
        values = {**values, "seed": seed}

        def resolved(stage: StageSpec, name: str) -> StageSpec:
            where = f"arm '{arm_name}', {name}.overrides"
            return StageSpec(stage.recipe, [fill(o, values, where) for o in stage.overrides], stage.frozen_rows)

        finetune = resolved(merge_stage(spec.finetune, arm.finetune), "finetune")
        stage2 = resolved(merge_stage(spec.stage2, arm.stage2), "stage2") if spec.stage2 is not None else None
        frozen = sorted({*(finetune.frozen_rows or []), *((stage2.frozen_rows or []) if stage2 else [])})
        data_all = [f"data.train={splits['train']}", f"data.val={splits['val']}", f"data.test={splits['test']}"]
        # MLM pretraining never reads the test split
        data_pretrain = [f"data.train={splits['pretrain_train']}", f"data.val={splits['pretrain_val']}",
                         "data.test=null"]

        row_weights: dict[int, Path] = {}
        row_keys: dict[int, str] = {}
        if spec.pretrain is not None:
            pretrain = resolved(merge_stage(spec.pretrain, arm.pretrain), "pretrain")
            for row in [TRAINABLE_ROW, *frozen]:
                recipe = fill(pretrain.recipe or "", {"row": row}, f"arm '{arm_name}', pretrain.recipe")
                overrides = [*data_pretrain, *pretrain.overrides, f"data.code_rows=[{row}]"]
                if spec.pretrain_per_seed:
                    overrides += seeded
                label = f"row{row}" + (f"-seed{seed}" if spec.pretrain_per_seed else "") + suffix
                unit = self.train_unit("pretrain", label, recipe, overrides, data_keys, arm_name,
                                       seed if spec.pretrain_per_seed else None, fold)
                row_weights[row], row_keys[row] = _weights(unit.directory), unit.key
        elif frozen:
            raise ExperimentError(f"arm '{arm_name}' has frozen_rows {frozen} but the experiment has no pretrain stage "
                                  "to make their encoders")

        def stage_overrides(stage: StageSpec, init: Path | None) -> tuple[list[str], list[str]]:
            overrides = [*data_all, *stage.overrides]
            depends = list(data_keys)
            if init is not None:
                overrides.append(f"objective.init_checkpoint={init}")
            rows = stage.frozen_rows or []
            if rows:
                overrides += [f"data.code_rows=[{','.join(str(r) for r in [TRAINABLE_ROW, *rows])}]",
                              "objective.frozen_row_checkpoints=[" + ",".join(str(row_weights[r]) for r in rows) + "]"]
                depends += [row_keys[r] for r in rows]
            return overrides + seeded, depends

        init = row_weights.get(TRAINABLE_ROW)
        overrides, depends = stage_overrides(finetune, init)
        if init is not None:
            depends.append(row_keys[TRAINABLE_ROW])
        unit = self.train_unit("finetune", f"{arm_name}-seed{seed}{suffix}", finetune.recipe or "", overrides,
                               depends, arm_name, seed, fold, evaluate=stage2 is None)
        if stage2 is not None:
            overrides, depends = stage_overrides(stage2, _weights(unit.directory))
            unit = self.train_unit("stage2", f"{arm_name}-seed{seed}{suffix}", stage2.recipe or "", overrides,
                                   [*depends, unit.key], arm_name, seed, fold, evaluate=True)
        return unit.key


def build_plan(spec: ExperimentSpec) -> Plan:
    """Expand ``spec`` into its units (see the module docstring); errors name the arm, stage and key."""
    return _Builder(spec).build()
