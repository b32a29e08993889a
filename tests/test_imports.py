"""The import graph of the ``bilae`` package has no cycle, counting imports inside functions.

An edge M → X is every ``import``/``from … import`` in M's source (at any depth) naming a bilae module X; importing
``a.b.c`` also initialises its packages ``a.b`` and ``a`` unless M already lives inside them, so those count too.
Entry points never import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import bilae

PACKAGE = Path(bilae.__file__).resolve().parent
ENTRY_POINTS = {"bilae.train", "bilae.analyze", "bilae.cache", "bilae.sweep"}


def module_name(path: Path) -> str:
    parts = ["bilae", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def resolve(node: ast.ImportFrom, here: str, modules: dict[str, Path]) -> list[str]:
    """The bilae modules an ``ImportFrom`` names: ``from a import b`` is a.b if that is a module, else a."""
    base = node.module or ""
    if node.level:  # relative import
        parts = here.split(".")
        package = parts if is_package(here, modules) else parts[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
    found = []
    for alias in node.names:
        child = f"{base}.{alias.name}"
        found.append(child if child in modules else base)
    return found


def imports(path: Path, here: str, modules: dict[str, Path]) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names |= set(resolve(node, here, modules))
    edges = set()
    for name in names:
        if not name.startswith("bilae"):
            continue
        while name not in modules:  # `import bilae.x.attr`-style: the longest module prefix
            name = name.rsplit(".", 1)[0]
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the module and the packages that importing it initialises
            target = ".".join(parts[:i])
            if not (here == target or here.startswith(target + ".")):
                edges.add(target)
    return edges


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports(path, name, modules) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_bilae() -> None:
    edges = graph()
    assert len(edges) > 20 and "bilae.builders" in edges["bilae.train"]
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle or [])


def test_entry_points_never_import_each_other() -> None:
    edges = graph()
    for entry in ENTRY_POINTS:
        assert not edges[entry] & (ENTRY_POINTS - {entry}), entry


def test_the_check_sees_lazy_imports_and_packages(tmp_path: Path) -> None:
    """The check itself can fail: cycles are found, lazy imports count, a package's ``__init__`` counts."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f():\n    from bilae.train import run\n    from bilae.autoencoders import checkpoint\n"
    )
    # Outside bilae.autoencoders, importing its checkpoint module initialises the package (whose __init__
    # imports base.py): the old cycle base -> hub -> autoencoders.checkpoint -> autoencoders -> base.
    assert imports(probe, "bilae.probe", modules) == {
        "bilae.train",
        "bilae.autoencoders.checkpoint",
        "bilae.autoencoders",
    }
    assert imports(probe, "bilae.autoencoders.probe", modules) == {
        "bilae.train",
        "bilae.autoencoders.checkpoint",
    }
