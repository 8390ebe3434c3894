"""The package layout holds: no import cycles, no private names across packages, and other
packages reached through their public face (the package's ``__init__``).

Walks the AST of every module under gateway/ (no import): every import counts, including the
ones under ``if TYPE_CHECKING:`` and inside functions, since a cycle hidden there is still a
design cycle (and one refactor away from an ImportError). Importing ``gateway.p.m`` from
outside ``p`` also runs ``gateway/p/__init__.py``, so that edge is counted too: two packages
that import each other are a cycle even when no two modules are.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "gateway"

# Known edges of cycles being removed, each (importer, imported: a module, or a package and its
# modules), with the reason. Empty: the cycles of issue 19 (breaker <-> its deployment and
# fleet modules, the deferred store <-> its backends, pipeline -> deferred -> pipeline) are
# gone. An entry whose edge no longer exists fails test_allow_list_is_not_stale, so an
# exception cannot outlive its cycle.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def package_of(name: str) -> str:
    """gateway.limits.limiter -> gateway.limits; a root module (gateway.errors) is its own."""
    parts = name.split(".")
    if len(parts) >= 2 and is_package(".".join(parts[:2])):
        return ".".join(parts[:2])
    return name


def imports(name: str) -> Iterator[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) for every import in a module."""
    here = name if is_package(name) else name.rpartition(".")[0]
    return imports_in(MODULES[name].read_text(encoding="utf-8"), here)


def imports_in(source: str, here: str) -> Iterator[tuple[str, list[str], int]]:
    """Every import of ``source`` wherever it is (module level, TYPE_CHECKING, a function),
    relative ones resolved against the package ``here``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno


def edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        own = package_of(name)
        for module, names, _ in imports(name):
            # `from gateway.p import m` of a submodule needs m, not p's __init__ to finish
            subs = {f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES}
            whole = not names or len(subs) < len(names)
            targets = subs | ({module} if whole else set())
            for target in targets:
                if target not in MODULES or target == name:
                    continue
                graph[name].add(target)
                # importing gateway.p.m from outside p runs gateway/p/__init__.py first
                parent = package_of(target)
                if parent != own and parent != target and parent in MODULES:
                    graph[name].add(parent)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
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
                    found.append(sorted(component))
    return found


def example_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete cycle through the component's first module, for the failure message."""
    members = set(component)
    start = component[0]
    paths = [[start]]
    seen = {start}
    while paths:
        path = paths.pop(0)
        for nxt in sorted(graph[path[-1]] & members):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                paths.append([*path, nxt])
    return component


def allowed(target: str, entry: str) -> bool:
    """An allow-list entry names a module, or a package and with it all its modules."""
    return target == entry or target.startswith(entry + ".")


def test_the_walk_sees_every_kind_of_import() -> None:
    # a test that cannot fail is a defect: the walk must see what hides from a quick grep
    source = """
from typing import TYPE_CHECKING
from . import sibling
from ..errors import GatewayError
import gateway.usage
if TYPE_CHECKING:
    from gateway.limits import Limiter
def later() -> None:
    from .other import thing
"""
    found = {(m, tuple(n)) for m, n, _ in imports_in(source, "gateway.pipeline")}
    assert found >= {("gateway.pipeline", ("sibling",)), ("gateway.errors", ("GatewayError",)),
                     ("gateway.usage", ()), ("gateway.limits", ("Limiter",)),
                     ("gateway.pipeline.other", ("thing",))}
    graph = edges()
    assert len(MODULES) > 80 and sum(map(len, graph.values())) > 300


def test_no_import_cycles() -> None:
    graph = edges()
    for importer, imported in KNOWN_CYCLE_EDGES:
        for target in list(graph.get(importer, set())):
            if allowed(target, imported):
                graph[importer].discard(target)
    found = [" -> ".join(example_cycle(graph, c)) for c in cycles(graph)]
    assert not found, "import cycles (count TYPE_CHECKING and function-level imports too):\n" \
        + "\n".join(found)


def test_a_cycle_is_detected() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert example_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_allow_list_is_not_stale() -> None:
    graph = edges()
    stale = sorted(e for e in KNOWN_CYCLE_EDGES
                   if not any(allowed(t, e[1]) for t in graph.get(e[0], set())))
    assert not stale, f"these edges are gone: remove them from KNOWN_CYCLE_EDGES: {stale}"


def test_no_private_name_is_imported_from_another_package() -> None:
    found = []
    for name, path in MODULES.items():
        for module, names, line in imports(name):
            if not module.startswith("gateway") or package_of(module) == package_of(name):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                found.append(f"{path.relative_to(ROOT.parent)}:{line}: "
                             f"{', '.join(private)} from {module}")
    assert not found, "private names imported across packages:\n" + "\n".join(found)


def test_other_packages_are_reached_through_their_face() -> None:
    """`from gateway.limits import Limiter`, not `from gateway.limits.limiter import ...`: a
    package's modules are its own business; its __init__ says what others may use."""
    found = []
    for name, path in MODULES.items():
        for module, _, line in imports(name):
            target = package_of(module)
            if module in MODULES and target != module and target != package_of(name) \
                    and is_package(target):
                found.append(f"{path.relative_to(ROOT.parent)}:{line}: {module}")
    assert not found, "imports of another package's module (import from the package):\n" \
        + "\n".join(found)
