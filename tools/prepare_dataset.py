#!/usr/bin/env python3
"""Thin entry point: ``af-prepare`` lives in :mod:`af_train.prepare` (``python3 -m af_train.prepare``)."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from af_train.prepare.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
