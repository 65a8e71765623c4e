"""The package's boundaries, checked: every module imports on its own, the import
graph has no cycle (and no import hides inside a function), and the sans-I/O
codecs reach no socket, clock, file system or ZeroMQ, directly or through the
fleet modules they use."""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import fleet

PACKAGE = Path(fleet.__file__).resolve().parent

# Bytes in, typed events out: the caller passes the clock, the body storage,
# the resolver. What would break that rule if one of them imported it:
IO_MODULES = frozenset({"socket", "select", "selectors", "zmq", "time", "os", "tempfile", "subprocess",
                        "threading", "asyncio", "email"})
CODECS = (
    "fleet.mongrel2.codec",
    "fleet.mongrel2.pacing",
    "fleet.http.parser",
    "fleet.wsgi.response",
    "fleet.wsgi.environ",
    "fleet.dispatch.broker",
    "fleet.dispatch.frames",
    "fleet.cluster.protocol",
    "fleet.cluster.membership",
    "fleet.cluster.peers",
    "fleet.cluster.turns",
    "fleet.worker.tally",
    "fleet.asgi.scope",
    "fleet.asgi.cycle",
    "fleet.asgi.websocket",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, *, top_level_only: bool = False) -> set[str]:
    """The modules `name` imports, as absolute names (``from a import b`` counts a.b
    when a.b is a fleet module, a otherwise)."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


def nested_imports(name: str) -> list[str]:
    """Imports anywhere but at module level (a function, a class, an if block)."""
    tree = ast.parse(MODULES[name].read_text())
    top = {id(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))}
    return [f"line {node.lineno}" for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top]


def fleet_imports(name: str) -> set[str]:
    return {module for module in imports(name, top_level_only=True) if module in MODULES and module != name}


def test_every_module_imports_on_its_own() -> None:
    def check(name: str) -> str | None:
        run = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=60)
        return None if run.returncode == 0 else f"{name}: {run.stderr.strip().splitlines()[-1]}"

    runnable = [name for name in MODULES if not name.endswith("__main__")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        problems = [problem for problem in pool.map(check, runnable) if problem]
    assert not problems, "\n".join(problems)


def test_no_import_hides_inside_a_function() -> None:
    hidden = {name: where for name in MODULES if (where := nested_imports(name))}
    assert not hidden, hidden


def test_the_import_graph_has_no_cycle() -> None:
    graph = {name: fleet_imports(name) for name in MODULES}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> list[str] | None:
        if state.get(name) == "done":
            return None
        if state.get(name) == "open":
            return path[path.index(name):] + [name]
        state[name] = "open"
        for dep in sorted(graph[name]):
            if cycle := visit(dep, path + [name]):
                return cycle
        state[name] = "done"
        return None

    for name in MODULES:
        cycle = visit(name, [])
        assert cycle is None, " -> ".join(cycle)


def io_reached(name: str, seen: set[str] | None = None) -> dict[str, str]:
    """{I/O module: the fleet module that imports it} over `name` and the fleet modules it uses."""
    seen = seen if seen is not None else set()
    seen.add(name)
    found = {module.split(".")[0]: name for module in imports(name) if module.split(".")[0] in IO_MODULES}
    for dep in fleet_imports(name) - seen:
        found.update(io_reached(dep, seen))
    return found


@pytest.mark.parametrize("codec", CODECS)
def test_a_codec_reaches_no_io(codec: str) -> None:
    assert codec in MODULES
    assert io_reached(codec) == {}, f"{codec} reaches I/O modules (module: importer)"
