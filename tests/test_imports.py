"""mlxtune's modules import one another in one direction only: no import cycles, even lazy ones."""

import ast
from pathlib import Path

import mlxtune

ROOT = Path(mlxtune.__file__).parent


def _module_name(file: Path, root: Path) -> str:
    parts = file.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: the mlxtune modules it imports anywhere in its body (function-level too)}."""
    files = {_module_name(f, root): f for f in root.rglob("*.py")}
    graph = {}
    for name, file in files.items():
        deps = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from pkg import submodule` depends on the submodule, not on pkg's __init__.
                subs = {f"{node.module}.{a.name}" for a in node.names} & files.keys()
                deps |= subs or {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None if the graph has none."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_mlxtune_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40 and graph["mlxtune.cli"]  # the walk really saw the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    pkg = tmp_path / "mlxtune"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from mlxtune.sub import b\n")
    (pkg / "a.py").write_text("def f():\n    from mlxtune.sub.b import g\n")
    (pkg / "sub" / "b.py").write_text("import mlxtune.a\n")
    graph = import_graph(pkg)
    assert graph["mlxtune.sub"] == {"mlxtune.sub.b"}
    assert find_cycle(graph) == ["mlxtune.a", "mlxtune.sub.b", "mlxtune.a"]
    (pkg / "sub" / "b.py").write_text("x = 1\n")
    assert find_cycle(import_graph(pkg)) is None
