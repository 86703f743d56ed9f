"""tools/plot_run.py on synthetic metrics.jsonl files: series extraction, PNG output, failure paths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from af_train_tools import plot_run


def write_run(run_dir: Path, records: list[dict], extra_lines: list[str] = ()) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def fake_records(rng: np.random.Generator, steps: int = 40, every: int = 10, pretrain: bool = False) -> list[dict]:
    """What the engine logs: train records per log step, val records every ``every``, test at the end."""
    records = []
    for step in range(1, steps + 1):
        loss = float(2.0 * math.exp(-step / 15) + 0.05 * rng.random())
        record = {"step": step, "samples": 8 * step, "tokens": 1000 * step, "epoch": 0, "loss": loss,
                  "lr": 1e-3 * (1 - step / steps), "grad_norm": float(rng.random()), "samples_per_s": 100.0,
                  "skipped_steps": 0, "memory_gb": 0.8}
        record["mlm_loss" if pretrain else "cls_loss"] = loss
        records.append(record)
        if step % every == 0:
            val = {"step": step, "val/loss": loss + 0.1, "val/num_samples": 52.0, "val/eval_seconds": 0.1}
            val.update({"val/mlm_accuracy": float(rng.random())} if pretrain else
                       {"val/mAP": float(rng.random()), "val/auc": float(rng.random())})
            records.append(val)
    if not pretrain:
        records.append({"step": steps, "test/loss": 0.3, "test/mAP": 0.7, "test/auc": 0.9})
    return records


def test_collect_series_groups_sorts_and_lets_later_records_win():
    rng = np.random.default_rng()
    steps = rng.permutation(np.arange(1, 31)).tolist()  # records out of order
    values = {s: float(rng.normal()) for s in steps}
    records = [{"step": s, "loss": values[s], "grad_norm": None, "flag": True, "note": "x"} for s in steps]
    records += [{"step": 7, "loss": 123.0}]  # a resumed run logged step 7 again: the later record wins
    records += [{"step": 10, "val/mAP": 0.4, "val/num_samples": 52.0}, {"step": 5, "val/mAP": 0.3}]
    records += [{"loss": 1.0}, {"step": "9", "loss": 1.0}]  # no usable step: ignored
    series = plot_run.collect_series(records)
    expected_steps = list(range(1, 31))
    expected = [123.0 if s == 7 else values[s] for s in expected_steps]
    assert series.train["loss"] == (expected_steps, expected)
    assert set(series.train) == {"loss"}  # None, bools and strings are not series
    assert series.evals == {"val": {"mAP": ([5, 10], [0.3, 0.4])}}  # bookkeeping (num_samples) left out


def test_plots_written_for_a_fine_tuning_run_with_per_class_ap(tmp_path, capsys):
    import matplotlib.image

    rng = np.random.default_rng()
    run = write_run(tmp_path / "ft1", fake_records(rng), extra_lines=['{"step": 41, "loss": 0.'])  # cut by a kill
    classes = ["tone", "chirp", "clicks"]
    (run / plot_run.PER_CLASS_FILE).write_text(json.dumps({
        "split": "test", "num_clips": 56, "classes": classes, "ap": [0.9, None, 0.5],
        "prior_ap": [0.1, 0.2, 0.3], "mAP": 0.7, "prior_mAP": 0.2}))
    assert plot_run.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "1 unreadable lines of metrics.jsonl skipped" in out
    names = sorted(p.name for p in (run / "plots").iterdir())
    assert names == ["loss.png", "per_class_ap.png", "training.png", "val_metrics.png"]
    for name in names:
        image = matplotlib.image.imread(run / "plots" / name)
        assert image.shape[0] > 200 and image.shape[1] > 400
        assert float(image[..., :3].std()) > 0.01  # something was drawn


def test_pretraining_run_plots_mlm_accuracy_and_comparison(tmp_path):
    rng = np.random.default_rng()
    pre = write_run(tmp_path / "pretrain_row0", fake_records(rng, pretrain=True))
    ft = write_run(tmp_path / "ft1", fake_records(rng))
    metrics = plot_run.load_run(pre)
    assert plot_run._eval_metric_names(metrics) == ["mlm_accuracy"]
    assert plot_run._loss_terms(metrics) == ["loss", "mlm_loss"]
    written = plot_run.plot_run(pre)
    assert {p.name for p in written} == {"loss.png", "val_metrics.png", "training.png"}  # no per-class file
    assert plot_run.main([str(pre), str(ft), "--compare", str(tmp_path / "cmp")]) == 0
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["compare_loss.png", "compare_val.png"]


def test_probe_curve_is_drawn_with_the_losses_and_compared(tmp_path):
    rng = np.random.default_rng()
    records = fake_records(rng, pretrain=True)
    probe = {0: 0.12, 10: 0.18, 20: 0.25, 30: 0.31, 40: 0.33}
    records += [{"step": s, "probe/accuracy": v, "probe/mAP": v + 0.02, "probe/seconds": 0.4, "probe/k": 10}
                for s, v in probe.items()]
    run = write_run(tmp_path / "pretrain_row0", records)
    metrics = plot_run.load_run(run)
    assert plot_run.probe_series(metrics) == ("accuracy", (list(probe), list(probe.values())))
    assert "seconds" not in metrics.evals["probe"]  # bookkeeping, not a curve
    assert plot_run.probe_series(plot_run.load_run(write_run(tmp_path / "plain", fake_records(rng)))) is None
    plain_loss = tmp_path / "plain_loss.png"
    no_probe = write_run(tmp_path / "without" / "pretrain_row0",  # same name: same title
                         [r for r in records if not any(k.startswith("probe/") for k in r)])
    plot_run.plot_loss(plot_run.load_run(no_probe), plain_loss)
    with_probe = plot_run.plot_loss(metrics, tmp_path / "loss.png")
    import matplotlib.image

    # the probe's axis and legend entry make the figure differ from the same losses without a probe
    assert not np.array_equal(matplotlib.image.imread(with_probe), matplotlib.image.imread(plain_loss))
    assert plot_run.main([str(run), str(no_probe), "--compare", str(tmp_path / "cmp")]) == 0
    assert "compare_probe.png" in {p.name for p in (tmp_path / "cmp").iterdir()}


def test_run_without_evaluations_still_plots_losses(tmp_path):
    records = [r for r in fake_records(np.random.default_rng(), steps=10) if "loss" in r and "step" in r]
    run = write_run(tmp_path / "run", records)
    written = plot_run.plot_run(run)
    assert {p.name for p in written} == {"loss.png", "training.png"}


def test_missing_run_and_bad_per_class_file_are_clear_errors(tmp_path, capsys):
    assert plot_run.main([str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert plot_run.main([str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    run = write_run(tmp_path / "run", fake_records(np.random.default_rng(), steps=10))
    (run / plot_run.PER_CLASS_FILE).write_text(json.dumps({"classes": ["a", "b"], "ap": [0.1], "prior_ap": [0.1, 0.2]}))
    assert plot_run.main([str(run)]) == 2
    assert "'ap' has 1 values for 2 classes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot_run.main([])
