"""Imports run in one direction: no module of opt_ds or conversion imports, directly or through others, a
module that imports it back, and nothing in opt_ds imports conversion.

The walk is static (the source's syntax tree), so it sees every import statement wherever it stands: at the
top of a module, inside a function (a deferred import is still a dependency, only hidden), and under
`if TYPE_CHECKING:` (a type-only import still means the module needs to know the other). Importing a
package's submodule does not count as an edge to the package's __init__.
"""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("opt_ds", "conversion")
KNOWN_CYCLES = []


def modules() -> dict:
    """{dotted name: (path, is a package __init__)} of every module in PACKAGES."""
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def imported(name: str, is_package: bool, node, known: dict) -> list:
    """The modules of `known` that the import statement `node` in module `name` loads."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = name.split(".") if is_package else name.split(".")[:-1]
            here = here[:len(here) - (node.level - 1)]
            base = ".".join(here + ([node.module] if node.module else []))
        # `from package import submodule` loads the submodule; `from module import name` loads the module
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    result = []
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            result.append(target)
    return result


def import_graph() -> dict:
    known = modules()
    graph = {}
    for name, (path, is_package) in known.items():
        graph[name] = {target for node in ast.walk(ast.parse(path.read_text(), str(path)))
                       if isinstance(node, (ast.Import, ast.ImportFrom))
                       for target in imported(name, is_package, node, known)}
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(component: list, graph: dict) -> str:
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(component)))}" for m in component)


def test_the_walk_sees_deferred_and_relative_imports():
    """The walker itself: a cycle held up by a function-level import is found."""
    known = {"p": None, "p.a": None, "p.b": None}
    tree = ast.parse("from p import b\ndef f():\n    from . import a\n    import p.b as c\n")
    found = [imported("p.a", False, node, known) for node in ast.walk(tree)
             if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert sorted(sum(found, [])) == ["p.b", "p.b"]
    assert cycles({"p.a": {"p.b"}, "p.b": {"p.a"}, "p": set()}) == [["p.a", "p.b"]]


def test_no_import_cycles():
    graph = import_graph()
    found = [c for c in cycles(graph) if c not in KNOWN_CYCLES]
    assert not found, "import cycles: " + " | ".join(describe(c, graph) for c in found)


def test_opt_ds_does_not_import_conversion():
    graph = import_graph()
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.split(".")[0] == "opt_ds"
                   for t in targets if t.split(".")[0] == "conversion")
    assert not wrong, "opt_ds must not import conversion/: " + ", ".join(wrong)
