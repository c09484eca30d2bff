"""The import graph of `vmrnn`, read from the source with `ast` (nothing is imported).

Every `import` / `from ... import` of a vmrnn module counts, at module level and inside functions alike: a
cycle through a function-local import is still two modules that each need the other. `from vmrnn.x import
name` is an edge to the module vmrnn.x.name when that is a module, else to vmrnn.x; a package's
`__init__` is a node of its own. Imports under `if TYPE_CHECKING:` never run and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vmrnn"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST, module_level_only: bool = False):
    """Import statements, skipping `if TYPE_CHECKING:` bodies (and function bodies when asked)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        stack.extend(ast.iter_child_nodes(node))


def _owning_module(name: str) -> str | None:
    """`name` if it is a vmrnn module, else its nearest enclosing one (vmrnn.x.attr -> vmrnn.x)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The vmrnn modules (and third-party top-level names, prefixed '!') one import statement needs."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
        return [_owning_module(n) or "!" + n.split(".")[0] for n in names]
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    if not (base == "vmrnn" or base.startswith("vmrnn.")):
        return ["!" + base.split(".")[0]]
    out = []
    for alias in node.names:
        full = f"{base}.{alias.name}"
        target = full if full in MODULES else _owning_module(base)
        if target:
            out.append(target)
    return out


def import_graph(module_level_only: bool = False) -> dict[str, set[str]]:
    """{module: modules and '!third_party' names it imports}; self-imports dropped."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = set()
        for node in _import_nodes(tree, module_level_only):
            edges.update(t for t in _targets(module, node) if t != module)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle per strongly connected component of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(t for t in graph[root] if t in graph)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(t for t in graph[child] if t in graph))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return [_shortest_cycle(graph, c) for c in components]


def _shortest_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth-first inside the component, back to `start`
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    return paths[node] + [start]
                if child not in paths:
                    paths[child] = paths[node] + [child]
                    nxt.append(child)
        frontier = nxt
    return sorted(component)


def test_the_graph_sees_module_level_function_local_and_from_imports():
    graph = import_graph()
    assert "vmrnn.tracking.uris" in graph["vmrnn.train.config"]  # module level: from vmrnn.tracking.uris import ...
    assert "vmrnn.bench" in graph["vmrnn.cli.bench"]  # function-local
    assert "vmrnn.tune.defaults" in graph["vmrnn.tune.scheduler"]  # from vmrnn.tune import defaults
    assert "vmrnn.models" in graph["vmrnn.train.loop"]  # from vmrnn.models import build_model (a name)
    assert "vmrnn.bench" not in import_graph(module_level_only=True)["vmrnn.cli.bench"]


def test_cycle_finder_reports_each_cycle():
    graph = {"a": {"b"}, "b": {"c", "!torch"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert sorted(cycles(graph)) == [["a", "b", "c", "a"], ["d", "e", "d"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def _top_level_names(module: str) -> set[str]:
    """Names a module defines or imports at its top level (what `from module import name` can take)."""
    names = set()
    for node in ast.parse(MODULES[module].read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.If, ast.Try)):  # e.g. a fallback definition
            names.update(n.name for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))
            names.update(
                t.id for n in ast.walk(node) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)
            )  # e.g. HAS_X = True / False
    return names


def test_every_vmrnn_import_names_something_that_exists():
    """A moved or deleted module leaves no import of it behind, at module level or inside a function."""
    stale = []
    for module, path in MODULES.items():
        for node in _import_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                missing = [a.name for a in node.names if a.name.startswith("vmrnn") and a.name not in MODULES]
            elif node.level or not (node.module or "").startswith("vmrnn"):
                continue
            elif node.module not in MODULES:
                missing = [node.module]
            else:
                defined = _top_level_names(node.module)
                missing = [
                    f"{node.module}.{a.name}"
                    for a in node.names
                    if a.name != "*" and f"{node.module}.{a.name}" not in MODULES and a.name not in defined
                ]
            stale += [(module, node.lineno, name) for name in missing]
    assert not stale, "imports of vmrnn names that do not exist:\n" + "\n".join(
        f"{module} (line {line}): {name}" for module, line, name in sorted(stale)
    )


def test_no_import_cycle_in_the_package():
    found = cycles(import_graph())
    assert not found, "import cycles in vmrnn:\n" + "\n".join(" -> ".join(c) for c in found)


def test_only_mlflow_modules_import_mlflow_when_imported():
    """Importing a module outside vmrnn.tracking never imports MLflow (through any chain of module-level
    imports); the tracking modules themselves defer it to the functions that talk to MLflow."""
    graph = import_graph(module_level_only=True)
    bad = []
    for module in graph:
        seen, todo = {module}, [module]
        while todo:
            for target in graph[todo.pop()]:
                if target not in seen:
                    seen.add(target)
                    if target in graph:
                        todo.append(target)
        if "!mlflow" in seen:
            bad.append(module)
    assert not bad, f"these modules import mlflow when imported: {sorted(bad)}"
