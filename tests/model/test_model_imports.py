"""``import af_train.model`` stays below the data layer: no mosaicml-streaming, no af_train.data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, sys
import af_train.model
import af_train.tokens
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "streaming" or m.startswith("af_train.data"))))
"""


def test_model_imports_without_streaming_or_the_data_layer():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
