"""Choosing a host: synchronous, no I/O, decided before any await.

Least in-flight, with ties broken by a rotating cursor so that idle hosts share light traffic
evenly instead of the first host taking every request.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from edge.fleet import Host


class Balancer:
    __slots__ = ("_cursor",)

    def __init__(self) -> None:
        self._cursor = 0

    def pick(self, hosts: Sequence[Host], exclude: Collection[Host] = ()) -> Host | None:
        """The least-loaded host not in `exclude`, or None when none is left."""
        n = len(hosts)
        if n == 0:
            return None
        self._cursor = start = (self._cursor + 1) % n
        best: Host | None = None
        for i in range(n):
            host = hosts[(start + i) % n]
            if host in exclude:
                continue
            if best is None or host.inflight < best.inflight:
                best = host
        return best

    def __repr__(self) -> str:
        return f"<Balancer cursor={self._cursor}>"
