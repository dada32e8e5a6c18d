"""Sources of servers -> one Fleet, swapped as a single reference.

A source is a registry URL answering `GET /libertai/models` with `{"model": {"servers": [...]}}`,
a JSON file of the same shape, or the `[models]` table of the config. Registries are polled every
`refresh_s` (jittered, so replicas do not poll in step) with If-None-Match when the registry sent
an ETag.

Each source keeps its last good view: a registry that fails, answers garbage, or suddenly lists
no server at all changes nothing (logged, counted), so one bad refresh never empties the fleet.
The last good views are also written to a cache file (atomically: a temporary file renamed over
it), and read back at start, so an edge started while a registry is down routes from them until
the registry answers. `cache_file = "auto"` (the default) keeps one file per set of sources, so
two edges with different registries on one machine never read each other's view: under the
service manager's cache or state directory (systemd's CacheDirectory=/StateDirectory=), else
$XDG_CACHE_HOME/edge, else ~/.cache/edge. A cache that cannot be written costs one warning, not
the service.

A server's identity is its normalised URL: HostTable keeps its Host (statistics, health) across
refreshes. A server no source names any more is marked REMOVED and takes no new requests; the
streams already on it hold their Host and finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import random
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Final

import aiohttp
import orjson

from edge.config import DiscoverySettings
from edge.routing.fleet import FleetView, HostTable, normalise_url

log = logging.getLogger("edge.discovery")

View = dict[str, tuple[str, ...]]
OUTCOMES = ("ok", "not_modified", "error")
_WRITES = itertools.count()  # itertools.count is thread-safe: writes run in worker threads


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


def _servers(view: View) -> int:
    return sum(len(urls) for urls in view.values())


class Source:
    """One source and its last good view (`cached`: that view came from the cache file)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.view: View | None = None
        self.cached = False
        self.etag: str | None = None
        self.failures = 0  # in a row

    async def fetch(self, session: aiohttp.ClientSession, limit_s: float) -> View | None:
        """The source's view now; None when the registry said it did not change (304)."""
        if not is_url(self.name):
            return await asyncio.to_thread(_read_file, self.name)
        headers = {"Accept": "application/json"}
        if self.etag and self.view is not None and not self.cached:
            headers["If-None-Match"] = self.etag
        client_timeout = aiohttp.ClientTimeout(total=limit_s)
        async with session.get(self.name, headers=headers, timeout=client_timeout) as resp:
            if resp.status == 304 and "If-None-Match" in headers:
                return None
            if resp.status != 200:
                raise SourceError(f"HTTP {resp.status}")
            body = await resp.read()
            etag = resp.headers.get("ETag")
        view = _parse_bytes(body)
        if self.view and not _servers(view):
            # A registry that suddenly lists no server is far likelier broken than right.
            raise SourceError("the registry lists no server any more")
        self.etag = etag
        return view

    def __repr__(self) -> str:
        models = len(self.view) if self.view is not None else None
        return f"<Source {self.name} models={models} cached={self.cached} failures={self.failures}>"


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


def read_cache(path: str) -> dict[str, View]:
    """source name -> its last good view, from the cache file; {} when there is none usable."""
    try:
        doc = orjson.loads(Path(path).read_bytes())
        sources = doc["sources"]
        return {name: parse_registry(view) for name, view in sources.items()}
    except (FileNotFoundError, NotADirectoryError):
        return {}  # none yet (or no directory for it: the write says so, once)
    except (OSError, orjson.JSONDecodeError, SourceError, KeyError, TypeError, AttributeError):
        log.warning("discovery: ignored an unreadable cache file %s", path)
        return {}


AUTO: Final = "auto"
# systemd sets these for CacheDirectory= / StateDirectory= (several directories: ':'-separated).
_SERVICE_DIRS: Final = ("CACHE_DIRECTORY", "STATE_DIRECTORY")


def cache_dir(env: Mapping[str, str]) -> str:
    """Where "auto" cache files go, from the environment (see the module docstring); "" when
    nothing names an absolute directory (no HOME either)."""
    for name in _SERVICE_DIRS:
        first = env.get(name, "").split(":")[0]
        if first:
            return first
    xdg = env.get("XDG_CACHE_HOME", "")
    # The XDG spec says to ignore a relative path: it would depend on the working directory.
    base = xdg if os.path.isabs(xdg) else os.path.join(_home(env), ".cache")
    return os.path.join(base, "edge") if os.path.isabs(base) else ""


def _home(env: Mapping[str, str]) -> str:
    home = env.get("HOME")
    return home if home is not None else os.path.expanduser("~")  # the password database's


def cache_path(setting: str, sources: Iterable[str], env: Mapping[str, str]) -> str:
    """The file `[discovery] cache_file` names for these sources; "" for none.

    "auto": one file per set of sources (order and repeats do not matter), named by a hash of
    the sorted list; no sources (static servers only) need no file."""
    if setting != AUTO:
        return setting
    names = sorted(set(sources))
    directory = cache_dir(env)
    if not names or not directory:
        return ""
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return os.path.join(directory, f"discovery-{digest}.json")


def write_cache(path: str, views: Mapping[str, View], make_dir: bool = False) -> None:
    """Atomically: a reader (another worker, the next start) sees the old file or the new one.

    `make_dir`: create the file's directory first (mode 0700: the file names every server).
    Raises OSError (the temporary file removed) when the file cannot be written."""
    doc = {
        "version": 1,
        "sources": {n: {m: {"servers": list(u)} for m, u in v.items()} for n, v in views.items()},
    }
    # A name of its own per write: workers (and edges in one process) may write at once.
    tmp = f"{path}.{os.getpid()}.{next(_WRITES)}.tmp"
    if make_dir:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(orjson.dumps(doc))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Discovery:
    """Keeps `view.fleet` equal to the merge of every source's last good view.

    `outcomes` counts source reads by outcome (ok, not_modified, error), for
    `edge_discovery_refreshes_total{outcome}`; `on_result(ok)` is told of each read as it ends.
    """

    def __init__(
        self,
        settings: DiscoverySettings,
        static: Mapping[str, tuple[str, ...]],
        table: HostTable,
        view: FleetView,
        session: aiohttp.ClientSession,
        on_result: Callable[[bool], None] | None = None,
        env: Mapping[str, str] | None = None,
        guard: AbstractContextManager[object] | None = None,
    ) -> None:
        self.settings = settings
        # Held while the new fleet is built and swapped in (hosts no source names are marked
        # removed): the direct-host library (edge/direct/router.py) routes in its callers'
        # threads while discovery runs on a loop of its own. The server's one loop needs none.
        self.guard = guard or contextlib.nullcontext()
        self.env = os.environ if env is None else env  # where "auto" puts the cache file
        self.static = parse_registry({m: {"servers": list(s)} for m, s in static.items()})
        self.table = table
        self.view = view
        self.session = session
        self.on_result = on_result
        self.sources = [Source(name) for name in settings.sources]
        self.refreshes = 0
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.cache_file = cache_path(settings.cache_file, settings.sources, self.env)
        self._cache_loaded = False
        self._cache_warned = False
        if settings.cache_file == AUTO and settings.sources and not self.cache_file:
            self._cache_failed("(auto)", OSError("no HOME, XDG_CACHE_HOME or CACHE_DIRECTORY"))
        self._written: dict[str, View] | None = None

    def reconfigure(
        self, settings: DiscoverySettings, static: Mapping[str, tuple[str, ...]]
    ) -> None:
        """New sources and static servers (SIGHUP); sources kept keep their last good view."""
        known = {s.name: s for s in self.sources}
        self.settings = settings
        self.static = parse_registry({m: {"servers": list(s)} for m, s in static.items()})
        self.sources = [known.get(name) or Source(name) for name in settings.sources]
        path = cache_path(settings.cache_file, settings.sources, self.env)
        if path != self.cache_file:  # another set of sources: its own file, read at the refresh
            self.cache_file, self._cache_loaded, self._written = path, False, None

    async def refresh(self) -> None:
        """Read every source once (concurrently) and swap in the merged fleet."""
        if not self._cache_loaded:
            await self._load_cache()
        await asyncio.gather(*(self._refresh_one(s) for s in self.sources))
        views = [self.static] + [s.view for s in self.sources if s.view is not None]
        merged = merge(views)
        with self.guard:
            self.view.fleet = self.table.build(merged)
        self.refreshes += 1
        await self._save_cache()

    async def _refresh_one(self, source: Source) -> None:
        try:
            view = await source.fetch(self.session, self.settings.timeout_s)
        except (TimeoutError, SourceError, aiohttp.ClientError, OSError, ValueError) as exc:
            self._failed(source, exc)
            return
        outcome = "not_modified" if view is None else "ok"
        if view is not None:
            source.view, source.cached = view, False
        if source.failures:
            log.info("discovery: %s answers again", source.name)
        source.failures = 0
        self._count(outcome)

    def _failed(self, source: Source, exc: BaseException) -> None:
        source.failures += 1
        # Logged when a source starts failing, then every 30th time: not every refresh_s.
        if source.failures % 30 == 1:
            log.warning(
                "discovery: %s failed (%s); keeping its last good view%s", source.name,
                exc or type(exc).__name__, " (from the cache file)" if source.cached else "",
            )  # fmt: skip
        self._count("error")

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        if self.on_result is not None:
            self.on_result(outcome != "error")

    async def _load_cache(self) -> None:
        self._cache_loaded = True
        path = self.cache_file
        if not path:
            return
        cached = await asyncio.to_thread(read_cache, path)
        for source in self.sources:
            if source.view is None and source.name in cached:
                source.view, source.cached = cached[source.name], True
        self._written = cached

    async def _save_cache(self) -> None:
        path = self.cache_file
        fresh = {s.name: s.view for s in self.sources if s.view is not None and not s.cached}
        if not path or not fresh:
            return
        # A source still on its cached view keeps that view in the file.
        names = {s.name for s in self.sources}
        views = {n: v for n, v in (self._written or {}).items() if n in names} | fresh
        if views == self._written:
            return
        try:
            await asyncio.to_thread(write_cache, path, views, self.settings.cache_file == AUTO)
        except OSError as exc:
            self._cache_failed(path, exc)
            return
        self._written, self._cache_warned = views, False

    def _cache_failed(self, path: str, exc: OSError) -> None:
        # Tried again at each refresh (a failed open costs nothing), but said once: the edge
        # serves without the file, it only cannot start from it while a registry is down.
        if self._cache_warned:
            return
        self._cache_warned = True
        auto = self.settings.cache_file == AUTO
        hint = " (set [discovery] cache_file, or CacheDirectory= under systemd)" if auto else ""
        log.warning(
            "discovery: cannot write the cache file %s: %s; serving without it%s",
            path, exc.strerror or exc, hint,
        )  # fmt: skip

    async def run(self) -> None:
        """Refresh every `refresh_s`, jittered so that replicas do not poll in step."""
        if not self.sources:
            return
        while True:
            period = self.settings.refresh_s
            await asyncio.sleep(period * random.uniform(0.8, 1.2))
            await self.refresh()

    def __repr__(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in self.outcomes.items())
        return f"<Discovery sources={len(self.sources)} refreshes={self.refreshes} {counts}>"
