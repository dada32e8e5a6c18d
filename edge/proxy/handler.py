"""The request handler: the edge's own endpoints, the proxied path, and errors in each API's shape.

The handler of edge/http/server.py's server: no router, no middlewares. An exact-path
dictionary answers the edge's own endpoints; everything under /v1/ and /v1beta/models/ is
proxied. An EdgeError raised anywhere below becomes the error body of the dialect the client
spoke (OpenAI, Anthropic or Google), with the right status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import orjson

from edge.access.auth import Admission, Gate, Principal, passthrough_check
from edge.config import LogSettings, ServerSettings
from edge.errors import EdgeError, MethodNotAllowed, NotFound
from edge.http.server import Reply, Request
from edge.observe.accesslog import AccessLog, KeyUse
from edge.observe.metrics import CONTENT_TYPE, Metrics, Observation, Usage
from edge.proxy.forward import Forwarder, RequestIds, upstream_headers
from edge.proxy.relay import relay
from edge.proxy.route import ANTHROPIC, GEMINI, dialect_of, is_proxied, parse, split_workspace
from edge.routing.fleet import Fleet, FleetView
from edge.routing.health import describe

log = logging.getLogger("edge.server")

JSON = "application/json"
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    405: "UNIMPLEMENTED", 408: "DEADLINE_EXCEEDED", 413: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE",
}  # fmt: skip
_ANTHROPIC_TYPE = {
    401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
}  # fmt: skip


def error_body(err: EdgeError, dialect: str) -> bytes:
    if dialect == ANTHROPIC:
        kind = _ANTHROPIC_TYPE.get(err.status, "invalid_request_error")
        if err.status >= 500 and err.status != 503:
            kind = "api_error"
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": err.message}})
    if dialect == GEMINI:
        status = _GOOGLE_STATUS.get(err.status, "INTERNAL")
        return orjson.dumps(
            {"error": {"code": err.status, "message": err.message, "status": status}}
        )
    body = {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}
    # `detail` is the key LibertAI clients read; `error` is OpenAI's shape.
    return orjson.dumps({"error": body, "detail": err.message})


def error_reply(err: EdgeError, dialect: str, rid: str | None = None) -> Reply:
    lines = [f"{name}: {value}\r\n" for name, value in (err.headers or {}).items()]
    if rid:
        lines.append(f"X-Request-ID: {rid}\r\n")
    headers = "".join(lines).encode("latin-1", "replace")
    return Reply(error_body(err, dialect), err.status, JSON, headers)


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
    """The http1.Server handler for one worker."""

    def __init__(
        self,
        view: FleetView,
        forwarder: Forwarder,
        metrics: Metrics,
        settings: ServerSettings,
        life: Lifecycle,
        gate: Gate | None = None,
        access: AccessLog | None = None,
    ) -> None:
        self.view = view
        self.access = access or AccessLog(LogSettings())  # default: off
        self.gate = gate  # None in passthrough mode: the proxy path then does no auth work
        self.forwarder = forwarder
        self.balancer = forwarder.balancer
        self.metrics = metrics
        self.settings = settings
        self.request_id = RequestIds()
        self._cookie: tuple[str | None, bytes] = (None, b"")  # the last Set-Cookie, rendered
        local = _Local(view, metrics, life)
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
        await self._proxy(request)

    async def _proxy(self, request: Request) -> None:
        started = time.monotonic()
        rid = self.request_id(request)
        model, route = "", "unknown"
        asked, bytes_in, exchange_at = "", 0, 0.0  # for the final observation
        gate, status = self.gate, 499
        adm: Admission | None = None
        principal: Principal | None = None
        usage: Usage | None = None
        try:
            # The key is checked before the body is read: no 32 MB upload from a stranger.
            principal = gate.identify(request) if gate is not None else None
            preq = await parse(request)
            route = preq.route
            asked, bytes_in = preq.model, len(preq.body)
            hosts = self.view.fleet.hosts(preq.model)
            if not hosts:
                raise _unknown_model(preq.model)
            model = preq.model
            # Routing (balance.py): policy, X-Edge-Server pin (400 if unknown), affinity target.
            decision = self.balancer.decide(model, hosts, preq.doc, request.headers)
            if gate is not None:
                adm = await gate.admit(principal, preq, hosts)
            headers = upstream_headers(request, rid, adm.upstream if adm is not None else None)
            exchange_at = time.monotonic()
            up = await self.forwarder.open(preq, hosts, headers, decision)
            try:
                extra = b"X-Request-ID: %b\r\n" % rid.encode("latin-1", "replace")
                if self.settings.expose_server:
                    extra += b"X-Edge-Server: %b\r\n" % up.host.url.encode()
                cookie = self.balancer.served(decision, up.host, request.secure)
                if cookie is not None:  # re-signed each second, so rendered once a second too
                    if cookie is not self._cookie[0]:
                        self._cookie = (cookie, b"Set-Cookie: %b\r\n" % cookie.encode())
                    extra += self._cookie[1]
                if adm is not None:
                    lines = "".join(f"{name}: {value}\r\n" for name, value in adm.headers.items())
                    extra += lines.encode("latin-1", "replace")
                done = await relay(request, up, preq.dialect, extra)
                status, usage = done.status, done.usage
                first_at = up.started + up.ttfb_s  # the upstream's first body byte arrived
                self._finish(
                    Observation(
                        model, up.host, route, done.status, done.outcome,
                        time.monotonic() - started, up.ttfb_s, done.bytes_out, done.usage,
                        attempt=up.attempt, bytes_in=bytes_in, stream=preq.stream,
                        first_byte_s=done.first_sent_at - started,
                        stream_s=done.ended_at - first_at,
                        upstream_s=first_at - exchange_at + done.ended_at - done.first_sent_at,
                        affinity=decision.affinity,
                    ),
                    rid, request, asked, principal,
                )  # fmt: skip
            finally:
                self.forwarder.done(up)
        except EdgeError as err:
            status = err.status
            now = time.monotonic()
            self._finish(
                Observation(
                    model, None, route, err.status, "edge_error", now - started,
                    attempt=getattr(err, "attempts", 0), bytes_in=bytes_in,
                    upstream_s=now - exchange_at if exchange_at else 0.0,
                ),
                rid, request, asked, principal,
            )  # fmt: skip
            request.conn.reply(request, error_reply(err, dialect_of(request.path), rid))
        except asyncio.CancelledError:
            now = time.monotonic()
            self._finish(
                Observation(
                    model, None, route, 499, "client_disconnect", now - started,
                    bytes_in=bytes_in, upstream_s=now - exchange_at if exchange_at else 0.0,
                ),
                rid, request, asked, principal,
            )  # fmt: skip
            raise
        finally:
            if adm is not None and gate is not None:
                gate.release(adm, model, status, usage)

    def _finish(
        self, obs: Observation, rid: str, request: Request, asked: str,
        principal: Principal | None,
    ) -> None:  # fmt: skip
        """A request's final observation: metrics, host statistics and the access log."""
        self.metrics.observe(obs)
        if self.access.enabled:
            key = self._key_use(principal, obs.model, obs.usage)
            self.access.write(obs, rid, request.remote, asked, key)

    def _key_use(
        self, principal: Principal | None, model: str, usage: Usage | None
    ) -> KeyUse | None:
        """For the access log: which key (its short id), its workspace, and what it cost."""
        if principal is None or self.gate is None:
            return None
        cost = self.gate.meter.cost_of(model, usage) if usage is not None and model else None
        return principal.key_id, principal.workspace, cost

    def __repr__(self) -> str:
        return f"<EdgeHandler {self.view!r} {self.forwarder!r}>"


def _unknown_model(model: str) -> NotFound:
    shown = model if len(model) <= 200 else model[:200] + "..."
    return NotFound(
        f"The model '{shown}' does not exist here; GET /v1/models lists the models served.",
        param="model",
        code="model_not_found",
    )
