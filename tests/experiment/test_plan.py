"""af-experiment without training: the strict file format, the plan (shared runs, FT2 wiring, folds), the
SLURM scripts, and every shipped experiment file (the AudioSet ones are planned, never run here)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from af_train.experiment import cli
from af_train.experiment.plan import build_plan
from af_train.experiment.runner import RUN, emit_slurm, state_of
from af_train.experiment.spec import ExperimentError, load_experiment

REPO = Path(__file__).resolve().parents[2]
BASE = {
    "name": "ablation",
    "question": "q",
    "protocol": "p",
    "data": {"root": "data/x", "train": "{data}/shards/train", "val": "{data}/shards/val",
             "test": "{data}/shards/test",
             "steps": [{"name": "prepare", "command": ["af-prepare", "--out", "{data}/shards"],
                        "outputs": ["{data}/shards/test/manifest.json"]}]},
    "launch": {"num_cpu_ranks": 2},
    "pretrain": {"recipe": "recipes/tiny_pretrain.yaml", "overrides": ["train.max_steps=7"]},
    "finetune": {"recipe": "recipes/tiny_ft1.yaml", "overrides": ["train.max_steps=9"]},
    "arms": [{"name": "ft1"},
             {"name": "ft2", "finetune": {"recipe": "recipes/tiny_ft2.yaml", "frozen_rows": [1, 3],
                                          "overrides": ["objective.alpha=0.9"]}},
             {"name": "mask", "pretrain": {"overrides": ["data.mask_rate=0.15"]}}],
    "baseline": "ft1",
    "seeds": [0, 1],
}


def write(tmp_path: Path, spec: dict, name: str = "e.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # recipe paths in experiment files are relative to the working directory


def plan_of(tmp_path: Path, spec: dict):
    spec = copy.deepcopy(spec)
    spec.setdefault("runs", str(tmp_path / "runs"))
    spec["data"]["root"] = str(tmp_path / "data")
    return build_plan(load_experiment(write(tmp_path, spec)))


def test_arms_share_identical_runs_and_ft2_gets_its_frozen_rows(tmp_path, in_repo):
    plan = plan_of(tmp_path, BASE)
    units = list(plan.units.values())
    pretrain = [u for u in units if u.stage == "pretrain"]
    # per seed: row 0 for ft1 and ft2 (shared), rows 1 and 3 for ft2, row 0 again with the other mask rate
    assert sorted(u.label for u in pretrain) == sorted(f"row{r}-seed{s}" for s in (0, 1) for r in (0, 0, 1, 3))
    shared = [u for u in pretrain if u.label == "row0-seed0" and "ft1" in u.arms]
    assert len(shared) == 1 and shared[0].arms == ["ft1", "ft2"]
    ft2 = next(u for u in units if u.name.startswith("finetune/ft2-seed1"))
    row1 = next(u for u in pretrain if u.label == "row1-seed1")
    row3 = next(u for u in pretrain if u.label == "row3-seed1")
    assert "data.code_rows=[0,1,3]" in ft2.command
    assert (f"objective.frozen_row_checkpoints=[{row1.directory}/final/model.pt,{row3.directory}/final/model.pt]"
            in ft2.command)
    assert {row1.key, row3.key} <= set(ft2.depends)
    assert "objective.alpha=0.9" in ft2.command and "train.seed=1" in ft2.command
    assert f"data.test={tmp_path}/data/shards/test" in ft2.command
    assert all("data.test=null" in u.command for u in pretrain)  # pretraining never reads the test split
    assert len(plan.results) == 3 * 2 and all(plan.units[r.unit].evaluate for r in plan.results)
    # every unit comes after what it reads from
    order = list(plan.units)
    assert all(order.index(d) < order.index(u.key) for u in units for d in u.depends)
    # keys are content addresses: the same file plans the same directories; a change moves only what it touches
    again = plan_of(tmp_path, BASE)
    assert [u.directory for u in again.units.values()] == [u.directory for u in units]
    changed = copy.deepcopy(BASE)
    changed["arms"][1]["finetune"]["overrides"] = ["objective.alpha=0.8"]
    moved = {u.directory.name for u in plan_of(tmp_path, changed).units.values()} ^ {u.directory.name for u in units}
    assert len(moved) == 2 * 2 and all(name.startswith("ft2-seed") for name in moved)  # old and new, per seed


def test_folds_make_per_fold_data_and_runs(tmp_path, in_repo):
    spec = copy.deepcopy(BASE)
    spec["folds"] = {"test": [1, 2, 3], "val": [2, 3, 1]}
    spec["data"]["steps"] = [
        {"name": "synth", "command": ["make-audio", "{data}/audio"], "outputs": ["{data}/audio/meta.csv"]},
        {"name": "prepare", "command": ["af-prepare", "--val-fold", "{val_fold}", "--test-fold", "{fold}", "--out",
                                        "{data}/fold{fold}"], "outputs": ["{data}/fold{fold}/test/manifest.json"]}]
    spec["data"].update(train="{data}/fold{fold}/train", val="{data}/fold{fold}/val", test="{data}/fold{fold}/test")
    spec["arms"] = spec["arms"][:1]
    plan = plan_of(tmp_path, spec)
    data = [u for u in plan.units.values() if u.kind == "data"]
    assert [u.label for u in data] == ["synth", "prepare-fold1", "prepare-fold2", "prepare-fold3"]
    assert "--val-fold 3 --test-fold 2" in data[2].shell()
    assert len(plan.results) == 3 * 2 and {r.fold for r in plan.results} == {1, 2, 3}
    fold2 = next(u for u in plan.units.values() if u.name.startswith("finetune/ft1-seed0-fold2"))
    assert f"data.test={tmp_path}/data/fold2/test" in fold2.command and data[2].key in fold2.depends


@pytest.mark.parametrize("change,message", [
    (lambda s: s["arms"][0].update(finetune={"overides": []}), "unknown key 'arms[0].finetune.overides'"),
    (lambda s: s.update(baseline="ft3"), "baseline 'ft3' is not an arm"),
    (lambda s: s["finetune"]["overrides"].append("train.max_stepz=3"), "unknown key 'train.max_stepz'"),
    (lambda s: s["finetune"]["overrides"].append("train.best_metric=test/mAP"), "test split"),
    (lambda s: s["finetune"]["overrides"].append("data.test=other"), "paired"),
    (lambda s: s["arms"][0].update(finetune={"overrides": ["train.run_dir=x"]}), "sets train.run_dir itself"),
    (lambda s: s["data"]["steps"][0]["command"].append("{fold}"), "placeholder {fold}"),
    (lambda s: s["finetune"].update(recipe="recipes/none.yaml"), "recipes/none.yaml' does not exist"),
    (lambda s: s.pop("pretrain"), "no pretrain stage"),
    (lambda s: s.update(stats={"metrics": ["f1"]}), "'f1' is not one of"),
])
def test_mistakes_stop_before_any_run_and_name_the_key(tmp_path, in_repo, change, message):
    spec = copy.deepcopy(BASE)
    change(spec)
    with pytest.raises(ExperimentError, match=message.replace("[", r"\[").replace("(", r"\(")):
        plan_of(tmp_path, spec)


def test_data_this_experiment_did_not_make_is_never_overwritten(tmp_path, in_repo):
    plan = plan_of(tmp_path, BASE)
    step = next(u for u in plan.units.values() if u.kind == "data")
    assert state_of(step)[0] == RUN
    step.outputs[0].parent.mkdir(parents=True)
    step.outputs[0].write_text("{}")
    with pytest.raises(ExperimentError, match="was not made by af-experiment"):
        state_of(step)


def test_slurm_arrays_chain_the_waves_and_run_one_unit_per_task(tmp_path, in_repo):
    plan = plan_of(tmp_path, BASE)
    files = emit_slurm(plan, "experiments/x.yaml", tmp_path / "slurm")
    names = [p.name for p in files]
    assert names == ["wave0.sbatch", "wave1.sbatch", "wave2.sbatch", "report.sbatch", "submit.sh"]
    pretrain = (tmp_path / "slurm" / "wave1.sbatch").read_text()
    keys = [u.key for u in plan.units.values() if u.stage == "pretrain"]
    assert f"#SBATCH --array=0-{len(keys) - 1}" in pretrain and " ".join(keys) in pretrain
    assert 'af-experiment experiments/x.yaml --unit "${KEYS[$SLURM_ARRAY_TASK_ID]}"' in pretrain
    submit = (tmp_path / "slurm" / "submit.sh").read_text()
    assert submit.index("wave0.sbatch") < submit.index("wave1.sbatch") < submit.index("report.sbatch")
    assert "--dependency=afterok:$job" in submit


def test_cli_plan_prints_every_unit(tmp_path, in_repo, capsys):
    spec = copy.deepcopy(BASE)
    spec["data"]["root"], spec["runs"] = str(tmp_path / "data"), str(tmp_path / "runs")
    assert cli.main([str(write(tmp_path, spec)), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "3 arms x 2 seeds" in out and out.count("\naf-train --num_cpu_ranks 2") == len(build_plan(
        load_experiment(tmp_path / "e.yaml")).units) - 1
    assert cli.main([str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


SHIPPED = sorted((REPO / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_experiment_files_load_and_plan(path, in_repo):
    spec = load_experiment(path)
    plan = build_plan(spec)
    assert plan.results and spec.baseline in {a.name for a in spec.arms}
    if "audioset" in path.stem or "esc50" in path.stem:
        assert "peers' protocol" in spec.protocol and "not run here" in spec.protocol
    else:  # the small ones are run, and their results are committed beside the file
        results = REPO / spec.results_dir / "results.json"
        if results.is_file():
            payload = json.loads(results.read_text())
            assert payload["experiment"] == spec.name and payload["file"] == str(path.relative_to(REPO))


def fake_finished_runs(plan, rng, quality: dict[str, float], sizes: dict) -> None:
    """Write what a finished evaluated run leaves (scores, final metrics, af-evaluate's JSON, a done marker)."""
    import numpy as np

    from af_train.experiment.runner import write_marker

    targets = {fold: rng.integers(0, 3, n) for fold, n in sizes.items()}
    for result in plan.results:
        unit = plan.units[result.unit]
        labels = targets[result.fold]
        scores = rng.normal(size=(labels.size, 3)) + quality[result.arm] * np.eye(3)[labels]
        (unit.directory / "experiment").mkdir(parents=True, exist_ok=True)
        (unit.directory / "final").mkdir(parents=True, exist_ok=True)
        np.savez(unit.directory / "experiment" / "test_scores.npz", ids=np.array([f"c{i}" for i in range(labels.size)]),
                 scores=scores, labels=labels, classes=np.array(["a", "b", "c"]))
        (unit.directory / "config.yaml").write_text("train:\n  best_metric: val/mAP\n")
        val = quality[result.arm] + result.seed * 0.01
        (unit.directory / "metrics.jsonl").write_text(json.dumps({"step": 10, "val/mAP": val}) + "\n"
                                                      + json.dumps({"step": 20, "val/mAP": val - 1}) + "\n")
        (unit.directory / "final" / "metrics.json").write_text(json.dumps({"test_checkpoint": "step_00000010"}))
        (unit.directory / "experiment" / "eval_test.json").write_text("{}")
        write_marker(unit, {"status": "done", "seconds_total": 2.0, "cpu_seconds_total": 3.0, "commit": "abc",
                            "dirty": False})


def test_report_of_folds_averages_each_seed_over_folds_and_pairs_the_arms(tmp_path, in_repo):
    import numpy as np

    from af_train.experiment.report import write_report
    from af_train.metrics import run_metric

    spec = copy.deepcopy(BASE)
    spec["folds"] = {"test": [1, 2], "val": [2, 1]}
    spec["data"].update(train="{data}/f{fold}/train", val="{data}/f{fold}/val", test="{data}/f{fold}/test")
    spec.pop("pretrain")
    spec["arms"] = [{"name": "ft1"}, {"name": "weak", "finetune": {"overrides": ["optim.lr=1e-5"]}}]
    spec["results"] = str(tmp_path / "results")
    plan = plan_of(tmp_path, spec)
    fake_finished_runs(plan, np.random.default_rng(0), {"ft1": 3.0, "weak": 0.0}, {1: 40, 2: 30})
    payload = write_report(plan, str(tmp_path / "e.yaml"))
    assert payload["test_clips"] == {"1": 40, "2": 30} and payload["folds"] == [1, 2]
    assert payload["single_label"] and payload["metrics"] == ["mAP"]
    ft1 = next(a for a in payload["arms"] if a["name"] == "ft1")
    expected = []
    for seed in (0, 1):
        per_fold = []
        for fold in (1, 2):
            unit = next(plan.units[r.unit] for r in plan.results if (r.arm, r.seed, r.fold) == ("ft1", seed, fold))
            with np.load(unit.directory / "experiment" / "test_scores.npz") as data:
                per_fold.append(run_metric("mAP", data["scores"], np.eye(3, dtype=bool)[data["labels"]]))
        expected.append(np.mean(per_fold))
    assert ft1["mAP"]["per_seed"] == pytest.approx(expected) and ft1["mAP"]["mean"] == pytest.approx(np.mean(expected))
    (weak,) = payload["differences"]
    assert weak["verdict"] == "worse beyond noise" and weak["high"] < 0
    assert payload["selected_on_val"]["arm"] == "ft1"  # the validation score of the tested checkpoint (step 10)
    assert ft1["val"] == {"metric": "val/mAP", "mean": pytest.approx(3.005)}
    assert payload["timings"]["by_stage"]["finetune"] == {"units": 8, "seconds": 16.0, "cpu_seconds": 24.0}
    md = (tmp_path / "results" / "results.md").read_text()
    assert "2 folds (40 test clips in fold 1, 30 test clips in fold 2), 2 seeds" in md
    # runs of one fold scored on other clips cannot be paired: refused
    unit = plan.units[plan.results[-1].unit]
    path = unit.directory / "experiment" / "test_scores.npz"
    with np.load(path) as data:
        arrays = dict(data)
    arrays["ids"] = arrays["ids"][::-1]
    np.savez(path, **arrays)
    with pytest.raises(ExperimentError, match="cannot be paired"):
        write_report(plan, str(tmp_path / "e.yaml"))
    # a results folder of another experiment is never written over
    other = copy.deepcopy(spec)
    other["name"] = "another"
    with pytest.raises(ExperimentError, match="holds the results of experiment 'ablation'"):
        write_report(plan_of(tmp_path, other), str(tmp_path / "e.yaml"))
