"""The package's import graph: no cycles, no private name across modules, no file over 400 lines.

Built statically with :mod:`ast` from every ``import`` statement in ``lightning_probes/`` —
module level, inside functions (lazy imports) and under ``if TYPE_CHECKING:`` alike, since
each of them couples two modules. An edge goes to the module an import names (``from a.b
import c`` names ``a.b.c`` when that is a module, else ``a.b``); the parent packages Python
also initialises are not edges, so a package ``__init__`` re-exporting its submodules is no
cycle by itself.

Private names (``_x``, not ``__dunder__``) of a ``lightning_probes`` module may not be used
from another file: neither imported (``from lightning_probes.m import _x``) nor reached as an
attribute of an imported module (``m._x``, ``setattr(m, "_x", ...)``), in the package, the
tests, the benchmarks and the examples.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "lightning_probes"
MAX_LINES = 400
SCANNED = ("lightning_probes", "tests", "benchmarks", "examples")


def module_name(path: Path) -> str:
    """Dotted module name of a file under the repository root."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the package."""
    return {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


MODULES = package_modules()


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def resolve_from(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """Absolute module named by a (possibly relative) ``from ... import``."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(path: Path) -> Iterator[tuple[str, str | None, ast.AST]]:
    """``(module, imported name or None, node)`` for every import statement in a file."""
    tree = ast.parse(path.read_text(), str(path))
    importer = module_name(path) if path.is_relative_to(ROOT / PACKAGE) else ""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node
        elif isinstance(node, ast.ImportFrom):
            source = resolve_from(node, importer, path.name == "__init__.py")
            for alias in node.names:
                yield source, alias.name, node


def import_graph() -> dict[str, set[str]]:
    """Edges ``importer -> imported`` between the package's modules."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, imported, _ in imports(path):
            target = f"{module}.{imported}" if imported else module
            target = target if target in MODULES else module
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a closed path) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [closed_path(graph, set(c), c[0]) for c in components]


def closed_path(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """A shortest path ``start -> ... -> start`` inside a strongly connected component."""
    parents: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while (parent := parents[path[-1]]) is not None:
                        path.append(parent)
                    return [*reversed(path), start]
                if w not in parents:
                    parents[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"{start} is not on a cycle")  # pragma: no cover


def private_uses(path: Path) -> Iterator[str]:
    """``"<module>._<name>"`` for every private name of another package module ``path`` uses."""
    own = module_name(path) if path.is_relative_to(ROOT / PACKAGE) else None
    tree = ast.parse(path.read_text(), str(path))
    bindings: dict[str, list[tuple[int, str]]] = {}  # local name -> [(line, package module)]
    for module, imported, node in imports(path):
        if module != PACKAGE and not module.startswith(PACKAGE + "."):
            continue
        line = node.lineno  # type: ignore[attr-defined]
        aliases = node.names  # type: ignore[attr-defined]
        if imported is None:
            alias = next(a for a in aliases if a.name == module)
            local = alias.asname or PACKAGE
            bindings.setdefault(local, []).append((line, module if alias.asname else PACKAGE))
        elif f"{module}.{imported}" in MODULES:
            alias = next(a for a in aliases if a.name == imported)
            bindings.setdefault(alias.asname or imported, []).append((line, f"{module}.{imported}"))
        elif is_private(imported) and module != own:
            yield f"{module}.{imported}"
    for node in ast.walk(tree):
        target: str | None = None
        if isinstance(node, ast.Attribute):
            target = dotted(node, bound_at(bindings, node.lineno))
        elif (
            isinstance(node, ast.Call)
            and callable_name(node.func) in ("setattr", "getattr", "delattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            base = dotted(node.args[0], bound_at(bindings, node.lineno))
            target = f"{base}.{node.args[1].value}" if base else None
        if target is None:
            continue
        module, _, name = target.rpartition(".")
        if module in MODULES and module != own and is_private(name):
            yield target


def bound_at(bindings: dict[str, list[tuple[int, str]]], line: int) -> dict[str, str]:
    """Names bound to package modules at ``line``: the latest import above it (lazy imports
    inside functions rebind a name in that function only; the nearest one above is the one)."""
    out = {}
    for local, lines in bindings.items():
        above = [module for at, module in sorted(lines) if at <= line]
        if above:
            out[local] = above[-1]
    return out


def callable_name(func: ast.expr) -> str | None:
    """``setattr`` for ``setattr`` and ``monkeypatch.setattr``."""
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def dotted(node: ast.expr, bound: dict[str, str]) -> str | None:
    """``a.b.c`` for an attribute chain on a name bound to a package module (else ``None``).

    The chain is cut after the first component that is not a module (``m._x.y`` -> ``m._x``).
    """
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in bound:
        return None
    current = bound[node.id]
    for part in reversed(parts):
        current = f"{current}.{part}"
        if current not in MODULES:
            return current
    return current


def violations() -> set[str]:
    found = set()
    for cycle in cycles(import_graph()):
        found.add("cycle: " + " -> ".join(cycle))
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for target in private_uses(path):
                verb = "imports" if target in imported_names(path) else "uses"
                found.add(f"private: {rel} {verb} {target}")
    for path in MODULES.values():
        if len(path.read_text().splitlines()) > MAX_LINES:
            found.add(f"long: {path.relative_to(ROOT).as_posix()}")
    return found


def imported_names(path: Path) -> set[str]:
    return {f"{m}.{n}" for m, n, _ in imports(path) if n is not None}


def test_import_graph_has_no_violations():
    found = sorted(violations())
    assert not found, "Import-graph violations (cycles, private names, long files):\n" + "\n".join(
        found
    )


def test_checker_finds_cycles_and_private_names(tmp_path):
    """The checker itself, on a small graph and on a file using private names."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import lightning_probes.core.kernels.stats as st\n"
        "from lightning_probes.functional import linalg\n"
        "from lightning_probes.core.evaluation import _hidden, __name__ as n\n"
        "def f(monkeypatch):\n"
        "    from lightning_probes.functional.alignment import _check_kernel\n"
        "    monkeypatch.setattr(st, '_secret', None)\n"
        "    return linalg._fill, st.public\n"
    )
    assert set(private_uses(sample)) == {
        "lightning_probes.core.evaluation._hidden",
        "lightning_probes.functional.alignment._check_kernel",
        "lightning_probes.core.kernels.stats._secret",
        "lightning_probes.functional.linalg._fill",
    }
