"""Hosts and the fleet: the routing state, with no I/O.

A `Host` is one upstream server, identified by its normalised URL. Its live counters (in-flight,
health, statistics) are mutated only on the worker's event loop, so they need no locks, and on
the request path only by an attempt's end (edge/routing/attempt.py). A `Fleet` is an
immutable snapshot model -> hosts; discovery builds a new one and swaps the reference, so a
request that already holds a snapshot never sees it change under it.

`HostTable` keeps Host objects by URL across snapshots: a server that stays in the registry keeps
its statistics when the fleet is rebuilt.

A host can also be held (`Host.held_until`): it answered 429 or 503 with a Retry-After, so it
takes no new request before then (edge/routing/plan.py's `Plan.hold` sets it, per worker, like
health). Held is busy, not broken: the host stays routable for metrics and /ready and its health
is untouched; only the picking skips it (health.candidates, health.fallback).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final
from urllib.parse import urlsplit

from edge.routing.stats import HostStats

_DEFAULT_PORTS = {"http": 80, "https": 443}

# Health states (health.py owns the transitions; REMOVED is set here, when discovery drops a host).
UP: Final = "up"  # takes requests
EJECTED = "ejected"  # out until `until`; then routable for one half-open trial
HALF_OPEN = "half_open"  # that trial is in flight: no other request goes here
DOWN = "down"  # active probes failed; out until they succeed again
REMOVED = "removed"  # no source names it any more; in-flight streams finish on it
# Probe ranks per model: /health/{model} said loaded (200), loadable on demand (202), or failed.
LOADED, LOADABLE, PROBE_FAILED = 0, 1, 2


def normalise_url(url: str) -> str:
    """Canonical identity of a server URL: lower-case scheme and host, no default port, no
    trailing slash, no query or fragment. Raises ValueError for anything not http(s)."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an http(s) server URL: {url!r}")
    if parts.username or parts.password:
        raise ValueError("server URLs must not carry credentials")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


class Host:
    """One upstream server and its live counters (owned by one worker's loop)."""

    __slots__ = (
        "url", "inflight", "requests", "stats", "state", "until", "fails_in_row",
        "level", "probe_ok", "probe_fail", "ranks", "restored_at", "held_until",
    )  # fmt: skip

    def __init__(self, url: str) -> None:
        self.url = url
        self.inflight = 0
        self.requests = 0
        self.stats = HostStats()
        # Health (health.py): the state, when an ejection ends, failed attempts in a row, how
        # many ejections the next one doubles from, probe streaks, per-model probe ranks (None:
        # loaded everywhere, the common case, so routing skips the ranking).
        self.state = UP
        self.until = 0.0
        self.fails_in_row = 0
        self.level = 0
        self.probe_ok = 0
        self.probe_fail = 0
        self.ranks: dict[str, int] | None = None
        self.restored_at = 0.0
        # Retry-After: no new request before this (monotonic); 0.0 when not held, which keeps
        # the check in health.candidates' common case to one float compare. Only ever extended
        # (Plan.hold); candidates puts an expired hold back to 0.0.
        self.held_until = 0.0

    def routable_at(self, now: float) -> bool:
        """New requests may come here: up, or ejected and due for its half-open trial. The one
        routable check: health.candidates filters the pool with it, metrics and /ready read it.
        A Retry-After hold is not part of it (busy is not down): candidates checks that apart."""
        return self.state == UP or (self.state == EJECTED and self.until <= now)

    def rank(self, model: str) -> int:
        ranks = self.ranks
        return LOADED if ranks is None else ranks.get(model, LOADED)

    def __repr__(self) -> str:
        return (
            f"<Host {self.url} {self.state} inflight={self.inflight} requests={self.requests} "
            f"fails_in_row={self.fails_in_row}>"
        )


@dataclass(frozen=True, slots=True)
class Fleet:
    """An immutable snapshot: each model and the hosts that serve it."""

    models: Mapping[str, tuple[Host, ...]]

    def hosts(self, model: str) -> tuple[Host, ...] | None:
        return self.models.get(model)

    def host_count(self) -> int:
        return len({h.url for hosts in self.models.values() for h in hosts})

    def __repr__(self) -> str:
        return f"<Fleet models={len(self.models)} hosts={self.host_count()}>"


class HostTable:
    """Host objects by URL, so statistics survive fleet rebuilds."""

    __slots__ = ("_hosts",)

    def __init__(self) -> None:
        self._hosts: dict[str, Host] = {}

    def build(self, view: Mapping[str, Iterable[str]]) -> Fleet:
        """A Fleet from model -> URLs (already normalised); forgets hosts no model names.

        A forgotten host is marked REMOVED: requests that still hold it (a stream in flight, a
        snapshot taken just before) finish on it, but no retry or new request picks it."""
        models: dict[str, tuple[Host, ...]] = {}
        live: dict[str, Host] = {}
        for model, urls in view.items():
            hosts = []
            for url in dict.fromkeys(urls):
                host = live.get(url) or self._hosts.get(url) or Host(url)
                live[url] = host
                hosts.append(host)
            if hosts:
                models[model] = tuple(hosts)
        for url, host in self._hosts.items():
            if url not in live:
                host.state = REMOVED
        self._hosts = live
        return Fleet(MappingProxyType(models))

    def __len__(self) -> int:
        return len(self._hosts)

    def __repr__(self) -> str:
        return f"<HostTable hosts={len(self._hosts)}>"


class FleetView:
    """The one mutable reference to the current Fleet; discovery swaps it whole."""

    __slots__ = ("fleet",)

    def __init__(self, fleet: Fleet | None = None) -> None:
        self.fleet = fleet or Fleet(MappingProxyType({}))

    def __repr__(self) -> str:
        return f"<FleetView {self.fleet!r}>"
