"""The request handler: the edge's own endpoints, and the proxied path.

The handler of edge/http/server.py's server: no router, no middlewares. An exact-path
dictionary answers the edge's own endpoints; everything under /v1/ and /v1beta/models/ is
proxied, one `Exchange` per request (edge/proxy/exchange.py). An EdgeError becomes the error body
of the dialect the client spoke (OpenAI, Anthropic or Google), with the right status.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import orjson

from edge.access.auth import passthrough_check
from edge.dialects.paths import dialect_of, split_workspace
from edge.errors import EdgeError, MethodNotAllowed, NotFound
from edge.http.server import Reply, Request
from edge.observe.metrics import CONTENT_TYPE, Metrics
from edge.proxy.exchange import Proxy, error_reply
from edge.proxy.route import is_proxied
from edge.routing.fleet import Fleet, FleetView
from edge.routing.health import describe


class Lifecycle:
    """Whether the edge takes new work; `/ready` and the drain read it."""

    __slots__ = ("draining",)

    def __init__(self) -> None:
        self.draining = False

    def __repr__(self) -> str:
        return f"<Lifecycle draining={self.draining}>"


class _Local:
    """Answers for the edge's own endpoints, cached per fleet snapshot where they depend on it."""

    def __init__(self, view: FleetView, metrics: Metrics, life: Lifecycle) -> None:
        self.view, self.metrics, self.life = view, metrics, life
        self._cached_for: Fleet | None = None
        self._models = self._registry = b""

    def _refresh(self) -> None:
        fleet = self.view.fleet
        if fleet is self._cached_for:
            return
        created = int(time.time())
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": "edge"}
            for m in fleet.models
        ]  # fmt: skip
        self._models = orjson.dumps({"object": "list", "data": data})
        self._registry = orjson.dumps(
            {m: {"servers": [h.url for h in hosts]} for m, hosts in fleet.models.items()}
        )
        self._cached_for = fleet

    async def models(self, request: Request) -> Reply:
        self._refresh()
        return Reply(self._models)

    async def registry(self, request: Request) -> Reply:
        self._refresh()
        return Reply(self._registry)

    async def health(self, request: Request) -> Reply:
        return Reply(b'{"status":"ok"}')

    async def ready(self, request: Request) -> Reply:
        fleet = self.view.fleet
        servers = fleet.host_count()
        ready = servers > 0 and not self.life.draining
        state = "draining" if self.life.draining else ("ready" if ready else "no servers")
        now = time.monotonic()
        health = {h.url: describe(h, now) for hosts in fleet.models.values() for h in hosts}
        body = orjson.dumps({"status": state, "servers": servers, "health": health})
        return Reply(body, 200 if ready else 503)

    async def metrics_text(self, request: Request) -> Reply:
        return Reply(self.metrics.render(), content_type=CONTENT_TYPE)


Handler = Callable[[Request], Awaitable[Reply]]


class EdgeHandler:
    """The http.server.Server handler for one worker."""

    def __init__(self, proxy: Proxy, life: Lifecycle) -> None:
        self.proxy = proxy  # every path below /v1/ and /v1beta/models/
        gate = proxy.gate
        local = _Local(proxy.view, proxy.metrics, life)
        self._local: dict[str, Handler] = {
            "/v1/models": local.models,
            "/libertai/models": local.registry,
            "/health": local.health,
            "/ready": local.ready,
            "/metrics": local.metrics_text,
            "/libertai/auth/check": gate.check if gate is not None else passthrough_check,
        }

    async def __call__(self, request: Request) -> None:
        path = request.path
        local = self._local.get(path)
        if local is None and path.startswith("/api/") and split_workspace(path)[1] == "/v1/models":
            local = self._local["/v1/models"]
        try:
            if local is not None:
                if request.method not in ("GET", "HEAD"):
                    raise MethodNotAllowed(request.method, "GET")
                request.conn.reply(request, await local(request))
                return
            if not is_proxied(path):
                raise NotFound(f"No route for {path}.")
        except EdgeError as err:
            request.conn.reply(request, error_reply(err, dialect_of(path)))
            return
        await self.proxy(request)

    def __repr__(self) -> str:
        return f"<EdgeHandler {self.proxy!r}>"
