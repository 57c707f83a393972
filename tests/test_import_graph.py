"""The package's import graph, read statically with `ast`: no circles, no private names across modules, and a
light command-line entry point.

Imports are split three ways: *module-level* (run when the module is imported), *type-only* (under
`if TYPE_CHECKING:`, module-level but never run) and *function-level* (run when the function is called). A
circle among module-level and type-only imports means two modules are really one; a function-level import is
the deliberate way to defer a heavy dependency, and it must not close a circle either. An edge goes to the module named by the
import (`from mmbalance.a.b import c` depends on `mmbalance.a.b`, or on `mmbalance.a.b.c` when that is a module).

`python tests/test_import_graph.py` prints the summary (the test prints it too, visible with `pytest -s`).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "mmbalance"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# third-party packages that must not load when `python -m mmbalance` or `mmbalance report` starts
HEAVY = {"torch", "torchvision", "torchaudio", "timm", "transformers", "fvcore", "torchmetrics"}


@dataclass
class Import:
    source: str  # the importing module
    target: str  # the imported module (ours or third-party, dotted)
    names: list[str]  # names taken from it (`from target import a, b`); empty for `import target`
    line: int
    level: str  # "module" | "type" | "function"


@dataclass
class Graph:
    modules: dict[str, Path]
    imports: list[Import] = field(default_factory=list)
    private_uses: list[str] = field(default_factory=list)  # "module:line uses other._name"

    def edges(self, *levels: str) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {m: set() for m in self.modules}
        for imp in self.imports:
            if imp.level in levels and imp.target in self.modules and imp.target != imp.source:
                out[imp.source].add(imp.target)
        return out


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _walk(statements: list[ast.stmt], level: str):
    """(statement, level) for every import statement, with the level it runs at."""
    for stmt in statements:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            yield stmt, level
            continue
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for node in ast.walk(stmt):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield node, "function"
            continue
        if isinstance(stmt, ast.If) and _is_type_checking(stmt.test):
            yield from _walk(stmt.body, "type")
            yield from _walk(stmt.orelse, level)
            continue
        if isinstance(stmt, ast.ClassDef):
            yield from _walk(stmt.body, level)
            continue
        for name in ("body", "orelse", "finalbody", "handlers"):  # if / try / with / for at module level
            children = getattr(stmt, name, None)
            if children:
                yield from _walk([c for c in children if isinstance(c, ast.stmt)] +
                                 [s for h in children if isinstance(h, ast.ExceptHandler) for s in h.body], level)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def build_graph() -> Graph:
    modules = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}
    graph = Graph(modules)
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        module_aliases: dict[str, str] = {}  # local name -> one of our modules, for `alias._name` uses
        for node, level in _walk(tree.body, "module"):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    graph.imports.append(Import(module, alias.name, [], node.lineno, level))
                    if alias.name in modules:
                        module_aliases[alias.asname or alias.name.split(".")[0]] = alias.name
                continue
            target = _absolute(module, node, is_package)
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            plain = [n for n in names if f"{target}.{n}" not in modules]
            for sub in submodules:
                graph.imports.append(Import(module, sub, [], node.lineno, level))
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    module_aliases[alias.asname or alias.name] = f"{target}.{alias.name}"
            if plain or not submodules:
                graph.imports.append(Import(module, target, plain, node.lineno, level))
            if target in modules and target != module:
                for n in plain:
                    if _private(n):
                        graph.private_uses.append(f"{module}:{node.lineno} imports {target}.{n}")
        for node in ast.walk(tree):  # `import mmbalance.x as x; x._helper` is the same thing
            if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in module_aliases and module_aliases[node.value.id] != module):
                graph.private_uses.append(f"{module}:{node.lineno} uses {module_aliases[node.value.id]}.{node.attr}")
    return graph


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (or a self-loop), each as one cycle path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan; the graph is small, recursion is fine
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
            if len(component) > 1 or v in edges[v]:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [_cycle_path(c, edges) for c in components]


def _cycle_path(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One concrete cycle a -> b -> ... -> a inside a strongly connected component."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth-first back to the start
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return component


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for w in edges[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def summary(graph: Graph) -> str:
    runtime, typed, deferred = graph.edges("module"), graph.edges("type"), graph.edges("function")
    count = lambda e: sum(len(v) for v in e.values())  # noqa: E731
    lines = [
        f"{len(graph.modules)} modules under src/{PACKAGE}; internal import edges: {count(runtime)} module-level, "
        f"{count(typed)} type-only, {count(deferred)} function-level",
        "cycles among module-level + type-only imports: "
        + (", ".join(" -> ".join(c) for c in find_cycles(graph.edges("module", "type"))) or "none"),
        "cycles once function-level imports are added: "
        + (", ".join(" -> ".join(c) for c in find_cycles(graph.edges("module", "type", "function"))) or "none"),
        "private names imported across modules: " + (", ".join(graph.private_uses) or "none"),
        "package dependencies (module-level):",
    ]
    packages: dict[str, set[str]] = defaultdict(set)

    def package(m: str) -> str:
        parts = m.split(".")
        return ".".join(parts[:2]) if len(parts) > 1 else m

    for source, targets in runtime.items():
        for t in targets:
            if package(t) != package(source):
                packages[package(source)].add(package(t))
    for source in sorted({package(m) for m in graph.modules}):
        deps = sorted(packages.get(source, ()))
        lines.append(f"  {source} -> {', '.join(d.removeprefix(PACKAGE + '.') for d in deps) or '(nothing of ours)'}")
    return "\n".join(lines)


# ---- the tests ----

GRAPH = build_graph()


def test_every_module_parses_and_the_graph_is_not_empty():
    assert f"{PACKAGE}.cli" in GRAPH.modules and f"{PACKAGE}.engine.trainer" in GRAPH.modules
    assert any(i.target.startswith(PACKAGE) for i in GRAPH.imports)


def test_no_cycle_among_module_level_imports(record_property):
    print("\n" + summary(GRAPH))
    record_property("import_graph", summary(GRAPH))
    cycles = find_cycles(GRAPH.edges("module", "type"))
    assert not cycles, "import cycles (module-level and TYPE_CHECKING imports):\n" + "\n".join(
        "  " + " -> ".join(c) for c in cycles)


def test_no_cycle_even_through_function_level_imports():
    """A deferred import keeps a heavy library out of start-up; it is no licence for two modules to need each other."""
    cycles = find_cycles(GRAPH.edges("module", "type", "function"))
    assert not cycles, "import cycles through function-level imports:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_no_module_imports_a_private_name_of_another():
    assert not GRAPH.private_uses, "private names used across modules (make them public or move them into a " \
                                   "module both import):\n" + "\n".join("  " + p for p in GRAPH.private_uses)


def test_every_internal_import_names_an_existing_module():
    missing = sorted({f"{i.source}:{i.line} -> {i.target}" for i in GRAPH.imports
                      if i.target.split(".")[0] == PACKAGE and i.target not in GRAPH.modules})
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def test_the_command_line_entry_point_loads_no_heavy_library():
    """`python -m mmbalance ...` parses its arguments and composes the config before torch loads."""
    runtime = GRAPH.edges("module")
    for module in GRAPH.modules:  # importing a.b.c runs a/__init__ and a/b/__init__ first
        parts = module.split(".")
        runtime[module] |= {".".join(parts[:i]) for i in range(1, len(parts))} & set(GRAPH.modules)
    for entry in (f"{PACKAGE}.cli", f"{PACKAGE}.__main__"):
        loaded = reachable(runtime, entry)
        heavy = sorted({f"{i.source} imports {i.target}" for i in GRAPH.imports
                        if i.level == "module" and i.source in loaded and i.target.split(".")[0] in HEAVY})
        assert not heavy, f"{entry} loads heavy libraries at import:\n" + "\n".join(heavy)
    code = f"import sys, {PACKAGE}.cli; sys.exit(sorted(HEAVY & set(sys.modules)) or 0)".replace("HEAVY", repr(HEAVY))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"importing {PACKAGE}.cli loaded {done.stderr.strip() or done.stdout.strip()}"


def test_the_graph_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(edges) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


if __name__ == "__main__":
    print(summary(GRAPH))
    sys.exit(0)
