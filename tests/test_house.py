"""The house rules of docs/design.md that a machine can check: no import loops between p2pfed's modules,
the networked runtimes stand on job.py and not on the simulator, the simulator needs no libp2p, and no module
grows past 450 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "p2pfed"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """The modules `path` imports (`from p2pfed import x` counts as p2pfed.x when that is a module); with
    `top_level_only` False also those inside functions, but never those under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(_walk_outside_type_checking(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _walk_outside_type_checking(node: ast.AST):
    yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
            continue
        yield from _walk_outside_type_checking(child)


def graph(top_level_only: bool) -> nx.DiGraph:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = nx.DiGraph()
    edges.add_nodes_from(modules)
    for name, path in modules.items():
        edges.add_edges_from((name, target) for target in imports(path, top_level_only)
                             if target in modules and target != name and target != "p2pfed")
    return edges


def test_no_import_loops_between_modules():
    # Imports inside functions count too: a loop put off until call time is still a loop.
    assert list(nx.simple_cycles(graph(top_level_only=False))) == []


def test_the_networked_runtimes_do_not_stand_on_the_simulator():
    everything = graph(top_level_only=False)
    for runtime in ("p2pfed.peer", "p2pfed.launch", "p2pfed.embed"):
        reached = nx.descendants(everything, runtime)
        assert not reached & {"p2pfed.swarm", "p2pfed.net.memory"}, runtime


def test_the_simulator_needs_no_libp2p():
    reached = nx.descendants(graph(top_level_only=True), "p2pfed.swarm") | {"p2pfed.swarm"}
    for name in reached:
        path = PACKAGE.parent / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = PACKAGE.parent / name.replace(".", "/") / "__init__.py"
        assert not any(i == "libp2p" or i.startswith("libp2p.") for i in imports(path, top_level_only=True)), name


def test_no_module_over_450_lines():
    sizes = {module_name(p): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 450} == {}
