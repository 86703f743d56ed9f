"""The demo's bookkeeping: stages, config hashes, done markers, and the results table (no torch here).

A ``Stage`` is one step of ``tools/demo.py`` (a command, or a Python function run in-process). Its
config hash covers what it runs, the content of the files it reads (recipes) and the hashes of the
stages it depends on, so changing an upstream stage invalidates everything downstream. Markers live
in ``OUT/.stages/<name>.json``:

- ``done`` with the current hash and the outputs present: the stage is **reused**;
- ``running`` with the current hash (an interrupted demo): the stage is **resumed** (training runs
  pick up their latest checkpoint with ``--resume auto``, data preparation its committed chunks);
- anything else (no marker, another hash, missing outputs): the stage's own outputs are removed and
  it runs **fresh**.
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from af_train.files import atomic_write, sha256_file

MARKER_DIR = ".stages"
REUSE, RESUME, FRESH = "reuse", "resume", "fresh"


@dataclass
class Stage:
    name: str  # short id, also the marker file name
    title: str  # what a person reads in the progress output
    command: list[str] | None = None  # argv of a subprocess; None for an in-process stage
    function: Callable[[], None] | None = None  # in-process work, after the command if there is one
    outputs: list[Path] = field(default_factory=list)  # all must exist for the stage to count as done
    owned: list[Path] = field(default_factory=list)  # removed before a fresh run (never shared folders)
    depends: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)  # inputs whose content is part of the hash
    params: dict[str, Any] = field(default_factory=dict)  # settings of in-process stages, for the hash
    late_args: Callable[[], list[str]] | None = None  # arguments known only when the stage starts
    late_note: str = ""  # how ``late_args`` read in ``shell()``, e.g. "--checkpoint <selected on val>"

    def argv(self) -> list[str]:
        """The command to run now (with the late arguments resolved)."""
        if not self.command:
            raise ValueError(f"stage '{self.name}' has no command")
        return [*self.command, *(self.late_args() if self.late_args else [])]

    def shell(self) -> str:
        """The command as one would type it (for logs, the README and ``--plan``)."""
        if not self.command:
            return f"(in-process) {self.title}"
        return shlex.join(self.command) + (f" {self.late_note}" if self.late_note else "")


def file_digest(path: Path) -> str:
    if not path.is_file():
        return "missing"
    return sha256_file(path)[:16]


def stage_hash(stage: Stage, upstream: dict[str, str]) -> str:
    """Hash of what the stage does and of everything it reads; ``upstream`` maps stage name -> hash."""
    missing = [d for d in stage.depends if d not in upstream]
    if missing:
        raise KeyError(f"stage '{stage.name}' depends on {missing}, which come later or do not exist")
    blob = {
        "name": stage.name,
        "command": stage.command,
        "params": stage.params,
        "files": {str(p): file_digest(p) for p in stage.files},
        "depends": {d: upstream[d] for d in sorted(stage.depends)},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def marker_path(out: Path, name: str) -> Path:
    return out / MARKER_DIR / f"{name}.json"


def read_marker(out: Path, name: str) -> dict[str, Any] | None:
    path = marker_path(out, name)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError):
        return None  # a marker cut by a kill: treat as absent


def write_marker(out: Path, name: str, payload: dict[str, Any]) -> None:
    path = marker_path(out, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(payload, indent=2) + "\n")  # a marker is either the old one or the new one


def decide(stage: Stage, digest: str, marker: dict[str, Any] | None) -> tuple[str, str]:
    """(REUSE | RESUME | FRESH, the reason in words)."""
    if marker is None:
        return FRESH, "not run before"
    if marker.get("hash") != digest:
        return FRESH, f"configuration changed (hash {marker.get('hash')} -> {digest})"
    if marker.get("status") == "done":
        missing = [str(p) for p in stage.outputs if not p.exists()]
        if missing:
            return FRESH, f"outputs missing: {', '.join(missing)}"
        return REUSE, f"done in an earlier run ({format_seconds(marker.get('seconds'))})"
    return RESUME, "interrupted earlier; continuing"


def clear_outputs(stage: Stage) -> list[Path]:
    """Remove what a fresh run of ``stage`` will rewrite; returns what was removed."""
    removed = []
    for path in stage.owned:
        if path.is_dir():
            shutil.rmtree(path)
            removed.append(path)
        elif path.exists():
            path.unlink()
            removed.append(path)
    return removed


def format_seconds(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "n/a"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells[1:]]
    return "\n".join(lines)


def results_tables(models: list[dict[str, Any]], pretraining: list[dict[str, Any]],
                   timings: list[dict[str, Any]], baselines: dict[str, Any] | None = None) -> str:
    """The demo's report: fine-tuned models and baselines on the test split, pretraining runs, time per stage.

    ``models``: dicts with name, best_step, val_mAP, test_mAP, test_auc, test_d_prime, test_accuracy,
    prior_mAP, num_test; ``pretraining``: name, row, steps, val_mlm_loss, val_mlm_accuracy;
    ``timings``: stage, title, seconds, state (ran / reused / resumed); ``baselines``: the demo's
    ``baselines.json`` (bag_of_codes and label_prior metrics, chance_accuracy, num_test).
    """
    parts = []
    baselines = baselines or {}
    if models:
        rows = [[m["name"], m.get("best_step"), m.get("val_mAP"), m.get("test_accuracy"), m.get("test_mAP"),
                 m.get("test_auc"), m.get("test_d_prime")] for m in models]
        bag, prior = baselines.get("bag_of_codes"), baselines.get("label_prior")
        if bag:
            rows.append(["bag of codes", None, None, bag.get("accuracy"), bag.get("mAP"), bag.get("auc"),
                         bag.get("d_prime")])
        if prior:
            rows.append(["label prior", None, None, prior.get("accuracy"), prior.get("mAP"), prior.get("auc"),
                         prior.get("d_prime")])
        else:  # the per-model evaluation's label prior (same clips, same training-set frequencies)
            rows.append(["label prior", None, None, None, models[0].get("prior_mAP"), None, None])
        num_test = models[0].get("num_test")
        chance = baselines.get("chance_accuracy")
        about = f"{_fmt(num_test)} clips" + (f"; chance accuracy {_fmt(chance)}" if chance is not None else "")
        parts.append(f"Held-out test split ({about}); models: checkpoint selected on val/mAP; baselines: fitted on "
                     "the training split:\n\n"
                     + markdown_table(["model", "best step", "val mAP", "test accuracy", "test mAP", "test AUC",
                                       "test d'"], rows))
    if pretraining:
        rows = [[p["name"], p.get("row"), p.get("steps"), p.get("val_mlm_loss"), p.get("val_mlm_accuracy")]
                for p in pretraining]
        parts.append("MLM pretraining (validation split):\n\n"
                     + markdown_table(["run", "code row", "steps", "val MLM loss", "val MLM accuracy"], rows))
    if timings:
        ran = [t for t in timings if t.get("state") != "reused"]
        total = sum(t["seconds"] for t in ran if t.get("seconds") is not None)
        header = ["stage", "what", "state", "wall time"]
        rows = [[t["stage"], t["title"], t.get("state"), format_seconds(t.get("seconds"))] for t in timings]
        rows.append(["total", "this invocation", "", format_seconds(total)])
        if any(t.get("cpu_seconds") is not None for t in timings):  # CPU time: independent of other load
            header.append("CPU time")
            for row, t in zip(rows, timings):
                row.append(format_seconds(t.get("cpu_seconds")))
            rows[-1].append(format_seconds(sum(t.get("cpu_seconds") or 0.0 for t in ran)))
        parts.append("Time per stage:\n\n" + markdown_table(header, rows))
    return "\n\n".join(parts) + "\n"


def verdicts(models: dict[str, dict[str, Any]], difference: dict[str, float] | None,
             baselines: dict[str, Any] | None = None, learning_margin: float = 0.15,
             accuracy_margin: float = 0.25) -> list[tuple[bool, str]]:
    """The demo's claims, checked: (passed, sentence) pairs.

    Learning: test mAP at least ``learning_margin`` above the label-prior baseline and, for single-label
    data, test accuracy at least ``accuracy_margin`` above chance. FT2 against FT1: the paired-bootstrap
    95 % interval of (FT2 − FT1) test mAP reaches 0 or above, i.e. FT2 is not worse than FT1 by more
    than the test split's sampling noise.
    """
    out = []
    chance = (baselines or {}).get("chance_accuracy")
    for name, m in models.items():
        gain = m["test_mAP"] - m["prior_mAP"]
        out.append((gain >= learning_margin,
                    f"{name} learns: test mAP {m['test_mAP']:.3f} vs label-prior baseline {m['prior_mAP']:.3f} "
                    f"(+{gain:.3f}; demo asks for >= +{learning_margin:.2f})"))
        if chance is not None and m.get("test_accuracy") is not None:
            above = m["test_accuracy"] - chance
            out.append((above >= accuracy_margin,
                        f"{name} recognises words of unseen speakers: test accuracy {m['test_accuracy']:.3f} vs "
                        f"chance {chance:.3f} ({above:+.3f}; demo asks for >= +{accuracy_margin:.2f})"))
    if difference is not None:
        ok = difference["high"] >= 0.0
        out.append((ok, f"FT2 - FT1 test mAP = {difference['mean']:+.3f} (paired bootstrap 95% interval "
                        f"[{difference['low']:+.3f}, {difference['high']:+.3f}] over test clips): "
                        + ("FT2 is not worse than FT1 beyond noise" if ok else "FT2 is worse than FT1 beyond noise")))
    return out
