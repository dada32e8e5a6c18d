"""edge.direct stands without the server, and without httpx2 for all but the transports."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_transports_load_no_server_proxy_access_metrics_or_app() -> None:
    found = _run(
        "import sys, edge.direct\n"
        "edge.direct.transport, edge.direct.async_transport\n"
        "bad = ('edge.access', 'edge.observe', 'edge.app', 'edge.cli', 'edge.dev')\n"
        "print(sorted(m for m in sys.modules if m.startswith(bad)))\n"
        "print(sorted(m for m in sys.modules if m.startswith('edge.proxy')))\n"
        "print(sorted(m for m in sys.modules if m.startswith('edge.http')))\n"
    )
    assert found.splitlines() == [
        "[]",
        "['edge.proxy', 'edge.proxy.splice']",
        "['edge.http', 'edge.http.heads']",
    ]  # no server, no client pool: of the wire only its field readers


def test_without_httpx2_the_router_works_and_the_transports_say_what_is_missing() -> None:
    found = _run(
        "import sys\n"
        "sys.modules['httpx2'] = None  # as if the extra were not installed\n"
        "import edge.direct, edge.direct.route\n"
        "try:\n"
        "    edge.direct.transport\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    assert "pip install 'edge[direct]'" in found
