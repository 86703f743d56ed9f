"""Import diet: the inference stack starts without the training stack's heavy dependencies.

``import af_train.inference`` used to go through ``af_train.data`` to mosaicml-streaming, which imports
transformers, sklearn, scipy, pandas, torchvision and PIL (about 7 CPU-seconds on two cores); inference,
the model and the tokenizers need none of them. And the inference commands answer ``--help`` and
argument errors without importing torch (about 2 CPU-seconds by itself).

Each check runs in a fresh interpreter (this one has imported everything already) under
``python -X importtime``, whose tree of imports gives the chain that pulled a forbidden package in.
One interpreter imports all three packages: if their union imports no forbidden package, none does.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("af_train.inference", "af_train.model", "af_train.tokenizers")
# top-level packages none of PACKAGES may import at module level (deepspeed: seconds more, training only)
FORBIDDEN = ("streaming", "transformers", "sklearn", "torchvision", "scipy", "pandas", "PIL", "deepspeed")

# __import__, not importlib.import_module: -X importtime only logs imports that take the C path
IMPORT_EVERY_MODULE = r"""
import pkgutil, sys
for name in sys.argv[1:]:
    package = sys.modules[__import__(name) and name]
    for info in pkgutil.walk_packages(package.__path__, name + "."):
        __import__(info.name)
    for attribute in package.__all__:  # names a package imports on first use (af_train.inference) too
        getattr(package, attribute)
"""

RUN_WITHOUT_MODEL = r"""
import contextlib, io, sys
for target in sys.argv[1:]:
    module, function = target.split(":")
    __import__(module)
    entry = getattr(sys.modules[module], function)
    for argv, status in ((["--help"], 0), ([], 2)):  # help; an argument error (no MODEL given)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                entry(argv)
                code = 0
            except SystemExit as exc:
                code = exc.code
        assert code == status and "usage:" in out.getvalue(), (target, argv, code, out.getvalue()[-2000:])
"""


def imports_of(script: str, *args: str) -> list[tuple[int, str]]:
    """(depth, module) of every module a fresh interpreter imports running ``script``, in
    ``-X importtime`` order: a module is listed after the modules its import imported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", script, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = []
    for line in done.stderr.splitlines():
        fields = line.split("|")
        if not line.startswith("import time:") or len(fields) != 3 or fields[2].strip() == "imported package":
            continue
        name = fields[2].rstrip()
        rows.append(((len(name) - len(name.lstrip()) - 1) // 2, name.strip()))  # 1 space, then 2 per level
    return rows


def import_chain(rows: list[tuple[int, str]], index: int) -> list[str]:
    """The modules whose imports led to ``rows[index]``, outermost first: each one's importer is the next
    module listed with a smaller depth."""
    chain = [rows[index][1]]
    depth = rows[index][0]
    for row_depth, name in rows[index + 1:]:
        if row_depth < depth:
            chain.insert(0, name)
            depth = row_depth
    return chain


def forbidden_imports(rows: list[tuple[int, str]], forbidden: tuple[str, ...]) -> dict[str, str]:
    """For each forbidden top-level package imported: the chain into its first import, up to the first
    forbidden module (transformers came through streaming: the chain ends at streaming)."""
    found: dict[str, str] = {}
    for index, (_, name) in enumerate(rows):
        top = name.split(".")[0]
        if top in forbidden and top not in found:
            chain = import_chain(rows, index)
            entry = next(i for i, module in enumerate(chain) if module.split(".")[0] in forbidden)
            found[top] = " -> ".join(chain[:entry + 1])
    return found


def inference_console_scripts() -> list[str]:
    """``module:function`` of every console script (setup.py) that lives in af_train.inference."""
    text = (REPO / "setup.py").read_text(encoding="utf-8")
    scripts = re.findall(r'"[\w-]+\s*=\s*(af_train\.inference\.[\w.]+:\w+)"', text)
    assert len(scripts) >= 3, scripts  # af-predict, af-embed, af-export-hf
    return scripts


def test_inference_model_and_tokenizers_import_none_of_the_training_stack():
    rows = imports_of(IMPORT_EVERY_MODULE, *PACKAGES)
    names = {name for _, name in rows}
    # the check saw the modules it is about (else a parsing slip would pass it)
    assert {"af_train.inference.tagger", "af_train.inference.export_hf", "af_train.model.encoder",
            "af_train.tokenizers.mel_rvq", "torch"} <= names
    found = forbidden_imports(rows, FORBIDDEN)
    assert not found, "imported at module level:\n" + "\n".join(f"  {top}: {chain}" for top, chain in found.items())


def test_inference_commands_answer_help_and_argument_errors_without_torch():
    scripts = inference_console_scripts()
    rows = imports_of(RUN_WITHOUT_MODEL, *scripts)
    assert {module for module, _ in (s.split(":") for s in scripts)} <= {name for _, name in rows}
    found = forbidden_imports(rows, ("torch", *FORBIDDEN))
    assert not found, "imported for --help:\n" + "\n".join(f"  {top}: {chain}" for top, chain in found.items())
