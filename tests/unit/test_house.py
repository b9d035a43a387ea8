"""The house's shape, read from the source with ``ast`` (nothing is imported or run).

- no circle of files in any package: every import counts, the ones inside functions and
  under ``TYPE_CHECKING`` too (a circle hidden in a function is still two ideas sharing a table);
- rooms import downwards only (packages: test_layers.py): in stages/ the orchestrating process
  (launch/) never imports the ranks' rooms (rank/), the engines know neither, and only
  engines/ imports deepspeed;
- small modules and functions: no module over 450 lines, no function over 80, in every
  package and in benchmarks/;
- the trainer drives its engine only through the ``Engine`` protocol.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("flmcore", "growth", "operators", "stages", "benchmarks")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    """Dotted module name → file, for every package (benchmarks' scripts import each other bare)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imported_names(name: str, path: Path) -> list[str]:
    """Every module ``path`` imports (absolute names), at any depth of the file."""
    is_package = path.name == "__init__.py"
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import sub`` imports pkg.sub; ``from pkg import name`` imports pkg
            names += [f"{module}.{alias.name}" for alias in node.names]
    return names


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports (a name resolves to its longest known prefix)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        edges = set()
        for target in imported_names(name, path):
            if name.startswith("benchmarks.") and f"benchmarks.{target}" in known:
                target = f"benchmarks.{target}"  # a script's bare sibling import (_common, payoff.…)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_no_circle_of_files_in_any_package():
    found = circles(import_graph())
    assert not found, "import circles (move the shared table below both): " + "; ".join(
        " ⇄ ".join(c) for c in found)


def test_the_circle_finder_finds_circles():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize(("room", "must_not_import"), [
    ("stages.engines", ("stages.launch", "stages.rank")),
    ("stages.launch", ("stages.rank",)),
    ("stages.rank", ("stages.launch",)),
    ("stages.data", ("stages.launch", "stages.rank", "stages.engines")),
])
def test_rooms_import_downwards(room, must_not_import):
    graph = import_graph()
    bad = sorted(f"{m} → {t}" for m, targets in graph.items() if m == room or m.startswith(room + ".")
                 for t in targets if any(t == x or t.startswith(x + ".") for x in must_not_import))
    assert not bad, f"{room} imports a room above it: {bad}"


def test_only_the_engines_import_deepspeed():
    known = modules()
    bad = sorted(name for name, path in known.items() if name.startswith("stages.")
                 and not name.startswith("stages.engines")
                 and any(t.split(".")[0] == "deepspeed" for t in imported_names(name, path)))
    assert not bad, f"deepspeed imported outside stages/engines/: {bad}"


def test_modules_and_functions_are_small():
    too_big = []
    for path in modules().values():
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            too_big.append(f"{path.relative_to(REPO)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_big.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}(): {length} lines")
    assert not too_big, (f"over {MAX_MODULE_LINES} lines per module or {MAX_FUNCTION_LINES} per function: "
                         + "; ".join(too_big))


def test_the_trainer_uses_only_the_engine_protocol():
    """No reaching through to DeepSpeed (``engine.engine``) and no probing for optional methods."""
    tree = ast.parse((REPO / "stages" / "rank" / "trainer.py").read_text())
    protocol = ast.parse((REPO / "stages" / "engines" / "protocol.py").read_text())
    engine_cls = next(n for n in protocol.body if isinstance(n, ast.ClassDef) and n.name == "Engine")
    declared = {n.name for n in engine_cls.body if isinstance(n, ast.FunctionDef)} | {
        n.target.id for n in engine_cls.body if isinstance(n, ast.AnnAssign)}
    used, probes = set(), []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "engine"):
            used.add(node.attr)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr"):
            probes.append(ast.unparse(node))
    assert not probes, f"the trainer probes its engine: {probes}"
    assert used <= declared, f"the trainer uses engine members the protocol does not declare: {used - declared}"
