#!/usr/bin/env python3
"""Render a run's ``metrics.jsonl`` (and the demo's ``per_class_ap.json``) to PNG plots.

    python3 tools/plot_run.py RUN_DIR [RUN_DIR ...] [--compare OUT_DIR]

For every RUN_DIR, PNGs go to ``RUN_DIR/plots/``:

- ``loss.png``: training loss and its terms (mlm_loss, cls_loss, mpc_loss, ...) per logged step,
  validation loss as markers, and on a second axis the frozen-embedding probe's accuracy (mAP for
  multi-label data) when the run has ``train.probe`` (``probe/accuracy`` in metrics.jsonl);
- ``val_metrics.png``: validation metrics over steps (mAP/AUC for fine-tuning, MLM accuracy for
  pretraining), test metrics of the run's end as stars;
- ``training.png``: learning rate, gradient norm and throughput;
- ``per_class_ap.png``: average precision per class next to the label-prior baseline, when the
  run has a ``per_class_ap.json`` (written by ``tools/demo.py``).

With ``--compare OUT_DIR`` and several runs, ``OUT_DIR/compare_val.png`` overlays their validation
curves (e.g. FT1 against FT2), ``OUT_DIR/compare_loss.png`` their training losses and
``OUT_DIR/compare_probe.png`` their probe curves.
Lines of ``metrics.jsonl`` that are not valid JSON (a run killed mid-write) are skipped and counted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PER_CLASS_FILE = "per_class_ap.json"
# Metrics that are bookkeeping, not something to look at over time.
_NOT_PLOTTED = {"step", "samples", "tokens", "epoch", "skipped_steps", "nonfinite_steps", "memory_gb",
                "classes_with_positives", "classes_in_auc", "num_samples", "eval_seconds", "masked_tokens",
                "seconds"}
_VAL_PREFERRED = ("mAP", "auc", "accuracy", "mlm_accuracy")


@dataclass
class RunMetrics:
    """Series of one run: ``train[name]`` / ``evals[split][name]`` -> (steps, values), sorted by step."""

    name: str
    train: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    evals: dict[str, dict[str, tuple[list[int], list[float]]]] = field(default_factory=dict)
    skipped_lines: int = 0


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def collect_series(records: list[dict[str, Any]], name: str = "run") -> RunMetrics:
    """Group records into per-metric series; a later record for the same step replaces an earlier one."""
    train: dict[str, dict[int, float]] = {}
    evals: dict[str, dict[str, dict[int, float]]] = {}
    for record in records:
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            continue
        for key, raw in record.items():
            value = _number(raw)
            if value is None or key in _NOT_PLOTTED:
                continue
            if "/" in key:
                split, metric = key.split("/", 1)
                if metric in _NOT_PLOTTED:
                    continue
                evals.setdefault(split, {}).setdefault(metric, {})[step] = value
            else:
                train.setdefault(key, {})[step] = value

    def as_series(points: dict[int, float]) -> tuple[list[int], list[float]]:
        steps = sorted(points)
        return steps, [points[s] for s in steps]

    return RunMetrics(
        name=name,
        train={k: as_series(v) for k, v in train.items()},
        evals={split: {k: as_series(v) for k, v in metrics.items()} for split, metrics in evals.items()},
    )


def load_run(run_dir: str | Path) -> RunMetrics:
    """Read ``RUN_DIR/metrics.jsonl``; raises FileNotFoundError with a hint when it is missing."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        hint = "not a directory" if not run_dir.is_dir() else "no metrics.jsonl in it (has the run logged a step?)"
        raise FileNotFoundError(f"{run_dir}: {hint}; give the run directory of af-train (train.run_dir)")
    records, skipped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1
    metrics = collect_series(records, name=run_dir.name)
    metrics.skipped_lines = skipped
    return metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _loss_terms(metrics: RunMetrics) -> list[str]:
    terms = [k for k in metrics.train if k == "loss" or k.endswith("_loss")]
    return sorted(terms, key=lambda k: (k != "loss", k))


def plot_loss(metrics: RunMetrics, path: Path) -> Path | None:
    terms = _loss_terms(metrics)
    if not terms:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    total = metrics.train.get("loss", ([], []))[1]
    for key in terms:
        steps, values = metrics.train[key]
        if key != "loss" and values == total:
            continue  # a single-term objective logs the same numbers twice
        ax.plot(steps, values, label=f"train {key}", lw=1.6 if key == "loss" else 1.0)
    for split, marker in (("val", "o"), ("test", "*")):
        if "loss" in metrics.evals.get(split, {}):
            steps, values = metrics.evals[split]["loss"]
            ax.plot(steps, values, marker=marker, ls="--" if split == "val" else "", label=f"{split} loss", ms=7)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"{metrics.name}: loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    probe = probe_series(metrics)
    if probe is not None:
        name, (steps, values) = probe
        right = ax.twinx()
        line, = right.plot(steps, values, marker="s", color="tab:green", lw=1.4, ms=4,
                           label=f"probe {name} (val clips of train.probe.dataset)")
        right.set_ylabel(f"probe {name}")
        handles, labels = handles + [line], labels + [line.get_label()]
    ax.legend(handles, labels, fontsize=8)
    return _save(fig, path)


def probe_series(metrics: RunMetrics) -> tuple[str, tuple[list[int], list[float]]] | None:
    """(name, series) of the run's probe: accuracy, else mAP (multi-label data); None without a probe."""
    probe = metrics.evals.get("probe", {})
    name = next((n for n in ("accuracy", "mAP") if n in probe), None)
    return None if name is None else (name, probe[name])


def _eval_metric_names(metrics: RunMetrics) -> list[str]:
    names = set(metrics.evals.get("val", {})) | set(metrics.evals.get("test", {}))
    return [n for n in _VAL_PREFERRED if n in names]


def plot_val_metrics(metrics: RunMetrics, path: Path) -> Path | None:
    names = _eval_metric_names(metrics)
    if not names:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        if name in metrics.evals.get("val", {}):
            steps, values = metrics.evals["val"][name]
            ax.plot(steps, values, marker="o", label=f"val {name}")
            best = max(values) if name != "loss" else min(values)
            ax.axhline(best, color="gray", lw=0.8, ls=":", label=f"best val {best:.3f}")
        if name in metrics.evals.get("test", {}):
            steps, values = metrics.evals["test"][name]
            ax.plot(steps, values, marker="*", ls="", ms=12, label=f"test {name} {values[-1]:.3f}")
        ax.set_xlabel("optimizer step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{metrics.name}: evaluation")
    return _save(fig, path)


def plot_training(metrics: RunMetrics, path: Path) -> Path | None:
    panels = [k for k in ("lr", "grad_norm", "samples_per_s") if k in metrics.train]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    titles = {"lr": "learning rate", "grad_norm": "global gradient norm", "samples_per_s": "samples / s"}
    for ax, key in zip(axes[0], panels):
        steps, values = metrics.train[key]
        ax.plot(steps, values)
        ax.set_title(titles[key])
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metrics.name}: optimisation")
    return _save(fig, path)


def read_per_class(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / PER_CLASS_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    n = len(data["classes"])
    for key in ("ap", "prior_ap"):
        if len(data.get(key, [])) != n:
            raise ValueError(f"{path}: '{key}' has {len(data.get(key, []))} values for {n} classes")
    return data


def plot_per_class(data: dict[str, Any], path: Path, title: str) -> Path:
    plt = _pyplot()
    classes = data["classes"]
    ap = [float("nan") if v is None else v for v in data["ap"]]
    prior = [float("nan") if v is None else v for v in data["prior_ap"]]
    order = sorted(range(len(classes)), key=lambda i: -ap[i] if not math.isnan(ap[i]) else 1.0)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(classes) + 1.6))
    rows = list(range(len(classes)))
    ax.barh(rows, [ap[i] for i in order], color="tab:blue", label=f"AP (mAP {data.get('mAP', float('nan')):.3f})")
    ax.plot([prior[i] for i in order], rows, "|", color="tab:red", ms=14, mew=2,
            label=f"label-prior baseline (mAP {data.get('prior_mAP', float('nan')):.3f})")
    ax.set_yticks(rows)
    ax.set_yticklabels([classes[i] for i in order])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.0)
    ax.set_xlabel(f"average precision on {data.get('split', 'test')} ({data.get('num_clips', '?')} clips)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """All plots of one run; returns the files written."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    metrics = load_run(run_dir)
    written = [
        plot_loss(metrics, out / "loss.png"),
        plot_val_metrics(metrics, out / "val_metrics.png"),
        plot_training(metrics, out / "training.png"),
    ]
    per_class = read_per_class(run_dir)
    if per_class is not None:
        title = f"{run_dir.name}: per-class AP ({per_class.get('weights_label', 'model')})"
        written.append(plot_per_class(per_class, out / "per_class_ap.png", title))
    return [p for p in written if p is not None]


def plot_comparison(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Overlay the validation curves and training losses of several runs."""
    runs = [load_run(d) for d in run_dirs]
    plt = _pyplot()
    out = Path(out_dir)
    written = []
    names = [n for n in _VAL_PREFERRED if any(n in r.evals.get("val", {}) for r in runs)][:2]
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8), squeeze=False)
        for ax, name in zip(axes[0], names):
            for run in runs:
                if name in run.evals.get("val", {}):
                    ax.plot(*run.evals["val"][name], marker="o", label=run.name)
            ax.set_title(f"val {name}")
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        written.append(_save(fig, out / "compare_val.png"))
    probes = [(run, probe_series(run)) for run in runs]
    if any(series is not None for _, series in probes):
        fig, ax = plt.subplots(figsize=(7, 4))
        for run, series in probes:
            if series is not None:
                ax.plot(*series[1], marker="s", ms=4, label=f"{run.name} ({series[0]})")
        ax.set_xlabel("optimizer step")
        ax.set_title("frozen-embedding probe on the probe set's val clips")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out / "compare_probe.png"))
    if any("loss" in r.train for r in runs):
        fig, ax = plt.subplots(figsize=(7, 4))
        for run in runs:
            if "loss" in run.train:
                ax.plot(*run.train["loss"], label=run.name)
        ax.set_xlabel("optimizer step")
        ax.set_title("training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out / "compare_loss.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plot_run.py", description=__doc__.split("\n\n")[0],
                                     epilog="Writes RUN_DIR/plots/{loss,val_metrics,training,per_class_ap}.png.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory holding metrics.jsonl")
    parser.add_argument("--compare", metavar="OUT_DIR", help="also overlay the runs' curves into OUT_DIR")
    args = parser.parse_args(argv)
    try:
        for run_dir in args.run_dirs:
            files = plot_run(run_dir)
            skipped = load_run(run_dir).skipped_lines
            note = f" ({skipped} unreadable lines of metrics.jsonl skipped)" if skipped else ""
            print(f"{run_dir}: {', '.join(str(p) for p in files) or 'nothing to plot'}{note}")
        if args.compare:
            files = plot_comparison(args.run_dirs, args.compare)
            print(f"comparison: {', '.join(str(p) for p in files) or 'nothing to compare'}")
    except (FileNotFoundError, ValueError) as exc:
        print(f"plot_run.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
