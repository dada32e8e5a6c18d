"""Shared fixtures: real servers on loopback, started in-process or as subprocesses.

- `start_mock(**MockOptions fields)` -> base URL of an in-process mock model server.
- `start_edge(models={model: [urls]}, dialects={url prefix: [dialects]}, **overrides)` -> a
  running in-process edge `Worker` (its `.url` is the base URL); overrides use config's
  `section__setting=value` form.
- `procs` -> a `Procs` registry (tests/procs.py) for subprocess servers, killed at teardown.

Every test gets a cache directory of its own (`XDG_CACHE_HOME`, inherited by the subprocesses
it starts): discovery's default `cache_file = "auto"` writes there, never to the user's
~/.cache, and no test reads a fleet another test left behind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.app import Worker, bind
from edge.config import from_mapping
from edge.dev.mock import MockOptions, build_app
from tests.procs import Procs


class EdgeUnderTest(Worker):
    url: str


@pytest.fixture(autouse=True)
def cache_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's XDG_CACHE_HOME; the service managers' directories are unset."""
    home = tmp_path_factory.mktemp("cache-home")
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    for name in ("CACHE_DIRECTORY", "STATE_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
async def start_mock(aiohttp_server: Any) -> Callable[..., Awaitable[str]]:
    async def start(**options: Any) -> str:
        server = await aiohttp_server(build_app(MockOptions(**options)))
        return f"http://127.0.0.1:{server.port}"

    return start


@pytest.fixture
async def start_edge() -> AsyncIterator[Callable[..., Awaitable[EdgeUnderTest]]]:
    workers: list[Worker] = []

    async def start(
        models: dict[str, list[str]] | None = None,
        dialects: dict[str, list[str]] | None = None,
        **overrides: Any,
    ) -> EdgeUnderTest:
        raw: dict[str, Any] = {
            "models": {m: {"servers": urls} for m, urls in (models or {}).items()}
        }
        if dialects is not None:
            raw["dialects"] = dialects
        config = from_mapping(raw, **overrides)
        worker = Worker(config)
        sock = bind("127.0.0.1", 0, reuse_port=False)
        port = sock.getsockname()[1]
        await worker.start(sock)
        workers.append(worker)
        worker.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
        return worker  # type: ignore[return-value]

    yield start
    for worker in workers:
        await worker.drain()


@pytest.fixture
def procs() -> Iterator[Procs]:
    registry = Procs()
    try:
        yield registry
    finally:
        registry.stop_all()
