"""Running a plan's units: locally one after the other, or one unit per SLURM array task.

Each unit leaves a marker (``af_experiment.json`` in a run directory, ``ROOT/.af_experiment/<step>.json``
for a data step) with its key, its state and its wall and CPU time. On the next invocation a unit is

- **reused** when its marker says done with the same key and its outputs exist;
- **resumed** when its run directory exists without a done marker (an interrupted run): af-train is
  started again with ``--resume auto`` and continues from its last complete checkpoint;
- **run** otherwise.

A training unit that is an arm's result is then scored on the test split by ``af-evaluate`` with
the checkpoint the run selected on validation (``test_checkpoint`` in ``final/metrics.json``), which
writes the per-clip scores the report pairs across arms; its test mAP must equal the one the run
itself reported for that checkpoint.

Every unit holds a lock file while it runs, so two invocations (or two array tasks) never run the same
unit at once. Child processes get SIGTERM if this process dies, and a SIGTERM/SIGINT sent to it is
passed to the running command (af-train then saves a checkpoint and exits).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from af_train.experiment.plan import Plan, Unit
from af_train.experiment.spec import ExperimentError
from af_train.files import atomic_write, git_commit

MARKER = "af_experiment.json"
REUSE, RESUME, RUN = "reuse", "resume", "run"
EVAL_TOLERANCE = 1e-6  # af-evaluate and the run's own test score of the same checkpoint on the same clips


def marker_path(unit: Unit) -> Path:
    if unit.kind == "data":
        return unit.directory.parent / f"{unit.directory.name}.json"
    return unit.directory / MARKER


def read_marker(unit: Unit) -> dict[str, Any] | None:
    path = marker_path(unit)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_marker(unit: Unit, payload: dict[str, Any]) -> None:
    path = marker_path(unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"key": unit.key, "unit": unit.name, **payload}, indent=2) + "\n")


def state_of(unit: Unit) -> tuple[str, str]:
    """(REUSE | RESUME | RUN, why), or an ExperimentError for data that this experiment did not make."""
    marker = read_marker(unit)
    if marker is not None and marker.get("key") != unit.key:
        raise ExperimentError(f"{marker_path(unit)}: {unit.name} there was made by another command (key "
                              f"{marker.get('key')}, now {unit.key}: {marker.get('command')}); remove "
                              f"{unit.directory if unit.kind == 'train' else 'those outputs'} or choose another "
                              "data.root")
    missing = [str(p) for p in unit.outputs if not p.exists()]
    if marker is not None and marker.get("status") == "done":
        if not missing:
            return REUSE, f"done earlier ({format_seconds(marker.get('seconds'))})"
        return RESUME, f"marked done but {missing[0]} is missing"
    if unit.kind == "data":
        present = [str(p) for p in unit.outputs if p.exists()]
        if marker is None and present:
            raise ExperimentError(f"data step {unit.name}: {present[0]} exists but was not made by af-experiment "
                                  "(no marker); remove it, or choose another data.root")
        return (RESUME, "interrupted earlier") if marker is not None else (RUN, "not run before")
    if unit.directory.exists():
        return RESUME, "interrupted earlier: continues from its last complete checkpoint"
    return RUN, "not run before"


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {rest:02d} s"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


@contextlib.contextmanager
def unit_lock(unit: Unit) -> Iterator[None]:
    """Exclusive lock of one unit (a file beside its marker); refused at once when another process holds it."""
    path = marker_path(unit).with_name(marker_path(unit).name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise ExperimentError(f"{unit.name} is being run by another process ({handle.read().strip() or 'pid ?'}); "
                                  "wait for it or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield


def _die_with_parent() -> None:
    """In the child: SIGTERM when af-experiment dies, so no orphaned run keeps writing into the store."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_command(argv: list[str], log: Path, echo: bool = False) -> int:
    """Run ``argv`` with its output appended to ``log``; SIGTERM/SIGINT to this process reach it too."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "ab") as out:
        out.write(f"\n$ {shlex.join(argv)}   # {now()}\n".encode())
        out.flush()
        process = subprocess.Popen(argv, stdout=None if echo else out, stderr=subprocess.STDOUT if not echo else None,
                                   env=env, preexec_fn=_die_with_parent)
        previous = signal.getsignal(signal.SIGTERM)

        def forward(signum: int, frame: Any) -> None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, forward)
        try:
            return process.wait()
        except KeyboardInterrupt:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            process.wait()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)


def _tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def evaluate_command(unit: Unit) -> list[str]:
    """af-evaluate on the test split with the checkpoint the run selected on validation."""
    final = json.loads((unit.directory / "final" / "metrics.json").read_text(encoding="utf-8"))
    tag = final.get("test_checkpoint")
    if not tag:
        raise ExperimentError(f"{unit.directory}: the run reported no test_checkpoint in final/metrics.json (does its "
                              "recipe have data.test and train.test_at_end?)")
    out = unit.directory / "experiment"
    return ["af-evaluate", str(unit.directory), "--split", "test", "--checkpoint",
            str(unit.directory / "checkpoints" / tag), "--out", str(out / "eval_test.json"),
            "--scores", str(out / "test_scores.npz")]


def check_evaluation(unit: Unit) -> None:
    """The independent re-evaluation must reproduce the run's own test score of the selected checkpoint."""
    final = json.loads((unit.directory / "final" / "metrics.json").read_text(encoding="utf-8"))
    again = json.loads((unit.directory / "experiment" / "eval_test.json").read_text(encoding="utf-8"))
    for name in ("test/mAP", "test/accuracy"):
        if name in final and abs(final[name] - again.get(name, float("nan"))) > EVAL_TOLERANCE:
            raise ExperimentError(f"{unit.directory}: af-evaluate gives {name} {again.get(name)} for checkpoint "
                                  f"{final.get('test_checkpoint')}, the run reported {final[name]}: they must score "
                                  "the same clips with the same weights")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_unit(unit: Unit, state: str, echo: bool = False) -> dict[str, Any]:
    """Run (or resume) one unit; returns its marker payload. Raises ExperimentError when a command fails."""
    log = (unit.directory.parent / f"{unit.directory.name}.log" if unit.kind == "data"
           else unit.directory / "experiment" / "log.txt")
    started, cpu_started = time.time(), cpu_seconds()
    previous = read_marker(unit) or {}
    commit = git_commit()
    write_marker(unit, {"status": "running", "started": now(), "command": unit.shell(), **commit,
                        "resumed": state == RESUME, "attempts": int(previous.get("attempts", 0)) + 1,
                        "earlier_seconds": previous.get("seconds_total", 0.0),
                        "earlier_cpu_seconds": previous.get("cpu_seconds_total", 0.0)})
    trained = unit.kind == "train" and all((unit.directory / "final" / name).is_file()
                                           for name in ("model.pt", "metrics.json"))
    commands = [] if trained else [unit.command]  # training finished, only its evaluation was interrupted
    if trained and unit.evaluate:
        commands.append(evaluate_command(unit))
    for argv in commands:
        rc = run_command(argv, log, echo)
        if rc != 0:
            raise ExperimentError(f"{unit.name} failed: `{shlex.join(argv)}` exited with {rc}. Last lines of "
                                  f"{log}:\n{_tail(log)}\nFix the cause and run the same af-experiment command "
                                  "again: finished runs are kept, this one resumes.")
        if argv is unit.command and unit.evaluate:
            commands.append(evaluate_command(unit))
    if unit.evaluate:
        check_evaluation(unit)
    seconds, cpu = time.time() - started, cpu_seconds() - cpu_started
    payload = {"status": "done", "finished": now(), "command": unit.shell(), **commit, "resumed": state == RESUME,
               "attempts": int(previous.get("attempts", 0)) + 1, "seconds": seconds, "cpu_seconds": cpu,
               "seconds_total": seconds + float(previous.get("seconds_total", 0.0) or 0.0),
               "cpu_seconds_total": cpu + float(previous.get("cpu_seconds_total", 0.0) or 0.0)}
    write_marker(unit, payload)
    return payload


def _record_interrupted(unit: Unit, started: float, cpu_started: float) -> None:
    """Keep the time an interrupted attempt took, so the totals in the report count every attempt."""
    marker = read_marker(unit) or {}
    if marker.get("status") == "done":
        return
    marker["seconds_total"] = float(marker.get("earlier_seconds") or 0.0) + time.time() - started
    marker["cpu_seconds_total"] = float(marker.get("earlier_cpu_seconds") or 0.0) + cpu_seconds() - cpu_started
    marker["status"] = "interrupted"
    with contextlib.suppress(OSError):
        write_marker(unit, {k: v for k, v in marker.items() if k not in ("key", "unit")})


def run_plan(plan: Plan, echo: bool = False, only: list[str] | None = None) -> list[dict[str, Any]]:
    """Run every unit (or the units whose keys are in ``only``) in order; returns one timing row per unit."""
    units = [u for u in plan.units.values() if only is None or u.key in only]
    rows = []
    for index, unit in enumerate(units, 1):
        state, why = state_of(unit)
        header = f"[{index}/{len(units)}] {unit.name}"
        if state == REUSE:
            marker = read_marker(unit) or {}
            print(f"{header}: reused ({why})", flush=True)
            rows.append({"unit": unit.name, "state": "reused", "seconds": marker.get("seconds_total"),
                         "cpu_seconds": marker.get("cpu_seconds_total")})
            continue
        waiting = [plan.units[d].name for d in unit.depends if state_of(plan.units[d])[0] != REUSE]
        if waiting:
            raise ExperimentError(f"{unit.name} needs {', '.join(waiting)} first (not done yet)")
        print(f"{header}: {'resuming' if state == RESUME else 'running'} ({why})\n    $ {unit.shell()}", flush=True)
        started, cpu_started = time.time(), cpu_seconds()
        with unit_lock(unit):
            try:
                payload = run_unit(unit, state, echo)
            except BaseException:
                _record_interrupted(unit, started, cpu_started)
                raise
        print(f"    done in {format_seconds(payload['seconds'])} (CPU {format_seconds(payload['cpu_seconds'])})",
              flush=True)
        rows.append({"unit": unit.name, "state": "resumed" if state == RESUME else "ran",
                     "seconds": payload["seconds_total"], "cpu_seconds": payload["cpu_seconds_total"]})
    return rows


# --------------------------------------------------------------------------------------------------
# SLURM: one array job per wave of independent units, chained with afterok dependencies
# --------------------------------------------------------------------------------------------------


def emit_slurm(plan: Plan, experiment_file: str, out: Path) -> list[Path]:
    """Write ``out/wave<i>.sbatch`` (one array task per unit of the wave), ``out/report.sbatch`` and
    ``out/submit.sh`` (submits them in order, each wave after the previous one succeeded). Every task runs
    ``af-experiment FILE --unit KEY``: the same resumable unit a local run executes."""
    spec = plan.spec
    out.mkdir(parents=True, exist_ok=True)
    written = []
    experiment = shlex.quote(str(Path(experiment_file)))
    workdir = shlex.quote(str(Path.cwd()))

    def header(job: str, gpus: int, array: int | None) -> list[str]:
        lines = ["#!/bin/bash", f"#SBATCH --job-name={spec.name}-{job}", "#SBATCH --nodes=1", "#SBATCH --ntasks=1",
                 f"#SBATCH --cpus-per-task={spec.slurm.cpus_per_task}", f"#SBATCH --time={spec.slurm.time}",
                 f"#SBATCH --output={out}/logs/%x-%A_%a.out"]
        if gpus:
            lines.append(f"#SBATCH --gpus-per-task={gpus}")
        if array is not None:
            lines.append(f"#SBATCH --array=0-{array - 1}")
        for key, value in (("partition", spec.slurm.partition), ("account", spec.slurm.account),
                           ("mem", spec.slurm.mem)):
            if value:
                lines.append(f"#SBATCH --{key}={value}")
        lines += [f"#SBATCH {extra}" for extra in spec.slurm.extra]
        lines += ["set -euo pipefail", f"cd {workdir}", *spec.slurm.setup]
        return lines

    names = []
    for index, wave in enumerate(plan.waves()):
        gpus = (spec.launch.num_gpus or 0) if any(u.kind == "train" for u in wave) else 0
        keys = " ".join(u.key for u in wave)
        lines = header(f"wave{index}", gpus, len(wave))
        lines += [f"# {u.name}" for u in wave]
        lines += [f"KEYS=({keys})", f"af-experiment {experiment} --unit \"${{KEYS[$SLURM_ARRAY_TASK_ID]}}\""]
        path = out / f"wave{index}.sbatch"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
        names.append(path.name)
    report = out / "report.sbatch"
    report.write_text("\n".join(header("report", 0, None) + [f"af-experiment {experiment} --report"]) + "\n",
                      encoding="utf-8")
    written.append(report)
    submit = ["#!/bin/bash", f"# {spec.name}: {len(plan.units)} units in {len(names)} waves; each wave starts when the "
              "previous one succeeded. Rerun this script after a failure: finished units are skipped at once.",
              "set -euo pipefail", f"cd {shlex.quote(str(out))}", "dependency=\"\""]
    for name in [*names, report.name]:
        submit += [f"job=$(sbatch --parsable $dependency {name})", "echo \"submitted " + name + " as $job\"",
                   "dependency=\"--dependency=afterok:$job\""]
    (out / "logs").mkdir(exist_ok=True)
    path = out / "submit.sh"
    path.write_text("\n".join(submit) + "\n", encoding="utf-8")
    path.chmod(0o755)
    written.append(path)
    return written
