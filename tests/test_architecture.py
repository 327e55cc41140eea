"""The shape of the code, checked: short parameter lists, one-way imports, a builder apart.

docs/architecture.md draws the parts and the flow of a compile; these tests keep the code
from drifting back into one class that knows everything.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "aioov"
MAX_PARAMS = 7
#: what the cache package may import from the rest of aioov: it never knows devices or compiles
CACHE_MAY_IMPORT = ("aioov._cache", "aioov._errors", "aioov._concurrency", "aioov._priority", "aioov._version")
#: the compile path: from a Core's call to a session. It talks to the cache through one door
COMPILE_PATH = ("aioov._core", "aioov._sync", "aioov._jobs", "aioov._bulk", "aioov._pipeline",
                "aioov._reader", "aioov._writer", "aioov._variants", "aioov._builds", "aioov._request",
                "aioov._sessions", "aioov._warmup", "aioov._compiled")
CACHE_FACE = "aioov._cache.cache"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(name: str, path: Path) -> set[str]:
    """Every aioov module ``name`` imports, at any level (TYPE_CHECKING and function bodies too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("aioov"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not target.startswith("aioov"):
                continue
            for alias in node.names:  # ``from . import _bulk`` imports a module
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
    return {module for module in found if module in MODULES and module != name}


MODULES = _modules()
GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _closure(name: str) -> set[str]:
    """``name`` and every aioov module it imports, directly or not."""
    seen: set[str] = set()
    stack = [name]
    while stack:
        module = stack.pop()
        if module not in seen:
            seen.add(module)
            stack.extend(GRAPH[module])
    return seen


def test_the_compile_path_talks_to_the_cache_through_its_face_only() -> None:
    """Locks, stamps, sentinels, MACs, the stat index and the remote tier are the cache's
    business: a compile asks ``Cache`` (look up, claim, publish, mark) and nothing below it."""
    for name in COMPILE_PATH:
        inside = sorted(m for m in GRAPH[name] if m.startswith("aioov._cache") and m != CACHE_FACE)
        assert inside == [], f"{name} imports {inside}: ask {CACHE_FACE} instead"


def test_the_builder_and_its_parent_share_only_the_protocol() -> None:
    """A builder process and the serving side meet in ``_buildjob`` (typed, versioned job and
    reply): neither imports the other's module."""
    assert "aioov._buildjob" in GRAPH["aioov._builder"] and "aioov._buildjob" in GRAPH["aioov._builds"]
    serving = {name for name in MODULES if name != "aioov._builder" and "aioov._builder" in GRAPH[name]}
    assert serving == set()
    assert not {"aioov._builds", "aioov._variants"} & _closure("aioov._builder")


def test_the_builder_process_imports_none_of_the_async_api() -> None:
    """The builder (``python -m aioov._builder``) writes and checks blobs: onnxruntime, numpy,
    the blob formats, the input synthesis and the comparison; no event loop, no Core, no cache
    protocol beyond file helpers and reserved names."""
    closure = _closure("aioov._builder")
    async_modules = {name for name in closure if re.search(r"^\s*(import|from) anyio", MODULES[name].read_text(), re.M)}
    assert async_modules == set()
    assert closure.isdisjoint({"aioov._core", "aioov._compiled", "aioov._pipeline", "aioov._writer", "aioov._reader",
                               "aioov._cache.store", "aioov._cache.locks"})


def test_no_function_takes_more_than_seven_parameters() -> None:
    too_long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                params = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
                params = [p for p in params if p not in ("self", "cls")]
                if len(params) > MAX_PARAMS:
                    too_long.append(f"{name}.{node.name}: {len(params)}")
    assert too_long == [], "bundle these parameters into a request or a config object"


def test_there_is_no_import_loop_inside_aioov() -> None:
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        if module in visiting:
            loop = visiting[visiting.index(module):] + [module]
            pytest.fail("import loop: " + " -> ".join(loop))
        if module in done:
            return
        visiting.append(module)
        for imported in sorted(GRAPH[module]):
            # a package's __init__ importing its own submodules is how packages work, not a loop
            if not (module != "aioov" and imported.startswith(module + ".")):
                visit(imported)
        visiting.pop()
        done.add(module)

    for module in sorted(GRAPH):
        if module != "aioov":  # the public namespace re-exports everything, by design
            visit(module)


def test_the_cache_knows_no_devices_and_no_compile_path() -> None:
    for name, imported in GRAPH.items():
        if name.startswith("aioov._cache"):
            strays = sorted(m for m in imported if not m.startswith(CACHE_MAY_IMPORT))
            assert strays == [], f"{name} imports {strays}"


def test_devices_know_of_the_cache_only_its_reserved_names() -> None:
    for name, imported in GRAPH.items():
        if name.startswith("aioov._devices"):
            cache = sorted(m for m in imported if m.startswith("aioov._cache") and m != "aioov._cache.layout")
            assert cache == [], f"{name} imports {cache}"
            assert "aioov.testing" not in imported


def test_the_checker_sees_imports() -> None:
    """Guard the guards: the graph holds edges we know are there."""
    assert "aioov._cache.layout" in GRAPH["aioov._devices.cpu"]
    assert "aioov._bulk" in GRAPH["aioov._core"]
    assert "aioov._errors" in GRAPH["aioov._cache.locks"]


def test_importing_aioov_imports_neither_onnx_nor_portalocker() -> None:
    """They cost ~0.1-0.2 s of every start (portalocker pulls in redis where installed); the
    first compile that writes an entry, or takes a lock, imports them."""
    from .helpers import run_python

    code = "import sys, aioov; print(sorted(m for m in ('onnx', 'portalocker', 'redis') if m in sys.modules))"
    assert run_python(code).stdout.strip() == "[]"
