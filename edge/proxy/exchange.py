"""One proxied request, top to bottom: key, body, routing decision, admission, attempts, relay,
and the record of what happened.

`Proxy` holds what every request of a worker shares (the fleet view, the forwarder, the gate,
metrics, the access log); `Exchange` is one request's state, built per request so that the steps
read in order and the record at the end sees everything they learnt. An EdgeError raised by any
step becomes the error body of the client's dialect; a client that leaves cancels the task, and
the record says so; every path releases the admission and ends the attempt.
"""

from __future__ import annotations

import asyncio
import time
from contextvars import Token

from edge.access.auth import Admission, Gate, Principal
from edge.config import ServerSettings
from edge.dialects.errors import error_body
from edge.dialects.paths import dialect_of
from edge.errors import EdgeError, NotFound, Unavailable
from edge.http.heads import render
from edge.http.server import Reply, Request
from edge.observe.accesslog import AccessLog, KeyUse
from edge.observe.metrics import Metrics
from edge.observe.record import RequestRecord, Usage
from edge.observe.tracing import CURRENT, RequestTrace, Tracing, trace_id_of
from edge.proxy.fallback import CONTEXT_LENGTH, REFUSALS, UNAVAILABLE, fallback_models, too_long
from edge.proxy.forward import Forwarder, Upstream
from edge.proxy.outbound import RequestIds, upstream_headers
from edge.proxy.relay import Relayed, relay, relay_translated
from edge.proxy.route import ProxyRequest, parse, retarget
from edge.routing.attempt import OK, STREAM_ERROR
from edge.routing.balance import Decision
from edge.routing.fleet import FleetView, Host

JSON = "application/json"


def error_reply(
    err: EdgeError, dialect: str, rid: str | None = None, trace_id: str | None = None,
    traced: bytes = b"",
) -> Reply:  # fmt: skip
    """An EdgeError as a whole reply: its status, its headers, its body in `dialect`'s shape
    (with the request's trace id when it has one; `traced`: the traceresponse field)."""
    fields = list(err.headers.items()) if err.headers else []
    if rid:
        fields.append(("X-Request-ID", rid))
    body = error_body(err, dialect, trace_id)
    return Reply(body, err.status, JSON, render(fields) + traced)


class Proxy:
    """What the proxied requests of one worker share."""

    def __init__(
        self,
        view: FleetView,
        forwarder: Forwarder,
        metrics: Metrics,
        settings: ServerSettings,
        gate: Gate | None,
        access: AccessLog,
    ) -> None:
        self.view = view
        self.forwarder = forwarder
        self.balancer = forwarder.balancer
        self.metrics = metrics
        self.settings = settings
        self.gate = gate  # None in passthrough mode: the proxy path then does no auth work
        self.access = access
        self.request_id = RequestIds()
        self.cookie: tuple[str | None, bytes] = (None, b"")  # the last Set-Cookie, rendered
        # [tracing] on (set by app.Worker): spans of the sampled requests; None costs one check.
        self.tracer: Tracing | None = None

    async def __call__(self, request: Request) -> None:
        await Exchange(self, request).run()

    def __repr__(self) -> str:
        return f"<Proxy {self.view!r} {self.forwarder!r}>"


class Exchange:
    """One proxied request's state, from its head to its record."""

    __slots__ = (
        "proxy", "request", "rid", "started", "model", "asked", "route", "bytes_in", "sent_at",
        "principal", "adm", "status", "usage", "trace",
    )  # fmt: skip

    def __init__(self, proxy: Proxy, request: Request) -> None:
        self.proxy = proxy
        self.request = request
        self.rid = proxy.request_id(request)
        self.started = time.monotonic()
        self.model = ""  # set once the model is known to be served here
        self.asked = ""  # the model the body named, served or not (the access log's)
        self.route = "unknown"
        self.bytes_in = 0
        self.sent_at = 0.0  # when the first attempt was about to start
        self.principal: Principal | None = None
        self.adm: Admission | None = None
        self.status = 499  # until answered: nginx's code for a client that left first
        self.usage: Usage | None = None
        self.trace: RequestTrace | None = None  # set in `run` when the request is traced

    async def run(self) -> None:
        token: Token[RequestTrace | None] | None = None
        tracer = self.proxy.tracer
        if tracer is not None:  # [tracing] on: sampled or not, decided once, here
            self.trace = tracer.begin(self.request, self.rid, self.started)
            if self.trace is not None:  # its attempts and waits find it (this task only)
                token = CURRENT.set(self.trace)
        try:
            up, preq, decision = await self._open()
            try:
                extra = self._extra(up, decision)
                if up.translation is None:
                    done = await relay(self.request, up, preq.dialect, extra)
                else:  # the host does not speak the client's dialect (edge/proxy/translate.py)
                    self.proxy.metrics.translated(preq.dialect)
                    done = await relay_translated(self.request, up, up.translation, extra)
                self._record(up, preq, decision, done)
            finally:
                self.proxy.forwarder.done(up)
        except EdgeError as err:
            self._refused(err)
        except asyncio.CancelledError:
            self._abandoned()
            raise
        finally:
            if self.adm is not None and self.proxy.gate is not None:
                self.proxy.gate.release(self.adm, self.model, self.status, self.usage)
            if token is not None:  # a pipelined request's task is made from this context
                CURRENT.reset(token)

    async def _open(self) -> tuple[Upstream, ProxyRequest, Decision]:
        """Everything before the first byte: the key (checked before the body is read: no 32 MB
        upload from a stranger), the body, the hosts, routing, admission, the attempts."""
        proxy, request, gate = self.proxy, self.request, self.proxy.gate
        self.principal = gate.identify(request) if gate is not None else None
        preq = await parse(request)
        self.route, self.asked, self.bytes_in = preq.route, preq.model, len(preq.body)
        hosts = proxy.view.fleet.hosts(preq.model)
        if not hosts:
            raise _unknown_model(preq.model)
        self.model = preq.model
        # Routing (edge/routing/balance.py): policy, X-Edge-Server pin (400 if unknown), affinity.
        decision = proxy.balancer.decide(preq.model, hosts, preq.doc, request.headers)
        trace = self.trace
        if gate is not None:
            admitting = time.monotonic() if trace is not None else 0.0
            self.adm = await gate.admit(self.principal, preq, hosts)
            if trace is not None:  # the key's limits: a round trip to Redis when shared
                shared = {"edge.limits.shared": gate.link is not None}
                trace.child("edge.admission", admitting, time.monotonic(), shared)
        adm = self.adm
        keys = adm.upstream if adm is not None else None
        headers = upstream_headers(request, self.rid, keys, trace is not None)
        self.sent_at = time.monotonic()
        queueing = proxy.forwarder.queueing
        if queueing is not None:  # [admission]: wait for a slot, nothing sent (queueing.py)
            # After sent_at: a wait for the fleet is not the edge's overhead.
            ticket = queueing.ticket(request, self.principal, preq.workspace, preq.model)
            await queueing.wait(preq.model, hosts, ticket)
            if trace is not None:  # the wait for a slot, as its own span (0 s when none)
                queued = {"edge.queue.priority": ticket.priority}
                trace.child("edge.queue", self.sent_at, time.monotonic(), queued)
        # Nothing is awaited inside an `except` block: compiled by mypyc, a coroutine suspended
        # there leaves its exception current for the whole loop (edge/proxy/relay.py says more).
        try:
            up: Upstream | None = await proxy.forwarder.open(preq, hosts, headers, decision)
        except Unavailable as exc:
            if not self._fallbacks(preq, decision):
                raise
            up, failed = None, exc
        if up is None:
            models = self._fallbacks(preq, decision)
            return await self._fall_back(models, preq, headers, decision, failed)
        if up.response.status in REFUSALS:  # the happy path's one check
            models = self._fallbacks(preq, decision)
            if models and await self._too_long(up):
                return await self._fall_back(models, preq, headers, decision, up)
        return up, preq, decision

    def _fallbacks(self, preq: ProxyRequest, decision: Decision) -> list[str]:
        """The models this request may move to (edge/proxy/fallback.py): none for a request
        pinned to a server (X-Edge-Server names one server of one model)."""
        listed = preq.doc.get("models")
        routing = self.proxy.balancer.settings.models.get(preq.model)
        configured = routing.fallbacks if routing is not None else ()
        if decision.pinned or (listed is None and not configured):
            return []
        principal = self.principal
        allowed = principal.models if principal is not None else ()
        return fallback_models(preq.model, listed, configured, self.proxy.view.fleet, allowed)

    async def _fall_back(
        self, models: list[str], preq: ProxyRequest, headers: bytes, decision: Decision,
        last: Upstream | Unavailable,
    ) -> tuple[Upstream, ProxyRequest, Decision]:  # fmt: skip
        """The next models in turn, after `last` (the 503 of every host of `preq.model`, or a
        host's answer that the request is longer than the model's context): each with its own
        hosts and routing decision; the admission, taken once, holds for all. When none
        answers, the client gets the last failure: that context answer as the host wrote it,
        or a 503 naming every server tried, model by model."""
        proxy, asked = self.proxy, preq.model
        notes: list[str] = []  # why each model left behind failed, for that 503
        tries = 0  # attempts made on the models left behind
        for model in models:
            hosts = proxy.view.fleet.hosts(model)
            moved = retarget(preq, model) if hosts else None
            if hosts is None or moved is None:
                continue  # no longer served (a new fleet), or not a name a path can hold
            tries += self._leave(last, preq.model, model, notes)
            preq, self.model = moved, model
            decision = proxy.balancer.decide(model, hosts, moved.doc, self.request.headers)
            try:
                last = await proxy.forwarder.open(moved, hosts, headers, decision)
            except Unavailable as failed:
                last = failed
                continue
            if last.response.status in REFUSALS and await self._too_long(last):
                continue
            last.tries += tries
            return last, preq, decision
        if isinstance(last, Upstream):
            last.tries += tries
            return last, preq, decision  # the last host's context answer, unchanged
        self.model = asked  # nobody answered: the request's own model is recorded
        raise _exhausted(last, notes, tries)

    async def _too_long(self, up: Upstream) -> bool:
        """fallback.too_long, and `up` ended if the client leaves meanwhile (nothing else
        holds it yet)."""
        try:
            return await too_long(up)
        except BaseException:
            self.proxy.forwarder.done(up)
            raise

    def _leave(self, last: Upstream | Unavailable, model: str, to: str, notes: list[str]) -> int:
        """`model` is left for `to`: the metric, the note for a final 503, and the abandoned
        answer ended (the host answered well: its attempt is a success). The attempts made."""
        if isinstance(last, Unavailable):
            self.proxy.metrics.fell_back(model, to, UNAVAILABLE)
            notes.append(last.message)
            return last.attempts
        self.proxy.metrics.fell_back(model, to, CONTEXT_LENGTH)
        notes.append(_too_long_note(model, last.host))
        last.attempt.finish(OK, time.monotonic())
        self.proxy.forwarder.done(last)
        return last.tries

    def _extra(self, up: Upstream, decision: Decision) -> bytes:
        """The edge's own response headers: the request id, the serving host (when exposed),
        the affinity cookie, the admission's (rate limit) fields."""
        proxy = self.proxy
        extra = b"X-Request-ID: %b\r\n" % self.rid.encode("latin-1", "replace")
        if proxy.settings.expose_server:
            extra += b"X-Edge-Server: %b\r\n" % up.host.url.encode()
        cookie = proxy.balancer.served(decision, up.host, self.request.secure)
        if cookie is not None:  # re-signed each second, so rendered once a second too
            if cookie is not proxy.cookie[0]:
                proxy.cookie = (cookie, b"Set-Cookie: %b\r\n" % cookie.encode())
            extra += proxy.cookie[1]
        if self.adm is not None:
            extra += render(self.adm.headers.items())
        if self.model != self.asked:  # a fallback model answered (only then: no bytes added)
            extra += render([("X-Edge-Model", self.model)])
        if self.trace is not None:  # the span this answer belongs to (W3C traceresponse)
            extra += self.trace.traceresponse
        return extra

    def _record(self, up: Upstream, preq: ProxyRequest, decision: Decision, done: Relayed) -> None:
        """The answer went out: the attempt's end, then the request's record."""
        self.status, self.usage = done.status, done.usage
        attempt = up.attempt
        tokens = done.usage.completion_tokens if done.usage is not None else None
        attempt.finish(OK if done.outcome == "ok" else STREAM_ERROR, done.ended_at, tokens)
        first_at = attempt.started + (attempt.ttfb_s or 0.0)  # the upstream's first body byte
        self._write(
            RequestRecord(
                self.model, up.host, self.route, done.status, done.outcome,
                time.monotonic() - self.started, done.bytes_out, done.usage, up.tries,
                self.bytes_in, preq.stream, done.first_sent_at - self.started,
                done.ended_at - first_at,
                first_at - self.sent_at + done.ended_at - done.first_sent_at, decision.affinity,
            )
        )  # fmt: skip

    def _refused(self, err: EdgeError) -> None:
        """Answered by the edge itself: the record, then the error in the client's dialect."""
        self.status = err.status
        now = time.monotonic()
        self._write(
            RequestRecord(
                self.model, None, self.route, err.status, "edge_error", now - self.started,
                attempts=getattr(err, "attempts", 0), bytes_in=self.bytes_in,
                upstream_s=now - self.sent_at if self.sent_at else 0.0,
            )
        )  # fmt: skip
        request, trace = self.request, self.trace
        traced = trace.traceresponse if trace is not None else b""
        reply = error_reply(err, dialect_of(request.path), self.rid, self._trace_id(), traced)
        request.conn.reply(request, reply)

    def _abandoned(self) -> None:
        now = time.monotonic()
        self._write(
            RequestRecord(
                self.model, None, self.route, 499, "client_disconnect", now - self.started,
                bytes_in=self.bytes_in, upstream_s=now - self.sent_at if self.sent_at else 0.0,
            )
        )  # fmt: skip

    def _write(self, record: RequestRecord) -> None:
        """The request's record: metrics, the access log and, when traced, the spans."""
        proxy = self.proxy
        proxy.metrics.finished(record)
        if proxy.access.enabled:
            request = self.request
            key, trace_id = self._key_use(), self._trace_id()
            proxy.access.write(record, self.rid, request.remote, self.asked, key, trace_id)
        if self.trace is not None:
            dialect = dialect_of(self.request.path)
            self.trace.finish(record, self.asked, dialect, self._key_use())

    def _trace_id(self) -> str | None:
        """The request's W3C trace id: its trace's, else the client's traceparent's (read only
        now: nobody asked for it before)."""
        if self.trace is not None:
            return self.trace.trace_id
        return trace_id_of(self.request.headers)

    def _key_use(self) -> KeyUse | None:
        """For the access log: which key (its short id), its workspace, and what it cost."""
        principal, gate, usage = self.principal, self.proxy.gate, self.usage
        if principal is None or gate is None:
            return None
        cost = gate.meter.cost_of(self.model, usage) if usage is not None and self.model else None
        return principal.key_id, principal.workspace, cost

    def __repr__(self) -> str:
        return f"<Exchange {self.rid} {self.route} {self.model} {self.status}>"


def _unknown_model(model: str) -> NotFound:
    shown = model if len(model) <= 200 else model[:200] + "..."
    return NotFound(
        f"The model '{shown}' does not exist here; GET /v1/models lists the models served.",
        param="model",
        code="model_not_found",
    )


def _too_long_note(model: str, host: Host) -> str:
    return f"Model '{model}': {host.url} answered that the request is longer than its context."


def _exhausted(last: Unavailable, notes: list[str], tries: int) -> Unavailable:
    """The last model's 503, naming what happened on the models tried before it too."""
    if not notes:
        return last
    failed = Unavailable("\n".join([*notes, last.message]))
    failed.headers.update(last.headers)
    failed.attempts = tries + last.attempts
    return failed
