"""The import graph of af_train/ and kernels/ against the layers of docs/ARCHITECTURE.md.

The graph is read from the source with ``ast`` (nothing is imported): every import statement, at
module level or inside a function (a lazy import), and ``importlib.import_module("a.literal")``
calls; relative imports are resolved, and ``from package import submodule`` points at the submodule.
The checks fail on

(a) an import cycle among these modules, lazy imports included (the message prints the cycle);
(b) a module importing a module of a higher layer, per the "Layers" table of docs/ARCHITECTURE.md,
    which is parsed here (the document is the single source of truth); also any import of tools/
    (``af_train_tools``), which sits above every layer;
(c) kernels/ importing anything but torch, triton, the standard library and kernels itself;
(d) a module that no row of the table covers, or that rows of two layers cover;
and on an import of an af_train/kernels module that does not exist (a lazy import of a moved module
fails only when it runs).

``if TYPE_CHECKING:`` imports never execute, so they are left out of the cycle check (breaking a
cycle that annotations alone would make is what the idiom is for). They count for (b) and (c): a
lower layer that names a higher layer's types depends on it all the same.

Not seen: imports by a computed name (``importlib.import_module(variable)``), and the implicit
import of a package's ``__init__`` when one of its submodules is imported (a package importing its own
submodules would otherwise always look like a cycle).

``python3 tests/test_architecture.py [REPO]`` prints every violation of a tree (default: this one).
"""

from __future__ import annotations

import ast
import re
import sys
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC_PATH = Path("docs") / "ARCHITECTURE.md"
PACKAGES = ("af_train", "kernels")  # the import graph's modules: these directories of the repository
KERNELS = "kernels"
KERNELS_MAY_IMPORT = frozenset({"torch", "triton", KERNELS}) | frozenset(sys.stdlib_module_names)
ABOVE_EVERY_LAYER = frozenset({"af_train_tools", "tools"})  # tools/ (installed as af_train_tools)
_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(\.\*)?$")


# --------------------------------------------------------------------------------------------------
# The layer table
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    number: int
    name: str
    patterns: tuple[str, ...]  # `x` is module x only; `x.*` is x and every module below it

    def covers(self, module: str) -> bool:
        return any(pattern_covers(p, module) for p in self.patterns)

    def __str__(self) -> str:
        return f"layer {self.number} {self.name}"


def pattern_covers(pattern: str, module: str) -> bool:
    if pattern.endswith(".*"):
        base = pattern[:-2]
        return module == base or module.startswith(base + ".")
    return module == pattern


def parse_layers(markdown: str, where: str = str(DOC_PATH)) -> list[Layer]:
    """The rows of the first table under the ``## Layers`` heading: the first cell starts with the layer
    number and its name, the ``modules`` cell holds the module patterns in backticks."""
    section = re.search(r"^## Layers[^\n]*\n(.*?)(?=^## |\Z)", markdown, re.MULTILINE | re.DOTALL)
    if section is None:
        raise ValueError(f"{where}: no '## Layers' section")
    rows = [line.strip() for line in section.group(1).splitlines() if line.strip().startswith("|")]
    if len(rows) < 3:
        raise ValueError(f"{where}: the Layers section has no table (header, separator, rows)")
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    header = [cell.lower() for cell in cells[0]]
    if "layer" not in header or "modules" not in header:
        raise ValueError(f"{where}: the Layers table needs 'layer' and 'modules' columns, has {cells[0]}")
    layer_col, modules_col = header.index("layer"), header.index("modules")
    layers = []
    for row in cells[1:]:
        if all(re.fullmatch(r":?-+:?", cell) for cell in row):
            continue  # the separator
        number_and_name = re.fullmatch(r"(\d+)\s+(.+)", row[layer_col])
        if number_and_name is None:
            raise ValueError(f"{where}: a layer cell must start with the layer number, got {row[layer_col]!r}")
        patterns = tuple(re.findall(r"`([^`]+)`", row[modules_col]))
        bad = [p for p in patterns if not _PATTERN.match(p)]
        if not patterns or bad:
            raise ValueError(f"{where}: layer {row[layer_col]!r} needs module patterns in backticks "
                             f"(`a.b` or `a.b.*`), got {row[modules_col]!r}")
        layers.append(Layer(int(number_and_name.group(1)), number_and_name.group(2).strip(), patterns))
    return layers


def layers_of(module: str, layers: Iterable[Layer]) -> list[Layer]:
    return [layer for layer in layers if layer.covers(module)]


# --------------------------------------------------------------------------------------------------
# The import graph
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # internal: the module it resolves to; external: the name as written
    path: Path  # the importing file, relative to the repository
    line: int
    lazy: bool  # inside a function: runs when the function is called
    type_checking: bool  # under ``if TYPE_CHECKING:``: never runs
    internal: bool  # the target is (or claims to be) a module of af_train/ or kernels/

    def where(self) -> str:
        how = " (TYPE_CHECKING)" if self.type_checking else " (lazy)" if self.lazy else ""
        return f"{self.path}:{self.line}{how}"


@dataclass
class ImportGraph:
    modules: dict[str, Path]  # module name -> file, relative to the repository
    imports: list[Import]  # resolved internal imports and every external one
    unresolved: list[Import]  # internal imports of a module that does not exist

    def __repr__(self) -> str:  # (pytest prints fixtures' values in a failure)
        return f"ImportGraph({len(self.modules)} modules, {len(self.imports)} imports)"

    def executed(self) -> dict[str, list[Import]]:
        """Internal imports that run (at import time or when their function is called), by source."""
        edges: dict[str, list[Import]] = {m: [] for m in self.modules}
        for imp in self.imports:
            if imp.internal and not imp.type_checking and imp.target != imp.source:  # self: no cycle
                edges[imp.source].append(imp)
        return edges


def find_modules(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """``{"af_train.data.loader": Path("af_train/data/loader.py"), "af_train.data": .../__init__.py, ...}``."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root)
            parts = list(relative.with_suffix("").parts)
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = relative
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module")


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
    if level == 0:
        return name or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 > len(parts) - 1:
        raise ValueError(f"{module}: relative import beyond the top-level package")
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([name] if name else []))


def _is_internal(name: str, packages: Iterable[str]) -> bool:
    return name.split(".")[0] in packages


def read_imports(module: str, path: Path, source: str, modules: dict[str, Path],
                 packages: Iterable[str] = PACKAGES) -> tuple[list[Import], list[Import]]:
    """(resolved imports, unresolved internal imports) of one module's source."""
    tree = ast.parse(source, filename=str(path))
    is_package = path.name == "__init__.py"
    found: dict[tuple[str, int], Import] = {}
    unresolved: list[Import] = []

    def add(target: str, node: ast.AST, lazy: bool, type_checking: bool, known: bool = True) -> None:
        internal = _is_internal(target, packages)
        imp = Import(module, target, path, node.lineno, lazy, type_checking, internal)
        if internal and not known:
            unresolved.append(imp)
        else:
            found.setdefault((target, node.lineno), imp)  # `from m import a, b`: one edge

    def from_import(base: str, names: list[ast.alias], node: ast.AST, lazy: bool, type_checking: bool) -> None:
        if not _is_internal(base, packages):
            add(base, node, lazy, type_checking)
            return
        for alias in names:
            submodule = f"{base}.{alias.name}"
            target = submodule if alias.name != "*" and submodule in modules else base
            add(target, node, lazy, type_checking, known=target in modules)

    def visit(node: ast.AST, lazy: bool, type_checking: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lazy = True
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, lazy, True)
            for child in node.orelse:  # the else branch runs
                visit(child, lazy, type_checking)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, lazy, type_checking, known=alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node.level, node.module)
            from_import(base, node.names, node, lazy, type_checking)
        elif (isinstance(node, ast.Call) and _is_import_module(node.func) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            name = node.args[0].value
            if not name.startswith("."):
                add(name, node, lazy, type_checking, known=name in modules)
        for child in ast.iter_child_nodes(node):
            visit(child, lazy, type_checking)

    visit(tree, False, False)
    return list(found.values()), unresolved


def build_graph(root: Path, packages: Iterable[str] = PACKAGES) -> ImportGraph:
    packages = tuple(packages)
    modules = find_modules(root, packages)
    imports, unresolved = [], []
    for module, path in modules.items():
        resolved, missing = read_imports(module, path, (root / path).read_text(encoding="utf-8"), modules, packages)
        imports += resolved
        unresolved += missing
    return ImportGraph(modules, imports, unresolved)


def find_cycles(edges: dict[str, list[Import]]) -> list[list[Import]]:
    """One shortest cycle per strongly connected component of more than one module (Tarjan), as the
    imports that form it, starting from the component's first module in name order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for imp in edges.get(node, []):
            if imp.target not in index:
                connect(imp.target)
                low[node] = min(low[node], low[imp.target])
            elif imp.target in on_stack:
                low[node] = min(low[node], index[imp.target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(edges):
        if node not in index:
            connect(node)

    cycles = []
    for component in components:
        if len(component) < 2:
            continue
        members, start = set(component), min(component)
        # breadth-first from start through the component until an import leads back to start
        came_by: dict[str, Import] = {}
        frontier, seen = [start], {start}
        closing = None
        while frontier and closing is None:
            following = []
            for node in frontier:
                for imp in sorted(edges.get(node, []), key=lambda i: (i.target, i.line)):
                    if imp.target == start:
                        closing = imp
                        break
                    if imp.target in members and imp.target not in seen:
                        seen.add(imp.target)
                        came_by[imp.target] = imp
                        following.append(imp.target)
                if closing is not None:
                    break
            frontier = following
        path = [closing]
        while path[0].source != start:
            path.insert(0, came_by[path[0].source])
        cycles.append(path)
    return cycles


def describe_cycle(cycle: list[Import], edges: dict[str, list[Import]]) -> str:
    """The chain of modules, then each step with every import that makes it (all must go to cut it)."""
    chain = " -> ".join([cycle[0].source] + [imp.target for imp in cycle])
    steps = []
    for step in cycle:
        lines = [imp.where() for imp in edges[step.source] if imp.target == step.target]
        steps.append(f"      {step.source} imports {step.target} at {', '.join(lines)}")
    return f"  {chain}\n" + "\n".join(steps)


# --------------------------------------------------------------------------------------------------
# The checks (each returns one message per violation; empty when the tree is clean)
# --------------------------------------------------------------------------------------------------


def cycle_violations(graph: ImportGraph) -> list[str]:
    edges = graph.executed()
    return [describe_cycle(cycle, edges) for cycle in find_cycles(edges)]


def upward_violations(graph: ImportGraph, layers: list[Layer]) -> list[str]:
    problems = []
    for imp in graph.imports:
        if imp.target.split(".")[0] in ABOVE_EVERY_LAYER:
            problems.append(f"  {imp.where()}: {imp.source} imports {imp.target}; tools/ sits above every layer "
                            "(move what both need into af_train)")
        if not imp.internal:
            continue
        source, target = layers_of(imp.source, layers), layers_of(imp.target, layers)
        if len(source) != 1 or len(target) != 1:
            continue  # unplaced or ambiguous: reported by placement_violations
        if target[0].number > source[0].number:
            problems.append(f"  {imp.where()}: {imp.source} ({source[0]}) imports {imp.target} ({target[0]})")
    return problems


def kernel_violations(graph: ImportGraph) -> list[str]:
    return [f"  {imp.where()}: {imp.source} imports {imp.target}"
            for imp in graph.imports
            if imp.source.split(".")[0] == KERNELS and imp.target.split(".")[0] not in KERNELS_MAY_IMPORT]


def placement_violations(graph: ImportGraph, layers: list[Layer]) -> list[str]:
    problems = []
    for module, path in graph.modules.items():
        found = layers_of(module, layers)
        if not found:
            problems.append(f"  {module} ({path}) is in no row of the table: add it to its layer's row")
        elif len({layer.number for layer in found}) > 1:
            problems.append(f"  {module} ({path}) is covered by {', '.join(map(str, found))}: keep it in one row")
    return problems


def unresolved_violations(graph: ImportGraph) -> list[str]:
    return [f"  {imp.where()}: {imp.source} imports {imp.target}, which is no module of "
            f"{' or '.join(p + '/' for p in PACKAGES)}"
            for imp in graph.unresolved]


def all_violations(root: Path, doc: Path | None = None) -> dict[str, list[str]]:
    """Every check on the tree at ``root`` against its ARCHITECTURE.md, by check."""
    layers = parse_layers((doc or root / DOC_PATH).read_text(encoding="utf-8"))
    graph = build_graph(root)
    return {
        "import cycles": cycle_violations(graph),
        "upward imports": upward_violations(graph, layers),
        "kernels/ imports": kernel_violations(graph),
        "modules without a layer": placement_violations(graph, layers),
        "imports of missing modules": unresolved_violations(graph),
    }


# --------------------------------------------------------------------------------------------------
# The real tree
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return build_graph(REPO)


@pytest.fixture(scope="module")
def layers() -> list[Layer]:
    return parse_layers((REPO / DOC_PATH).read_text(encoding="utf-8"))


def test_layers_table_is_well_formed(layers):
    numbers = [layer.number for layer in layers]
    assert numbers == sorted(set(numbers)), f"{DOC_PATH}: layer numbers must be unique and increasing: {numbers}"
    patterns = [p for layer in layers for p in layer.patterns]
    repeated = sorted({p for p in patterns if patterns.count(p) > 1})
    assert not repeated, f"{DOC_PATH}: patterns in more than one row: {repeated}"
    kernels_layer = layers_of(KERNELS, layers)
    assert [layer.number for layer in kernels_layer] == [numbers[0]], \
        f"{DOC_PATH}: kernels/ must be the lowest layer (it is in {[str(layer) for layer in kernels_layer]})"
    elsewhere = [p for layer in layers if layer not in kernels_layer for p in layer.patterns
                 if p.split(".")[0] == KERNELS]
    assert not elsewhere, f"{DOC_PATH}: kernels modules outside the kernels layer: {elsewhere}"


def fail_on(problems: list[str], what: str) -> None:
    if problems:
        pytest.fail(f"{what}:\n" + "\n".join(problems), pytrace=False)


def test_no_import_cycles(graph):
    fail_on(cycle_violations(graph),
            "import cycles among af_train/kernels modules (lazy imports count, TYPE_CHECKING ones do not); cut "
            f"each one: move what both need into the lower module, or pass it in ({DOC_PATH}, Layers)")


def test_no_upward_imports(graph, layers):
    fail_on(upward_violations(graph, layers),
            f"imports into a higher layer ({DOC_PATH}, Layers: a module imports only its own layer and lower "
            "ones, lazily or not)")


def test_kernels_import_only_torch_triton_and_the_standard_library(graph):
    fail_on(kernel_violations(graph), "kernels/ may import only torch, triton, the standard library and kernels")


def test_every_module_has_exactly_one_layer(graph, layers):
    fail_on(placement_violations(graph, layers), f"modules the Layers table of {DOC_PATH} does not place")


def test_every_internal_import_names_an_existing_module(graph):
    fail_on(unresolved_violations(graph), "imports of af_train/kernels modules that do not exist")


def test_graph_sees_the_tree(graph):
    # guards against a graph that is silently empty (wrong root, every import dropped)
    assert {p.split(".")[0] for p in graph.modules} == set(PACKAGES)
    lazy_internal = [imp for imp in graph.imports if imp.internal and imp.lazy]
    assert any(imp.internal and not imp.lazy for imp in graph.imports) and lazy_internal


# --------------------------------------------------------------------------------------------------
# The checks themselves, on synthetic trees
# --------------------------------------------------------------------------------------------------

SYNTHETIC_DOC = """\
# Synthetic

## Layers

| layer | modules | holds |
|---|---|---|
| 0 kernels | `kernels.*` | kernels |
| 1 base | `af_train`, `af_train.base`, `af_train.pkg.*` | |
| 2 top | `af_train.top`, `af_train.other` | |

## Next section
| not | a layer |
"""


def write_tree(root: Path, files: dict[str, str], doc: str = SYNTHETIC_DOC) -> Path:
    for name, text in {"af_train/__init__.py": "", "kernels/__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    (root / DOC_PATH).parent.mkdir(parents=True, exist_ok=True)
    (root / DOC_PATH).write_text(doc, encoding="utf-8")
    return root


CLEAN_TREE = {
    "af_train/base.py": "import json\n",
    "af_train/pkg/__init__.py": "from af_train.pkg.sub import value\n",
    "af_train/pkg/sub.py": "from af_train import base\nvalue = 1\n",
    "af_train/top.py": "from af_train.pkg import sub\n\ndef late():\n    from af_train.other import thing\n",
    "af_train/other.py": "import torch\nfrom af_train.base import json\nthing = 2\n",
    "kernels/k.py": "import os\nimport torch\nimport triton.language as tl\nfrom kernels import k2\n",
    "kernels/k2.py": "from __future__ import annotations\n",
}


def test_parse_layers_reads_numbers_names_and_patterns():
    layers = parse_layers(SYNTHETIC_DOC)
    assert [(layer.number, layer.name) for layer in layers] == [(0, "kernels"), (1, "base"), (2, "top")]
    assert layers[1].patterns == ("af_train", "af_train.base", "af_train.pkg.*")
    assert layers[1].covers("af_train.pkg") and layers[1].covers("af_train.pkg.sub.deep")
    assert not layers[1].covers("af_train.top") and not layers[1].covers("af_train.pkgx")
    assert not layers[1].covers("af_train.base.sub")  # a plain name is that module only


@pytest.mark.parametrize("doc, message", [
    ("# no layers here\n", "no '## Layers' section"),
    ("## Layers\n\nText only.\n", "no table"),
    ("## Layers\n| level | modules |\n|---|---|\n| 0 a | `a` |\n", "'layer' and 'modules' columns"),
    ("## Layers\n| layer | modules |\n|---|---|\n| first | `a` |\n", "start with the layer number"),
    ("## Layers\n| layer | modules |\n|---|---|\n| 0 a | a, b |\n", "patterns in backticks"),
])
def test_parse_layers_refuses_a_malformed_table(doc, message):
    with pytest.raises(ValueError, match=message):
        parse_layers(doc)


def test_a_clean_synthetic_tree_passes_every_check(tmp_path):
    root = write_tree(tmp_path, CLEAN_TREE)
    violations = all_violations(root)
    assert len(violations) == 5 and not any(violations.values()), violations
    graph = build_graph(root)
    assert set(graph.modules) == {"af_train", "af_train.base", "af_train.pkg", "af_train.pkg.sub", "af_train.top",
                                  "af_train.other", "kernels", "kernels.k", "kernels.k2"}


def test_relative_and_submodule_imports_resolve(tmp_path):
    root = write_tree(tmp_path, {**CLEAN_TREE,
                                 "af_train/pkg/__init__.py": "from .sub import value\n",
                                 "af_train/pkg/sub.py": "from . import extra\nfrom .. import base\nvalue = 1\n",
                                 "af_train/pkg/extra.py": "from ..base import json\nfrom .sub import value\n",
                                 "af_train/top.py": "import af_train.pkg.sub\nfrom af_train.pkg import extra, value\n"})
    graph = build_graph(root)
    edges = {(imp.source, imp.target, imp.line) for imp in graph.imports if imp.internal}
    assert {("af_train.pkg", "af_train.pkg.sub", 1),
            ("af_train.pkg.sub", "af_train.pkg.extra", 1), ("af_train.pkg.sub", "af_train.base", 2),
            ("af_train.pkg.extra", "af_train.base", 1), ("af_train.pkg.extra", "af_train.pkg.sub", 2),
            ("af_train.top", "af_train.pkg.sub", 1), ("af_train.top", "af_train.pkg.extra", 2),
            ("af_train.top", "af_train.pkg", 2)} <= edges
    assert not graph.unresolved


def test_a_cycle_through_a_lazy_import_is_found_with_its_path(tmp_path):
    root = write_tree(tmp_path, {**CLEAN_TREE, "af_train/other.py": """\
        import torch


        def late():
            from af_train import top
        """})
    cycles = find_cycles(build_graph(root).executed())
    assert [[(imp.source, imp.target, imp.line, imp.lazy) for imp in cycle] for cycle in cycles] == [
        [("af_train.other", "af_train.top", 5, True), ("af_train.top", "af_train.other", 4, True)]]
    message = all_violations(root)["import cycles"]
    assert len(message) == 1
    assert "af_train.other -> af_train.top -> af_train.other" in message[0]
    assert "af_train/other.py:5 (lazy)" in message[0] and "af_train/top.py:4 (lazy)" in message[0]


def test_a_longer_cycle_is_printed_in_import_order(tmp_path):
    root = write_tree(tmp_path, {**CLEAN_TREE, "af_train/base.py": "import json\nimport af_train.pkg\n"})
    (cycle,) = find_cycles(build_graph(root).executed())
    assert [imp.source for imp in cycle] == ["af_train.base", "af_train.pkg", "af_train.pkg.sub"]
    assert cycle[-1].target == "af_train.base"


def test_type_checking_imports_make_no_cycle_but_count_for_the_layers(tmp_path):
    root = write_tree(tmp_path, {**CLEAN_TREE, "af_train/base.py": """\
        from typing import TYPE_CHECKING
        import typing

        if TYPE_CHECKING:
            from af_train.top import late
        if typing.TYPE_CHECKING:
            import af_train.pkg
        else:
            import json
        """})
    violations = all_violations(root)
    assert violations["import cycles"] == []
    assert violations["upward imports"] == [
        "  af_train/base.py:5 (TYPE_CHECKING): af_train.base (layer 1 base) imports af_train.top (layer 2 top)"]
    imports = {imp.target: imp for imp in build_graph(root).imports if imp.source == "af_train.base"}
    assert imports["af_train.pkg"].type_checking and not imports["json"].type_checking


def test_an_upward_import_names_file_line_and_layers(tmp_path):
    root = write_tree(tmp_path, {**CLEAN_TREE, "af_train/pkg/sub.py": """\
        value = 1


        class Holder:
            import af_train.top as top_module  # runs at import time: not lazy
        """})
    assert all_violations(root)["upward imports"] == [
        "  af_train/pkg/sub.py:5: af_train.pkg.sub (layer 1 base) imports af_train.top (layer 2 top)"]


def test_tools_may_not_be_imported_from_any_layer(tmp_path):
    root = write_tree(tmp_path, {**CLEAN_TREE, "af_train/top.py": "def late():\n    import af_train_tools.demo\n"})
    (problem,) = all_violations(root)["upward imports"]
    assert problem.startswith("  af_train/top.py:2 (lazy): af_train.top imports af_train_tools.demo; tools/ sits")


def test_kernels_may_import_only_torch_triton_the_standard_library_and_themselves(tmp_path):
    root = write_tree(tmp_path, {**CLEAN_TREE, "kernels/k2.py": """\
        import math
        import numpy as np
        from kernels import k


        def helper():
            from af_train.base import json
            import importlib
            return importlib.import_module("scipy.special")
        """})
    violations = all_violations(root)
    assert violations["kernels/ imports"] == [
        "  kernels/k2.py:2: kernels.k2 imports numpy",
        "  kernels/k2.py:7 (lazy): kernels.k2 imports af_train.base",
        "  kernels/k2.py:9 (lazy): kernels.k2 imports scipy.special",
    ]
    assert violations["upward imports"] == [
        "  kernels/k2.py:7 (lazy): kernels.k2 (layer 0 kernels) imports af_train.base (layer 1 base)"]


def test_a_module_without_a_row_is_reported(tmp_path):
    root = write_tree(tmp_path, {**CLEAN_TREE, "af_train/newcomer.py": "", "af_train/pkg/deeper/leaf.py": ""})
    assert all_violations(root)["modules without a layer"] == [
        "  af_train.newcomer (af_train/newcomer.py) is in no row of the table: add it to its layer's row"]


def test_a_module_in_two_layers_is_reported(tmp_path):
    doc = SYNTHETIC_DOC.replace("`af_train.top`, ", "`af_train.top`, `af_train.base`, ")
    root = write_tree(tmp_path, CLEAN_TREE, doc)
    assert all_violations(root)["modules without a layer"] == [
        "  af_train.base (af_train/base.py) is covered by layer 1 base, layer 2 top: keep it in one row"]


def test_an_import_of_a_missing_module_is_reported(tmp_path):
    root = write_tree(tmp_path, {**CLEAN_TREE, "af_train/top.py": """\
        from af_train.pkg import sub, gone_name  # an attribute of af_train.pkg: not checked
        import af_train.moved


        def late():
            from af_train.renamed import thing
        """})
    assert all_violations(root)["imports of missing modules"] == [
        "  af_train/top.py:2: af_train.top imports af_train.moved, which is no module of af_train/ or kernels/",
        "  af_train/top.py:6 (lazy): af_train.top imports af_train.renamed, which is no module of af_train/ or "
        "kernels/",
    ]


if __name__ == "__main__":
    tree = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else REPO
    doc_arg = Path(sys.argv[2]).resolve() if len(sys.argv) > 2 else None
    found = all_violations(tree, doc_arg)
    for check, messages in found.items():
        print(f"{check}: {len(messages)}")
        for message in messages:
            print(message)
    sys.exit(1 if any(found.values()) else 0)
