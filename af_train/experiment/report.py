"""The experiment's report: per-clip test scores of every run -> results.json, results.md and plots.

For every metric (``stats.metrics``; mAP by default):

- each run's test metric, on the clips of its fold (``af-evaluate --scores`` of the checkpoint the run
  selected on validation);
- each arm: mean ± std over seeds (of the mean over folds), and a bootstrap interval
  (``af_train.metrics.bootstrap_runs``: seeds and test clips resampled together);
- each arm against the baseline arm: the mean paired difference, per seed and over seeds, with the
  paired bootstrap interval (the same resampled clips and seeds for both arms). "beyond noise" means the
  interval excludes 0; nothing here ranks arms on the test split.

What the intervals rest on is written next to them: the number of test clips per fold, folds and
seeds. Validation numbers are reported too, and the one arm a user may pick from this experiment is
the best by mean validation metric, never by test.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from af_train.experiment.plan import Plan, Unit
from af_train.experiment.runner import format_seconds, read_marker
from af_train.experiment.spec import ExperimentError
from af_train.files import atomic_open, atomic_write, git_commit, sha256_file
from af_train.metrics import bootstrap_runs, chance_metric, percentile_interval, run_metric

RESULTS_JSON, RESULTS_MD, SCORES_NPZ = "results.json", "results.md", "scores.npz"


@dataclass
class RunScores:
    ids: list[str]
    scores: np.ndarray  # [N, C] logits
    targets: np.ndarray  # [N, C] bool
    classes: list[str]
    final: dict[str, Any]  # the run's final/metrics.json
    evaluation: dict[str, Any]  # af-evaluate's JSON of the same checkpoint
    selection: dict[str, Any] | None  # the validation metric at the selected checkpoint (selection_of)


def _multi_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return labels.astype(bool)
    out = np.zeros((labels.size, classes), dtype=bool)
    out[np.arange(labels.size), labels.astype(np.int64)] = True
    return out


def load_run(unit: Unit) -> RunScores:
    path = unit.directory / "experiment" / "test_scores.npz"
    if not path.is_file():
        raise ExperimentError(f"{unit.name}: no per-clip test scores ({path}); run the experiment (not --report) "
                              "to finish it")
    with np.load(path) as data:
        scores = np.asarray(data["scores"], dtype=np.float64)
        ids = [str(i) for i in data["ids"].tolist()]
        targets = _multi_hot(data["labels"], scores.shape[1])
        classes = [str(c) for c in data["classes"].tolist()]
    final = json.loads((unit.directory / "final" / "metrics.json").read_text(encoding="utf-8"))
    evaluation = json.loads((unit.directory / "experiment" / "eval_test.json").read_text(encoding="utf-8"))
    return RunScores(ids, scores, targets, classes, final, evaluation, selection_of(unit.directory, final))


def selection_of(run_dir: Path, final: dict[str, Any]) -> dict[str, Any] | None:
    """{metric, value, step} of the validation metric that selected the tested checkpoint, read from the run's
    own log (metrics.jsonl at the step of ``test_checkpoint``; the metric is the run's ``train.best_metric``).
    None when the run selected nothing (no best_metric: its last checkpoint is tested)."""
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) if (
        run_dir / "config.yaml").is_file() else {}
    metric = ((config or {}).get("train") or {}).get("best_metric")
    tag = final.get("test_checkpoint") or ""
    if not metric or not tag.startswith("step_"):
        return None
    step = int(tag.split("_", 1)[1])
    value = None
    log = run_dir / "metrics.jsonl"
    for line in log.read_text(encoding="utf-8").splitlines() if log.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if record.get("step") == step and metric in record:
            value = record[metric]
    return {"metric": metric, "value": value, "step": step}


def _nan_none(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else float(value)


def collect(plan: Plan) -> dict[str, Any]:
    """Every arm's runs as arrays: scores_by_fold[f] [A, S, N_f, C], targets_by_fold[f] [N_f, C], ...

    Refuses runs of one fold scored on different clips (they could not be paired)."""
    spec = plan.spec
    arms, seeds = [a.name for a in spec.arms], list(spec.seeds)
    folds = list(spec.folds.test) if spec.folds else [None]
    loaded: dict[str, RunScores] = {}
    missing = []
    for result in plan.results:
        unit = plan.units[result.unit]
        if result.unit not in loaded:
            try:
                loaded[result.unit] = load_run(unit)
            except (ExperimentError, OSError) as exc:
                missing.append(str(exc))
    if missing:
        raise ExperimentError(f"{len(missing)} run(s) are not finished:\n  " + "\n  ".join(missing[:10]))
    scores_by_fold, targets_by_fold, ids_by_fold = [], [], []
    for fold in folds:
        runs = {(r.arm, r.seed): loaded[r.unit] for r in plan.results if r.fold == fold}
        first = runs[(arms[0], seeds[0])]
        for (arm, seed), run in runs.items():
            if run.ids != first.ids or not np.array_equal(run.targets, first.targets):
                raise ExperimentError(f"arm '{arm}' seed {seed}{'' if fold is None else f' fold {fold}'} was scored on "
                                      f"other test clips than arm '{arms[0]}' seed {seeds[0]}: the runs cannot be "
                                      "paired (did data.test change between runs?)")
        scores_by_fold.append(np.stack([np.stack([runs[(a, s)].scores for s in seeds]) for a in arms]))
        targets_by_fold.append(first.targets)
        ids_by_fold.append(first.ids)
    return {"arms": arms, "seeds": seeds, "folds": folds, "scores_by_fold": scores_by_fold,
            "targets_by_fold": targets_by_fold, "ids_by_fold": ids_by_fold, "runs": loaded,
            "classes": next(iter(loaded.values())).classes}


def summarize(plan: Plan, data: dict[str, Any]) -> dict[str, Any]:
    """Per-run metrics, per-arm summaries and paired differences for every metric (see the module docstring)."""
    spec, stats = plan.spec, plan.spec.stats
    arms, seeds, folds = data["arms"], data["seeds"], data["folds"]
    base = arms.index(spec.baseline)
    single_label = all(np.all(t.sum(1) == 1) for t in data["targets_by_fold"])
    metrics = [m for m in stats.metrics if m != "accuracy" or single_label]
    if not metrics:
        raise ExperimentError(f"stats.metrics {stats.metrics}: accuracy needs single-label test clips; add mAP")
    by_run: dict[str, dict[str, Any]] = {}
    for result in plan.results:
        run = data["runs"][result.unit]
        row = by_run.setdefault(f"{result.arm}/{result.seed}/{result.fold}", {
            "arm": result.arm, "seed": result.seed, "fold": result.fold, "run": str(plan.units[result.unit].directory),
            "test_checkpoint": run.final.get("test_checkpoint"), "val": run.selection,
            "test": {}})
        for metric in metrics:
            row["test"][metric] = run_metric(metric, run.scores, run.targets)
    summary: dict[str, Any] = {"metrics": metrics, "arms": [], "differences": []}
    for metric in metrics:
        point, replicates = bootstrap_runs(data["scores_by_fold"], data["targets_by_fold"], metric, stats.rounds,
                                           stats.seed, stats.resample_seeds)
        per_seed = np.array([[np.mean([by_run[f"{a}/{s}/{f}"]["test"][metric] for f in folds]) for s in seeds]
                             for a in arms])  # [A, S]
        for index, arm in enumerate(arms):
            low, high = percentile_interval(replicates[:, index], stats.confidence)
            entry = _arm_entry(summary, arm, spec)
            entry[metric] = {"mean": float(point[index]), "std": _std(per_seed[index]),
                             "per_seed": [float(v) for v in per_seed[index]], "low": low, "high": high}
            if index == base:
                continue
            diff = replicates[:, index] - replicates[:, base]
            d_low, d_high = percentile_interval(diff, stats.confidence)
            mean = float(point[index] - point[base])
            summary["differences"].append({
                "arm": arm, "baseline": spec.baseline, "metric": metric, "mean": mean, "low": d_low, "high": d_high,
                "per_seed": [float(v) for v in per_seed[index] - per_seed[base]],
                "verdict": verdict(d_low, d_high),
                "shares_runs_with_baseline": _same_runs(plan, arm, spec.baseline)})
    for entry in summary["arms"]:
        values = [by_run[f"{entry['name']}/{s}/{f}"]["val"] for s in seeds for f in folds]
        numbers = [v["value"] for v in values if v and v.get("value") is not None]
        entry["val"] = {"metric": (values[0] or {}).get("metric") if values else None,
                        "mean": float(np.mean(numbers)) if len(numbers) == len(values) and numbers else None}
    scored = [e for e in summary["arms"] if e["val"]["mean"] is not None]
    metric_names = {e["val"]["metric"] for e in scored}
    if scored and len(scored) == len(summary["arms"]) and len(metric_names) == 1:
        (name,) = metric_names
        pick = (min if name and name.endswith("loss") else max)(scored, key=lambda e: e["val"]["mean"])
        summary["selected_on_val"] = {"arm": pick["name"], "by": f"mean {name} over seeds and folds",
                                      "test": {m: pick[m]["mean"] for m in metrics}}
    summary["runs"] = list(by_run.values())
    summary["single_label"] = single_label
    return summary


def _arm_entry(summary: dict[str, Any], arm: str, spec: Any) -> dict[str, Any]:
    for entry in summary["arms"]:
        if entry["name"] == arm:
            return entry
    entry = {"name": arm, "about": spec.arm(arm).about, "baseline": arm == spec.baseline}
    summary["arms"].append(entry)
    return entry


def _std(values: np.ndarray) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _same_runs(plan: Plan, arm: str, other: str) -> bool:
    """True when two arms resolved to the very same runs (identical configurations)."""
    mine = sorted((r.seed, r.fold or 0, r.unit) for r in plan.results if r.arm == arm)
    theirs = sorted((r.seed, r.fold or 0, r.unit) for r in plan.results if r.arm == other)
    return [u for *_, u in mine] == [u for *_, u in theirs]


def verdict(low: float, high: float) -> str:
    if low > 0:
        return "better beyond noise"
    if high < 0:
        return "worse beyond noise"
    return "no difference beyond noise"


def timings(plan: Plan) -> dict[str, Any]:
    """Wall and CPU time of every unit (all attempts), by stage and in total, from the markers."""
    units, by_stage = [], {}
    for unit in plan.units.values():
        marker = read_marker(unit) or {}
        row = {"unit": unit.name, "seconds": marker.get("seconds_total"),
               "cpu_seconds": marker.get("cpu_seconds_total"), "attempts": marker.get("attempts"),
               "commit": marker.get("commit"), "dirty": marker.get("dirty")}
        units.append(row)
        stage = "data" if unit.kind == "data" else unit.stage
        total = by_stage.setdefault(stage, {"units": 0, "seconds": 0.0, "cpu_seconds": 0.0})
        total["units"] += 1
        total["seconds"] += row["seconds"] or 0.0
        total["cpu_seconds"] += row["cpu_seconds"] or 0.0
    return {"units": units, "by_stage": by_stage, "seconds": sum(s["seconds"] for s in by_stage.values()),
            "cpu_seconds": sum(s["cpu_seconds"] for s in by_stage.values())}


def check_results_dir(out: Path, name: str) -> None:
    """The results folder holds this experiment's results or nothing of ours: never write over another's."""
    existing = out / RESULTS_JSON
    if existing.is_file():
        try:
            other = json.loads(existing.read_text(encoding="utf-8")).get("experiment")
        except (OSError, json.JSONDecodeError):
            other = None
        if other != name:
            raise ExperimentError(f"{existing} holds the results of experiment {other!r}, not {name!r}; give this "
                                  "experiment its own results folder (key: results)")


def write_report(plan: Plan, experiment_file: str, wall_seconds: float | None = None,
                 invocation: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Collect, summarise and write results.json, results.md, scores.npz and plots/ into the results folder.
    ``invocation``: the units' rows of this invocation (``run_plan``): what ran now and what was reused."""
    spec = plan.spec
    check_results_dir(spec.results_dir, spec.name)
    data = collect(plan)
    summary = summarize(plan, data)
    times = timings(plan)
    if invocation is not None:
        ran = [row for row in invocation if row["state"] != "reused"]
        times["this_invocation"] = {"ran": len(ran), "reused": len(invocation) - len(ran),
                                    "wall_seconds": wall_seconds}
    commits = sorted({(u["commit"], u["dirty"]) for u in times["units"] if u["commit"]}, key=str)
    clips = {("test" if f is None else str(f)): int(t.shape[0]) for f, t in zip(data["folds"], data["targets_by_fold"])}
    payload = {
        "experiment": spec.name, "question": spec.question, "protocol": spec.protocol,
        "file": experiment_file, "file_sha256": sha256_file(experiment_file),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "report_commit": git_commit(),
        "run_commits": [{"commit": c, "dirty": d} for c, d in commits],
        "seeds": data["seeds"], "folds": data["folds"] if spec.folds else None, "test_clips": clips,
        "classes": data["classes"], "single_label": summary["single_label"], "baseline": spec.baseline,
        "bootstrap": {"rounds": spec.stats.rounds, "seed": spec.stats.seed, "confidence": spec.stats.confidence,
                      "resamples": "seeds and test clips" if spec.stats.resample_seeds else "test clips",
                      "method": "percentile"},
        "metrics": summary["metrics"], "arms": summary["arms"], "differences": summary["differences"],
        # what random scores reach on the same test clips (mean over folds): the floor every arm is read against
        "chance": {m: float(np.mean([chance_metric(m, t) for t in data["targets_by_fold"]]))
                   for m in summary["metrics"]},
        "selected_on_val": summary.get("selected_on_val"), "runs": summary["runs"], "timings": times,
        "wall_seconds_this_invocation": wall_seconds, "notes": spec.notes,
    }
    out = spec.results_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / RESULTS_JSON, json.dumps(payload, indent=2, default=_nan_none) + "\n")
    atomic_write(out / RESULTS_MD, render_markdown(payload))
    with atomic_open(out / SCORES_NPZ, "wb") as handle:
        arrays = {f"fold{f}_scores" if f is not None else "scores": s.astype(np.float32)
                  for f, s in zip(data["folds"], data["scores_by_fold"])}
        arrays.update({f"fold{f}_targets" if f is not None else "targets": t
                       for f, t in zip(data["folds"], data["targets_by_fold"])})
        np.savez_compressed(handle, arms=np.asarray(data["arms"]), seeds=np.asarray(data["seeds"]), **arrays)
    plot(payload, out / "plots")
    return payload


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(lines + ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows])


def render_markdown(payload: dict[str, Any]) -> str:
    seeds, folds, clips = payload["seeds"], payload["folds"], payload["test_clips"]
    boot = payload["bootstrap"]
    level = f"{round(100 * boot['confidence'])} %"
    if folds:
        on = (f"{len(folds)} folds ({', '.join(f'{c} test clips in fold {f}' for f, c in clips.items())}), "
              f"{len(seeds)} seeds")
    else:
        on = f"{next(iter(clips.values()))} test clips, {len(seeds)} seeds"
    commit = payload["report_commit"]
    lines = [f"# {payload['experiment']}: {payload['question']}", "",
             f"Protocol: {payload['protocol']}.", "",
             f"Each run selects its checkpoint on validation and is scored once on the test split. Arms: mean ± std "
             f"over seeds {seeds}" + (" of the mean over folds" if folds else "") + f"; intervals: {level} "
             f"percentile bootstrap ({boot['rounds']} rounds) resampling {boot['resamples']}; they rest on {on}. "
             f"Differences are paired (same test clips, same seeds) against the baseline arm "
             f"'{payload['baseline']}'.", ""]
    for metric in payload["metrics"]:
        rows = []
        diffs = {d["arm"]: d for d in payload["differences"] if d["metric"] == metric}
        for arm in payload["arms"]:
            m = arm[metric]
            d = diffs.get(arm["name"])
            rows.append([arm["name"] + (" (baseline)" if arm["baseline"] else ""),
                         f"{_f(m['mean'])} ± {_f(m['std'])}", f"[{_f(m['low'])}, {_f(m['high'])}]",
                         "" if d is None else f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]",
                         "" if d is None else d["verdict"] + (" (same runs)" if d["shares_runs_with_baseline"] else ""),
                         _f(arm["val"]["mean"])])
        val_name = next((a["val"]["metric"] for a in payload["arms"] if a["val"]["metric"]), "val")
        lines += [f"Test {metric}:", "",
                  _table(["arm", f"test {metric}", f"{level} interval", f"paired difference vs {payload['baseline']}",
                          "verdict", f"{val_name} (selection)"], rows), ""]
        if metric in payload.get("chance", {}):
            lines += [f"Chance {metric} (random scores on the same test clips, mean of 200 draws): "
                      f"{_f(payload['chance'][metric])}.", ""]
    picked = payload.get("selected_on_val")
    if picked:
        lines += [f"Chosen on validation ({picked['by']}): {picked['arm']}; its test "
                  + ", ".join(f"{k} {_f(v)}" for k, v in picked["test"].items()) + ".", ""]
    per_seed = []
    for d in payload["differences"]:
        per_seed.append([d["arm"], d["metric"], ", ".join(f"{v:+.3f}" for v in d["per_seed"])])
    if per_seed:
        lines += ["Paired difference per seed" + (" (mean over folds)" if folds else "") + ":", "",
                  _table(["arm", "metric", "per seed " + str(seeds)], per_seed), ""]
    times = payload["timings"]
    rows = [[stage, str(t["units"]), format_seconds(t["seconds"]), format_seconds(t["cpu_seconds"])]
            for stage, t in times["by_stage"].items()]
    rows.append(["total", str(sum(t["units"] for t in times["by_stage"].values())), format_seconds(times["seconds"]),
                 format_seconds(times["cpu_seconds"])])
    lines += ["Time (every attempt of every unit, summed):", "", _table(["stage", "units", "wall", "CPU"], rows), ""]
    now = times.get("this_invocation")
    if now:
        lines += [f"This invocation ran {now['ran']} unit(s) and reused {now['reused']} finished earlier "
                  f"(wall {format_seconds(now['wall_seconds'])}).", ""]
    runs = ", ".join(f"{c['commit'][:12]}{' (dirty)' if c['dirty'] else ''}" for c in payload["run_commits"])
    lines += [f"Runs made at commit(s): {runs or 'unknown'}; report written at "
              f"{(commit.get('commit') or 'unknown')[:12]}{' (dirty)' if commit.get('dirty') else ''} on "
              f"{payload['created']} from {payload['file']} (sha256 {payload['file_sha256'][:12]})."]
    if payload.get("notes"):
        lines += [""] + [f"- {note}" for note in payload["notes"]]
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], out: Path) -> list[Path]:
    """``arms_<metric>.png`` (every seed's run, the mean and its interval) and ``differences_<metric>.png``
    (paired differences against the baseline with their intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    arms = payload["arms"]
    for metric in payload["metrics"]:
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(arms) + 1.5), 3.6))
        for x, arm in enumerate(arms):
            m = arm[metric]
            ax.scatter([x] * len(m["per_seed"]), m["per_seed"], s=14, color="0.6", zorder=2)
            ax.errorbar([x], [m["mean"]], yerr=[[m["mean"] - m["low"]], [m["high"] - m["mean"]]], fmt="o",
                        color="C3" if arm["baseline"] else "C0", capsize=4, zorder=3)
        ax.set_xticks(range(len(arms)), [a["name"] for a in arms], rotation=30, ha="right")
        ax.set_ylabel(f"test {metric}")
        ax.set_title(f"{payload['experiment']}: test {metric} (seeds grey, mean and interval)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out / f"arms_{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        diffs = [d for d in payload["differences"] if d["metric"] == metric]
        if not diffs:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 0.5 * len(diffs) + 1.4))
        for y, d in enumerate(diffs):
            color = "C2" if d["low"] > 0 else "C3" if d["high"] < 0 else "0.3"
            ax.errorbar([d["mean"]], [y], xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o",
                        color=color, capsize=4)
        ax.axvline(0.0, color="0.5", lw=1, ls="--")
        ax.set_yticks(range(len(diffs)), [d["arm"] for d in diffs])
        ax.set_xlabel(f"test {metric} − {payload['baseline']} (paired)")
        ax.set_title(f"{payload['experiment']}: paired differences", fontsize=9)
        fig.tight_layout()
        path = out / f"differences_{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
