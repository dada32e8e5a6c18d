"""The package map holds: each package imports only the ones below it (docs/architecture.md).
Routing above all stands on its own, with no HTTP server, proxy, access control, metrics or app,
so that a client library can route with it (the direct-host issue)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

EDGE = Path(__file__).resolve().parents[1] / "edge"

# package -> the edge packages and top-level modules it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config": set(),
    "dialects": {"errors"},
    "routing": {"config", "errors", "dialects"},
    "http": {"config", "errors", "dialects"},
    "observe": {"config", "routing"},
    # The gate reads the classified request (proxy.route), checked below as the one exception.
    "access": {"config", "errors", "dialects", "http", "routing", "observe", "proxy"},
    "proxy": {"config", "errors", "dialects", "http", "routing", "observe", "access"},
    "dev": {"config", "dialects"},
    # The routing as a client library (edge.direct): routing and what routing stands on; of the
    # proxy only the pure continuation (proxy.splice), of http only the wire's field readers
    # (http.heads: Retry-After), both checked below as named exceptions.
    "direct": {"config", "errors", "dialects", "routing", "proxy", "http"},
}


def _owner(path: Path) -> str:
    rel = path.relative_to(EDGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _edge_imports(path: Path) -> set[str]:
    """The edge modules `path` imports, as dotted names (edge.x.y)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "edge":
                found.update(f"edge.{alias.name}" for alias in node.names)
            elif node.module.startswith("edge."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("edge."))
    return found


MODULES = sorted(p for p in EDGE.rglob("*.py") if _owner(p) in ALLOWED)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(EDGE)))
def test_each_module_imports_only_the_packages_below_its_own(path: Path) -> None:
    owner = _owner(path)
    for name in _edge_imports(path):
        target = name.split(".")[1]
        assert target == owner or target in ALLOWED[owner], f"{path.name} imports {name}"
        if owner == "access" and target == "proxy":
            assert name == "edge.proxy.route", f"{path.name} imports {name}"
        if owner == "direct" and target == "proxy":
            assert name == "edge.proxy.splice", f"{path.name} imports {name}"
        if owner == "direct" and target == "http":
            assert name == "edge.http.heads", f"{path.name} imports {name}"


def test_the_checks_see_every_package() -> None:
    packages = {p.name for p in EDGE.iterdir() if (p / "__init__.py").exists()}
    assert packages <= set(ALLOWED), packages - set(ALLOWED)
    assert any(_edge_imports(p) for p in MODULES)  # the scan reads real imports


def test_routing_imports_no_server_proxy_access_metrics_or_app() -> None:
    """Transitively, in a fresh interpreter: importing every routing module loads none of them."""
    names = [f"edge.routing.{p.stem}" for p in (EDGE / "routing").glob("*.py")]
    code = (
        "import sys\n"
        + "".join(f"import {n}\n" for n in names)
        + "bad = ('edge.http', 'edge.proxy', 'edge.access', 'edge.observe', 'edge.app',"
        " 'edge.cli', 'edge.dev')\n"
        "print(sorted(m for m in sys.modules if m.startswith(bad)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert len(names) >= 9


def _compiled() -> list[Path]:
    """The modules setup.py compiles with mypyc (its HOT tuple, read without running it)."""
    tree = ast.parse((EDGE.parent / "setup.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "HOT":
            names = ast.literal_eval(node.value)
            return [EDGE / f"{name}.py" for name in names]
    raise AssertionError("setup.py has no HOT tuple")


@pytest.mark.parametrize("path", _compiled(), ids=lambda p: str(p.relative_to(EDGE)))
def test_no_compiled_coroutine_awaits_inside_an_except_block(path: Path) -> None:
    """A mypyc coroutine suspended inside an `except` block leaves its exception current for
    the whole event loop: every exception raised meanwhile gets it as __context__, and the HTTP
    server, which reads the __context__ of httptools' wrapped errors, answered a 431 as a 400."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ExceptHandler):
            for inner in ast.walk(node):
                assert not isinstance(inner, ast.Await | ast.AsyncFor | ast.AsyncWith), (
                    f"{path.name}:{inner.lineno} awaits inside the except block at {node.lineno}"
                )


def test_no_package_init_is_compiled() -> None:
    """mypyc gives a compiled package `__init__` a wrong `__path__` (its folder twice): a
    submodule imported before the compiled group was loaded is then not found."""
    assert [p for p in _compiled() if p.name == "__init__.py"] == []
