"""Imports run one way: face (CLI, API) -> serving/tools -> engine -> processing, checkpoints, models -> op
interface (``cortexflow/ops.py``) <- backends -> kernels. Every module under ``cortexflow/`` is parsed with
``ast`` (nothing is imported); an import of ``a.b.c`` also counts as importing the packages ``a.b`` (whose
``__init__`` runs first) unless the importer lives inside them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "cortexflow"

#: Module-level cycles left (none).
PENDING_CYCLES: list[set[str]] = []
#: Function-level (lazy-import) cycles, pending: the onnx backend reads bundles through ``cortexflow.onnx``, whose
#: ``verify`` module builds that backend back.
PENDING_LAZY_CYCLES = [{"cortexflow.backends.onnx_backend", "cortexflow.encoders", "cortexflow.onnx",
                        "cortexflow.onnx.verify"}]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The cortexflow modules an import statement names (``from a import b`` names ``a.b`` when that is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.startswith("cortexflow")]
    base = node.module or ""
    if node.level:
        package = importer.split(".")
        if not MODULES[importer].name == "__init__.py":
            package = package[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    if not base.startswith("cortexflow"):
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _imports(module: str, function_level: bool) -> set[str]:
    """What ``module`` imports at module level (``if TYPE_CHECKING:`` blocks included); with ``function_level``,
    inside functions too. Ancestor packages of each target count, except those containing ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    found: set[str] = set()

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)) and (function_level or not in_function):
                found.update(_resolve(module, child))
            visit(child, nested)

    visit(tree, False)
    targets = set()
    for name in found:
        parts = name.split(".")
        for n in range(2, len(parts) + 1):
            target = ".".join(parts[:n])
            if target in MODULES and target != module and not module.startswith(target + "."):
                targets.add(target)
    return targets


def _graph(function_level: bool) -> dict[str, set[str]]:
    return {m: _imports(m, function_level) for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return components


def test_no_module_level_import_cycles():
    cycles = [c for c in _cycles(_graph(function_level=False)) if c not in PENDING_CYCLES]
    assert not cycles, f"import cycles: {[sorted(c) for c in cycles]}"


@pytest.mark.parametrize("layer", ["cortexflow.backends", "cortexflow.kernels"])
def test_backends_and_kernels_never_import_models(layer):
    graph = _graph(function_level=True)
    bad = {m: sorted(t for t in targets if t.startswith("cortexflow.models"))
           for m, targets in graph.items() if m.startswith(layer)}
    assert not {m: t for m, t in bad.items() if t}


def test_models_import_no_layer_above_them():
    above = ("cortexflow.backends", "cortexflow.engine", "cortexflow.decoding_engine", "cortexflow.history_engine",
             "cortexflow.serving", "cortexflow.tools", "cortexflow.cli", "cortexflow.checkpoints", "cortexflow.factory",
             "cortexflow.families", "cortexflow.demo")
    graph = _graph(function_level=True)
    bad = {m: sorted(t for t in targets if t.startswith(above)) for m, targets in graph.items()
           if m.startswith("cortexflow.models")}
    assert not {m: t for m, t in bad.items() if t}


def test_the_op_interface_depends_on_neither_models_nor_backends():
    assert not {t for t in _imports("cortexflow.ops", True) if t.startswith(("cortexflow.models", "cortexflow.backends"))}


def test_no_function_level_cycles_but_the_pending_one():
    """Function-level imports (lazy ones) included: no cycle anywhere but the listed pending one."""
    cycles = [sorted(c) for c in _cycles(_graph(function_level=True)) if c not in PENDING_LAZY_CYCLES]
    assert not cycles
