"""Several ``af_train.train`` runs one after another in the same launched ranks, so that a test module whose
runs all need the real launcher at one world size pays the launcher's and the ranks' start-up once.

    deepspeed ... tests/engine/sequence_rank_worker.py --plan PLAN.json

PLAN.json is a list of ``{"argv": [af_train.train's arguments], "log": FILE}``. Each run is
``af_train.train.main`` itself (recipe, overrides, resume, Trainer, close), with this rank's output appended
to the run's own log file; the first run that fails ends the job with its exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def output_to(log: str) -> Iterator[None]:
    """This process's stdout and stderr (file descriptors 1 and 2) appended to ``log`` meanwhile."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "ab") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", required=True)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)  # the launcher's
    args = parser.parse_args()
    from af_train.train import main as train_main

    for run in json.loads(Path(args.plan).read_text()):
        with output_to(run["log"]):
            rc = train_main(run["argv"])
        if rc:
            print(f"sequence_rank_worker: {run['log']}: af_train.train exit {rc}", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
