"""The structure figures issue 18 asks for, measured on a source tree (no imports of the package are run).

- environment variables the package reads (``os.environ[...]``, ``os.environ.get``, ``os.getenv``), by name;
- imports of ``cortexflow.models`` from ``cortexflow/backends/`` and ``cortexflow/kernels/``;
- ``token_*`` twin modules;
- lines of the CLI (``cli.py`` or the ``cli/`` package);
- import circles: strongly connected components of more than one module in the graph of ``cortexflow``
  imports, once for module-level imports (including ``if TYPE_CHECKING:`` blocks) and once counting
  imports inside functions too.

    python3 benchmarks/structure_metrics.py [--root .] [--json out.json]
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(node: ast.AST, current: str, is_package: bool, modules: set[str]) -> set[str]:
    """The ``cortexflow`` modules an import statement names (``from a import b`` counts ``a.b`` when it is a module)."""
    names: set[str] = set()
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = current.split(".") if is_package else current.split(".")[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        # ``from package import module`` depends on the module (the package's __init__ runs first, but a
        # submodule importing names of its own package that way is no circle); other names depend on ``base``.
        names = {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    found = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name.startswith("cortexflow") and name != "cortexflow":
            found.add(name)
    return found


def import_graph(root: Path, function_level: bool) -> dict[str, set[str]]:
    """``module -> modules it imports`` for every module under ``root/cortexflow``."""
    files = {module_name(p, root): p for p in sorted((root / "cortexflow").rglob("*.py"))}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        nodes = ast.walk(tree) if function_level else _module_level(tree.body)
        edges = set()
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= imported_modules(node, name, is_package, modules)
        edges.discard(name)
        graph[name] = edges
    return graph


def _module_level(body):
    """Statements at module level, descending into ``if``/``try`` blocks (TYPE_CHECKING, optional imports)."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _module_level(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _module_level(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def environment_reads(root: Path) -> dict[str, list[str]]:
    """``variable name (or '<dynamic>') -> files`` for every read of the process environment in the package."""
    reads: dict[str, list[str]] = {}
    for path in sorted((root / "cortexflow").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
                    (node.func.attr == "get" and _is_environ(node.func.value))
                    or (node.func.attr == "getenv" and _is_name(node.func.value, "os"))):
                key = node.args[0] if node.args else None
            elif isinstance(node, ast.Subscript) and _is_environ(node.value) and isinstance(node.ctx, ast.Load):
                key = node.slice
            else:
                continue
            name = key.value if isinstance(key, ast.Constant) else "<dynamic>"
            reads.setdefault(name, []).append(str(path.relative_to(root)))
    return {k: sorted(set(v)) for k, v in sorted(reads.items())}


def _is_environ(node) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" and _is_name(node.value, "os")


def _is_name(node, name) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def measure(root: Path) -> dict:
    graph = import_graph(root, function_level=False)
    strict = import_graph(root, function_level=True)
    models_from_fast = sorted(f"{m} -> {t}" for m, ts in strict.items() for t in ts
                              if m.startswith(("cortexflow.backends", "cortexflow.kernels"))
                              and t.startswith("cortexflow.models"))
    cli = root / "cortexflow" / "cli"
    cli_files = sorted(cli.rglob("*.py")) if cli.is_dir() else [root / "cortexflow" / "cli.py"]
    cli_lines = {str(p.relative_to(root)): len(p.read_text().splitlines()) for p in cli_files}
    return {
        "environment_variables_read": environment_reads(root),
        "backends_kernels_importing_models": models_from_fast,
        "token_twin_modules": sorted(str(p.relative_to(root)) for p in (root / "cortexflow").rglob("token_*.py")),
        "cli_lines": cli_lines,
        "cli_lines_total": sum(cli_lines.values()),
        "import_circles_module_level": cycles(graph),
        "import_circles_with_function_imports": cycles(strict),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="repository root")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    result = measure(args.root.resolve())
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
