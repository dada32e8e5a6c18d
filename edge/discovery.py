"""Sources of servers -> one Fleet, swapped as a single reference.

A source is a registry URL answering `GET /libertai/models` with `{"model": {"servers": [...]}}`,
a JSON file of the same shape, or the `[models]` table of the config. Each source keeps its last
good view: a registry that fails or answers garbage changes nothing (logged, counted), so one
bad refresh never empties the fleet.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from edge.config import DiscoverySettings
from edge.fleet import FleetView, HostTable, normalise_url

log = logging.getLogger("edge.discovery")

View = dict[str, tuple[str, ...]]


class SourceError(Exception):
    """A source could not be read or did not have the registry shape."""


def parse_registry(doc: Any) -> View:
    """Validate the registry shape; invalid server URLs are dropped, not fatal."""
    if not isinstance(doc, dict):
        raise SourceError("registry is not a JSON object")
    view: View = {}
    for model, entry in doc.items():
        servers = entry.get("servers") if isinstance(entry, dict) else None
        if not isinstance(model, str) or not isinstance(servers, list):
            raise SourceError("registry entries must be {model: {servers: [...]}}")
        urls = []
        for server in servers:
            try:
                urls.append(normalise_url(server) if isinstance(server, str) else "")
            except ValueError:
                log.warning("discovery: dropped an invalid server URL for model %s", model)
        view[model] = tuple(u for u in urls if u)
    return view


def merge(views: list[View]) -> View:
    merged: dict[str, dict[str, None]] = {}
    for view in views:
        for model, urls in view.items():
            merged.setdefault(model, {}).update(dict.fromkeys(urls))
    return {model: tuple(urls) for model, urls in merged.items() if urls}


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


class Source:
    """One source and its last good view."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.view: View | None = None
        self.etag: str | None = None
        self.failures = 0

    async def fetch(self, session: aiohttp.ClientSession, limit_s: float) -> View:
        if not is_url(self.name):
            return await asyncio.to_thread(_read_file, self.name)
        headers = {"Accept": "application/json"}
        if self.etag and self.view is not None:
            headers["If-None-Match"] = self.etag
        client_timeout = aiohttp.ClientTimeout(total=limit_s)
        async with session.get(self.name, headers=headers, timeout=client_timeout) as resp:
            if resp.status == 304 and self.view is not None:
                return self.view
            if resp.status != 200:
                raise SourceError(f"HTTP {resp.status}")
            body = await resp.read()
            etag = resp.headers.get("ETag")
        view = _parse_bytes(body)
        self.etag = etag
        return view

    def __repr__(self) -> str:
        models = len(self.view) if self.view is not None else None
        return f"<Source {self.name} models={models} failures={self.failures}>"


def _read_file(path: str) -> View:
    try:
        return _parse_bytes(Path(path).read_bytes())
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from None


def _parse_bytes(body: bytes) -> View:
    try:
        return parse_registry(orjson.loads(body))
    except orjson.JSONDecodeError:
        raise SourceError("not valid JSON") from None


class Discovery:
    """Keeps `view.fleet` equal to the merge of every source's last good view."""

    def __init__(
        self,
        settings: DiscoverySettings,
        static: Mapping[str, tuple[str, ...]],
        table: HostTable,
        view: FleetView,
        session: aiohttp.ClientSession,
    ) -> None:
        self.settings = settings
        self.static = parse_registry({m: {"servers": list(s)} for m, s in static.items()})
        self.table = table
        self.view = view
        self.session = session
        self.sources = [Source(name) for name in settings.sources]
        self.refreshes = 0

    def reconfigure(
        self, settings: DiscoverySettings, static: Mapping[str, tuple[str, ...]]
    ) -> None:
        """New sources and static servers (SIGHUP); sources kept keep their last good view."""
        known = {s.name: s for s in self.sources}
        self.settings = settings
        self.static = parse_registry({m: {"servers": list(s)} for m, s in static.items()})
        self.sources = [known.get(name) or Source(name) for name in settings.sources]

    async def refresh(self) -> None:
        """Read every source once (concurrently) and swap in the merged fleet."""
        await asyncio.gather(*(self._refresh_one(s) for s in self.sources))
        views = [self.static] + [s.view for s in self.sources if s.view is not None]
        self.view.fleet = self.table.build(merge(views))
        self.refreshes += 1

    async def _refresh_one(self, source: Source) -> None:
        try:
            source.view = await source.fetch(self.session, self.settings.timeout_s)
            source.failures = 0
        except (TimeoutError, SourceError, aiohttp.ClientError, OSError) as exc:
            source.failures += 1
            log.warning("discovery: %s failed (%s); keeping its last good view", source.name, exc)

    async def run(self) -> None:
        """Refresh every `refresh_s`, jittered so that replicas do not poll in step."""
        if not self.sources:
            return
        while True:
            period = self.settings.refresh_s
            await asyncio.sleep(period * random.uniform(0.8, 1.2))
            await self.refresh()

    def __repr__(self) -> str:
        return f"<Discovery sources={len(self.sources)} refreshes={self.refreshes}>"
