"""The layers of the code: the core (amskv/) never imports the server or the tools, the KV cache never imports
what runs the engine, and no module imports itself back through others. Read from the source with ast, so a
new import that breaks a rule fails here whatever the tests happen to import."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("amskv", "server", "amskv_tools")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """The modules ``path`` imports (absolute names; ``from a.b import c`` also counts a.b.c when a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in PACKAGES}


MODULES = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def test_the_scan_sees_the_code():
    assert {"amskv.engine", "amskv.kvcache.manager", "server.worker", "amskv_tools.cli"} <= set(MODULES)
    assert "amskv.kvcache.policy" in imports(MODULES["amskv.kvcache.storage"])


@pytest.mark.parametrize("package, forbidden", [
    ("amskv", ("server", "amskv_tools")),
    ("server", ("amskv_tools",)),
    ("amskv.kvcache", ("amskv.analysis", "amskv.engine", "amskv.calibration", "amskv.scheduler", "amskv.step",
                       "amskv.generate", "amskv_tools.demo")),
    ("amskv.model", ("amskv.kvcache", "amskv.engine", "amskv.generate", "amskv.step", "amskv.scheduler")),
])
def test_no_upward_import(package, forbidden):
    wrong = {name: sorted(i for i in imports(path) if i.startswith(forbidden))
             for name, path in MODULES.items() if name == package or name.startswith(package + ".")}
    assert not {name: found for name, found in wrong.items() if found}


def test_no_import_cycle_at_module_level():
    graph = {name: {i for i in imports(path, top_level_only=True) if i in MODULES and i != name}
             for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                return path + [name, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [name])):
                return cycle
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            assert visit(name, []) is None
