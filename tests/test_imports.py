"""The house has floors: no import circle between modules, and no package importing a floor above.

The graph is read from the source with `ast`, so it holds every import statement wherever it
stands: at module level, inside a function (where circles hide, since they import fine until
the wrong module is imported first) or under `if TYPE_CHECKING:`. `from a import b` is an edge
to `a.b` when that is a module, else to `a`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import multifair
from multifair.cli import COMMAND_MODULES

SRC = Path(multifair.__file__).parent

# Bottom to top. A package imports from its own floor or below. The command modules
# (`multifair.cli.COMMAND_MODULES`, e.g. `training.cli` running `multifair evaluate`) sit on
# top with `cli.py`: a command may call any floor.
FLOORS = [
    ["multifair", "errors", "console", "registry", "config", "csvcheck", "metrics"],
    ["data", "methods"],
    ["models"],
    ["training"],
    ["evaluation"],
    ["cli", "__main__"],
]


def module_files(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package under `src`."""
    out = {}
    for path in sorted(src.rglob("*.py")):
        parts = [src.name, *path.relative_to(src).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in its source)."""
    root = next(iter(modules)).split(".")[0]

    def owner(name: str) -> str | None:  # the longest prefix that is a module of ours
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(owner(a.name) for a in node.names if a.name.split(".")[0] == root)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                if base.split(".")[0] != root:
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else owner(base))
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, sorted for stable output)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def floor_of(module: str) -> int:
    if module in COMMAND_MODULES:
        return len(FLOORS) - 1
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else parts[0]
    for i, floor in enumerate(FLOORS):
        if top in floor:
            return i
    raise AssertionError(f"{module}: on no floor of FLOORS; add its package there")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(module_files())


def test_no_import_cycle_between_modules(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_packages_import_only_their_floor_or_below(graph):
    upward = sorted(
        f"{a} -> {b}" for a, targets in graph.items() for b in targets if floor_of(b) > floor_of(a)
    )
    assert not upward, "imports from a floor above:\n" + "\n".join(upward)


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    """The reader itself: a circle made only of a function-level import and a relative import."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\nimport os\n")
    graph = import_graph(module_files(pkg))
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (pkg / "a.py").write_text("import pkg.sub\n")  # the package, not b: the circle is gone
    assert find_cycle(import_graph(module_files(pkg))) is None
