"""The tree's shape: no import cycles between forge's modules, no mixin stubs, a docstring each.

Read from the source with ``ast`` (nothing is imported). The cycle check counts every import a
module makes: those it runs when it is imported (module and class level) and those inside its
functions (a deferral for start-up is still a dependency: the module cannot work without the
other); one under ``if TYPE_CHECKING:`` is for the type checker only and does not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

FORGE = Path(__file__).resolve().parent.parent / "forge"


def module_name(path: Path) -> str:
    """``forge/a/b.py`` -> ``forge.a.b``; ``forge/a/__init__.py`` -> ``forge.a``."""
    parts = list(path.relative_to(FORGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(FORGE.rglob("*.py"))}


def is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(tree: ast.Module, known: set[str], deferred: bool = False) -> set[str]:
    """The forge modules ``tree`` imports when it is imported (``from P import m`` counts P.m
    when it is a module); with ``deferred``, also those its functions import when called."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("forge"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("forge"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
        for child in ast.iter_child_nodes(node):
            if deferred or not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                visit(child)

    visit(tree)
    return {m for m in out if m in known}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that starts and ends at the same node, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def graph_of(deferred: bool = True) -> dict[str, set[str]]:
    """Module -> the forge modules it imports (with ``deferred``, also inside its functions)."""
    trees = modules()
    known = set(trees)
    graph = {}
    for name, tree in trees.items():
        # a package's own __init__ importing its submodules (re-exports) is not a cycle of design
        graph[name] = {m for m in imports(tree, known, deferred) if m != name and not m.startswith(name + ".")}
    return graph


def test_the_module_graph_has_no_cycles() -> None:
    """Not even through imports inside functions: a deferred import defers the cost, not the dependency."""
    cycle = find_cycle(graph_of(deferred=True))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_imports_inside_functions_are_counted() -> None:
    tree = ast.parse("import forge.b\ndef f():\n    from forge import c\nif TYPE_CHECKING:\n    import forge.d\n")
    known = {"forge.b", "forge.c", "forge.d"}
    assert imports(tree, known) == {"forge.b"}
    assert imports(tree, known, deferred=True) == {"forge.b", "forge.c"}


def test_the_cycle_check_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert reaches({"a": {"b"}, "b": {"c"}, "d": {"a"}}, "a") == {"a", "b", "c"}


def test_no_method_stubs_under_type_checking() -> None:
    """A class that re-declares another's methods for the type checker is a mixin in disguise."""
    offenders = []
    for name, tree in modules().items():
        for cls in ast.walk(tree):
            if not isinstance(cls, ast.ClassDef):
                continue
            for node in cls.body:
                if isinstance(node, ast.If) and is_type_checking(node):
                    offenders += [f"{name}.{cls.name}.{f.name}" for f in ast.walk(node)
                                  if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)]
    assert not offenders, f"method stubs under TYPE_CHECKING: {offenders}"


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


def test_the_layers_hold_even_through_deferred_imports() -> None:
    """The library, the registry and the backends never reach the CLI or the dashboard, the
    backends never reach the worker's supervisor, and the job process never reaches the
    supervisor that starts it (it gets a frozen context), even through imports in functions."""
    known = set(modules())
    graph = graph_of(deferred=True)
    below_cli = [m for m in known if m.split(".")[1:2] and m.split(".")[1] in {"queue", "registry", "backends", "worker", "job", "config"}]
    for m in below_cli:
        bad = {r for r in reaches(graph, m) if r.startswith(("forge.cli", "forge.dashboard"))}
        assert not bad, f"{m} reaches {sorted(bad)}"
    for m in [m for m in known if m.startswith("forge.backends")] + ["forge.worker.jobproc"]:
        assert "forge.worker.supervisor" not in reaches(graph, m), m
