"""The import structure of msad/: no import circles and no import from a lower layer up to a higher one.

Reads the source (``ast``, nothing is imported): every ``import msad.x`` and ``from msad.x import y`` at module
level, inside functions and under ``if TYPE_CHECKING``, and relative imports. Each module must be placed in
``LAYERS``; a module may import from its own layer or the layers below it, never above, and engine and deploy --
siblings on one layer -- never import each other. The layering is drawn in the README's "Architecture" paragraph.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Callable
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "msad"

# Bottom up. A name ending in ".*" is a package: the package itself and every module in it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("msad", "msad.errors", "msad.config", "msad.files", "msad.console"),  # 0: words, settings and files
    ("msad.storage", "msad.checkpoint"),  # 1: where runs live and the checkpoint file format (no models)
    ("msad.data.*",),  # 2: datasets and transforms
    ("msad.models.*",),  # 3: networks, losses, capacity arithmetic
    ("msad.build",),  # 4: config or checkpoint -> objects; the one reader of every checkpoint kind
    ("msad.engine.*", "msad.deploy.*"),  # 5: training and evaluation | export, runtime, latency, original files
    ("msad.sweep.*",),  # 6: sweeps, trial records, reports
    ("msad.cli",),  # 7: the command line
)
# Groups on one layer that must not import each other.
SIBLINGS: tuple[frozenset[str], ...] = (frozenset({"msad.engine", "msad.deploy"}),)

# Edges that still break the rules, each with what removes it. Empty this list as they go; an entry whose edge no
# longer exists fails `test_allowed_edges_still_exist`, so it cannot outlive its reason.
ALLOWED: dict[tuple[str, str], str] = {}


# ---------------------------------------------------------------------------------------------------------------------
# Reading the imports
# ---------------------------------------------------------------------------------------------------------------------


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The msad modules ``source`` (of ``module``) imports anywhere in its body.

    ``from a.b import c`` names the module ``a.b.c`` when that is a module, else ``a.b``.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                child = f"{target}.{alias.name}"
                found.add(child if child in known else target)
    return {name for name in found if name == "msad" or name.startswith("msad.")} - {module}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Every module under ``root`` -> the msad modules it imports."""
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    known = set(files)
    graph = {}
    for name, path in files.items():
        graph[name] = imported_modules(path.read_text(), name, path.name == "__init__.py", known)
    return graph


# ---------------------------------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------------------------------


def layer_of(module: str, layers: tuple[tuple[str, ...], ...] = LAYERS) -> int | None:
    for index, names in enumerate(layers):
        for name in names:
            if module == name or (name.endswith(".*") and (module == name[:-2] or module.startswith(name[:-1]))):
                return index
    return None


def group_of(module: str) -> str:
    """``msad.engine.loop`` -> ``msad.engine``; a top-level module is its own group."""
    return ".".join(module.split(".")[:2])


def strong_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or round a circle (sorted, one list a group)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import circle per group of `strong_components`, as a path that returns to its start."""
    return [_cycle_path(graph, set(component)) for component in strong_components(graph)]


def _cycle_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest circle through the component's first module (breadth first inside the component)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph.get(node, ()) & component):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if target not in parents:
                    parents[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no circle in {sorted(component)}")


def layering_errors(graph: dict[str, set[str]], layer: Callable[[str], int | None] = layer_of,
                    siblings: tuple[frozenset[str], ...] = SIBLINGS) -> list[str]:
    """Modules missing from the layer table, upward imports and imports between sibling groups."""
    errors = []
    for module in sorted(set(graph) | {t for targets in graph.values() for t in targets}):
        if layer(module) is None:
            errors.append(f"{module}: not in the layer table (add it to LAYERS in tests/test_layers.py)")
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            here, there = layer(module), layer(target)
            if here is None or there is None:
                continue
            if there > here:
                errors.append(f"{module} (layer {here}) imports {target} (layer {there}): upward")
            elif {group_of(module), group_of(target)} in siblings:
                errors.append(f"{module} imports {target}: {group_of(module)} and {group_of(target)} are siblings")
    return errors


def without_allowed(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {module: {t for t in targets if (module, t) not in ALLOWED} for module, targets in graph.items()}


# ---------------------------------------------------------------------------------------------------------------------
# msad/ itself
# ---------------------------------------------------------------------------------------------------------------------


def test_no_import_cycles() -> None:
    graph = without_allowed(import_graph())
    cycles = [f"{' -> '.join(_cycle_path(graph, set(c)))} (all in the circle: {', '.join(c)})"
              for c in strong_components(graph)]
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_no_upward_imports() -> None:
    errors = layering_errors(without_allowed(import_graph()))
    assert not errors, "layering broken:\n" + "\n".join(errors)


def test_allowed_edges_still_exist() -> None:
    graph = import_graph()
    stale = [f"{a} -> {b}" for a, b in ALLOWED if b not in graph.get(a, set())]
    assert not stale, "ALLOWED lists edges that are gone (remove them): " + ", ".join(stale)


def test_graph_reads_msad() -> None:
    """The reader found the package and its known edges (a broken reader would pass every check above)."""
    graph = import_graph()
    assert len(graph) > 40
    assert "msad.errors" in graph["msad.config"]
    assert "msad.build" in graph["msad.engine.loop"]  # module level, a parenthesised `from msad.build import (...)`
    assert "msad.engine.trainer" in graph["msad.cli"]  # inside a function


# ---------------------------------------------------------------------------------------------------------------------
# Negative controls: the checker reports what it must
# ---------------------------------------------------------------------------------------------------------------------


def test_reader_sees_every_import_form(tmp_path: Path) -> None:
    root = tmp_path / "msad"
    (root / "sub").mkdir(parents=True)
    for name in ("__init__.py", "a.py", "b.py", "c.py", "d.py", "e.py", "sub/__init__.py", "sub/f.py"):
        (root / name).write_text("")
    (root / "sub" / "g.py").write_text(textwrap.dedent("""
        import os
        import msad.a
        from msad import b
        from msad.c import something
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from msad.e import Hint
        def later():
            from msad.d import thing
        from . import f
        from .. import errors_that_do_not_exist
    """))
    graph = import_graph(root)
    assert graph["msad.sub.g"] == {"msad.a", "msad.b", "msad.c", "msad.d", "msad.e", "msad.sub.f", "msad"}


def test_cycle_is_reported_with_its_path() -> None:
    graph = {"msad.a": {"msad.b"}, "msad.b": {"msad.c"}, "msad.c": {"msad.a"}, "msad.d": {"msad.a"}}
    assert find_cycles(graph) == [["msad.a", "msad.b", "msad.c", "msad.a"]]
    assert find_cycles({"msad.a": {"msad.b"}, "msad.b": set()}) == []
    graph["msad.c"].add("msad.d")
    assert strong_components(graph) == [["msad.a", "msad.b", "msad.c", "msad.d"]]
    assert find_cycles({"msad.a": {"msad.a"}}) == [["msad.a", "msad.a"]]


def test_upward_and_sibling_imports_are_reported() -> None:
    layers = (("msad.low",), ("msad.engine.*", "msad.deploy.*"), ("msad.high",))
    graph = {"msad.low": {"msad.high"}, "msad.high": {"msad.low", "msad.engine.x"},
             "msad.engine.x": {"msad.deploy.y", "msad.engine.z"}, "msad.engine.z": set(), "msad.deploy.y": set(),
             "msad.stray": set()}
    errors = layering_errors(graph, lambda m: layer_of(m, layers))
    assert errors == [
        "msad.stray: not in the layer table (add it to LAYERS in tests/test_layers.py)",
        "msad.engine.x imports msad.deploy.y: msad.engine and msad.deploy are siblings",
        "msad.low (layer 0) imports msad.high (layer 2): upward",
    ]
