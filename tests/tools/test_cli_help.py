"""``--help`` of every console script (setup.py) and of every tool run as a script works.

Tools are discovered (every ``tools/*.py`` with a ``__main__`` block), so a new tool is covered
without editing this file.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENTRY = re.compile(r'"([\w-]+)\s*=\s*([\w.]+):(\w+)"')


def console_scripts() -> list[tuple[str, str, str]]:
    text = (REPO / "setup.py").read_text(encoding="utf-8")
    section = text[text.index("console_scripts"):]
    found = ENTRY.findall(section)
    assert found, "no console_scripts found in setup.py"
    return found


def script_tools() -> list[Path]:
    return sorted(p for p in (REPO / "tools").glob("*.py")
                  if 'if __name__ == "__main__"' in p.read_text(encoding="utf-8"))


def test_known_tools_are_discovered():
    names = {p.stem for p in script_tools()}
    assert {"prepare_dataset", "make_synthetic_audio", "benchmark_kernels", "plot_run", "demo"} <= names
    scripts = {name for name, _, _ in console_scripts()}
    assert {"af-train", "af-evaluate", "af-prepare", "af-fit-tokenizer", "af-synth-audio", "af-export-hf", "af-predict",
            "af-embed"} <= scripts


@pytest.mark.parametrize("name,module,function", console_scripts(), ids=[n for n, _, _ in console_scripts()])
def test_console_script_help(name, module, function, capsys):
    entry = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as exit_info:
        entry(["--help"])
    assert exit_info.value.code == 0, f"{name} --help exited with {exit_info.value.code}"
    out = capsys.readouterr().out
    assert out.startswith("usage:") and len(out.splitlines()) >= 3, f"{name} --help printed:\n{out}"


# One interpreter runs every tool as ``python3 tools/X.py --help`` (and the two package entry points as
# ``python3 -m``): importing torch once instead of once per tool keeps this test cheap.
_RUNNER = r"""
import contextlib, io, json, runpy, sys
results = {}
for kind, target in json.loads(sys.argv[1]):
    out = io.StringIO()
    sys.argv = [target, "--help"]
    code = None
    with contextlib.redirect_stdout(out):
        try:
            if kind == "path":
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:  # noqa: BLE001
            code = f"{type(exc).__name__}: {exc}"
    results[target] = {"code": code, "out": out.getvalue()}
print("RESULTS" + json.dumps(results))
"""


def test_every_tool_and_module_entry_point_help_as_a_script(tmp_path):
    targets = [("path", str(p)) for p in script_tools()]
    targets += [("module", "af_train.train"), ("module", "af_train.evaluate"), ("module", "af_train.prepare"),
                ("module", "af_train.prepare.fit_tokenizer")]
    # from a foreign folder: the tools must find the repository themselves
    result = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(targets)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert "RESULTS" in result.stdout, result.stderr[-3000:]
    results = json.loads(result.stdout.split("RESULTS", 1)[1])
    failures = {t: r for t, r in results.items() if r["code"] not in (0, None) or "usage:" not in r["out"]}
    assert not failures, json.dumps(failures, indent=2)[:4000]
    assert len(results) == len(targets)
