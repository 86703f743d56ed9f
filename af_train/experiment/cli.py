"""``af-experiment FILE.yaml``: run an experiment file's arms x seeds x folds and report them with intervals.

    af-experiment experiments/ft2_tau_alpha.yaml            # run (or resume) everything, then report
    af-experiment experiments/ft2_tau_alpha.yaml --plan     # print every unit, its state and command
    af-experiment experiments/ft2_tau_alpha.yaml --report   # only the report, from finished runs
    af-experiment experiments/ft2_tau_alpha.yaml --emit-slurm slurm/ft2   # SLURM arrays, one task per run
    af-experiment experiments/ft2_tau_alpha.yaml --unit KEY # one unit (what each SLURM array task runs)

Run it from the repository root (recipe and data paths in the file are relative to the working
directory, as for af-train). Interrupt it at any time (Ctrl-C, SIGTERM, a lost node) and run the same
command again: finished runs are kept, an interrupted run continues from its last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from af_train.experiment.plan import build_plan
from af_train.experiment.report import write_report
from af_train.experiment.runner import REUSE, emit_slurm, format_seconds, run_plan, state_of
from af_train.experiment.spec import ExperimentError, load_experiment


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="af-experiment", description=__doc__.split("\n\n")[0],
                                     epilog="The file format: af_train/experiment/spec.py and the README section "
                                            "'Experiments'. Shipped files: experiments/*.yaml.")
    parser.add_argument("file", help="experiment file (YAML)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="print the units, their state and commands; run nothing")
    mode.add_argument("--report", action="store_true", help="write the report from the finished runs; run nothing")
    mode.add_argument("--emit-slurm", metavar="DIR", help="write SLURM array scripts and submit.sh into DIR; run "
                                                          "nothing")
    mode.add_argument("--unit", metavar="KEY", help="run one unit (its dependencies must be done)")
    parser.add_argument("--verbose", action="store_true", help="show the commands' output instead of only logging it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    try:
        spec = load_experiment(args.file)
        plan = build_plan(spec)
        if args.plan:
            folds = f" x {len(spec.folds.test)} folds" if spec.folds else ""
            print(f"{spec.name}: {len(plan.units)} units, {len(plan.results)} evaluated runs ({len(spec.arms)} arms x "
                  f"{len(spec.seeds)} seeds{folds}); runs in {spec.runs_dir}")
            for unit in plan.units.values():
                state, why = state_of(unit)
                arms = f" arms: {', '.join(unit.arms)}" if unit.arms else ""
                print(f"# {unit.name} [{state}: {why}]{arms}\n{unit.shell()}")
            return 0
        if args.emit_slurm:
            written = emit_slurm(plan, args.file, Path(args.emit_slurm))
            print(f"wrote {', '.join(str(p) for p in written)}\nsubmit with: bash "
                  f"{Path(args.emit_slurm) / 'submit.sh'}")
            return 0
        if args.unit:
            matches = [k for k in plan.units if k.startswith(args.unit)]
            if len(matches) != 1:
                raise ExperimentError(f"--unit {args.unit}: {'no unit' if not matches else 'several units'} of "
                                      f"{args.file} has that key; --plan lists them")
            run_plan(plan, args.verbose, only=matches)
            return 0
        rows = None
        if not args.report:
            print(f"{spec.name}: {len(plan.units)} units ({sum(state_of(u)[0] == REUSE for u in plan.units.values())} "
                  f"done); runs in {spec.runs_dir}, logs in each run's experiment/log.txt", flush=True)
            rows = run_plan(plan, args.verbose)
        payload = write_report(plan, args.file, time.time() - started, rows)
    except ExperimentError as exc:
        print(f"af-experiment: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\naf-experiment: stopped; run the same command again to continue (finished runs are kept, the "
              "interrupted one resumes from its last checkpoint)", file=sys.stderr)
        return 130
    out = spec.results_dir
    print((out / "results.md").read_text(encoding="utf-8"))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'plots'}/ "
          f"(this invocation: {format_seconds(payload['wall_seconds_this_invocation'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
