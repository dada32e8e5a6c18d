"""OpenTelemetry traces: one span per proxied request, a child span per attempt on a host, and
child spans for the waits in between (admission, the queue), exported over OTLP/HTTP.

Theory of operation
-------------------
Off (`[tracing] enabled = false`, the default) nothing here runs: the proxy holds no `Tracing`,
forwards a client's `traceparent` and `tracestate` as it forwards any field (so an engine that
traces joins the client's trace), and reads the client's trace id only when the access log or an
error body asks for it (edge/observe/tracecontext.py). The SDK is not even imported.

On, each request is decided once, when its exchange starts (`Tracing.begin`), parent-based as
OpenTelemetry's default sampler is: a client's sampled `traceparent` is traced, an unsampled one
is not, and a request without one is traced at `sample_ratio` (TraceIdRatioBased; for a
client's id with `parent_based = false`, decided from the id itself so that every replica
agrees). An unsampled request costs that decision and nothing else: `begin` returns None and no
span, id or attribute is made for it; the client's trace context still passes through.

A sampled request gets a `RequestTrace`, current for its task (`CURRENT`, a context variable:
hedges and continuations run in the same task or in tasks copied from it, so every attempt of
the request finds it without a parameter threaded through routing). Each attempt draws a span
id (`RequestTrace.attempt`) and the upstream request carries `traceparent: 00-<trace>-<that
span>-01` in place of the client's (the client's `tracestate` goes on with it), so the engine's
own spans (vLLM exports OpenTelemetry) are children of the attempt that called it. Nothing else
happens per attempt: the spans are built when the request ends (`finish`), from what the
attempts recorded (`Attempt`: start, first byte, outcome, end) and the request's record, with
the times they happened, and handed to the SDK's batch processor, whose thread encodes and
exports them off the event loop. The spans are plain records (`otlp.SpanData`) written as OTLP
protobuf by edge/observe/otlp.py, not the SDK's Tracer spans (which would sample again, keep a
lock per span and copy the context per call) nor its encoder (40 to 60 us per span): that is
what makes a traced request cost tens of microseconds, not hundreds.

Never in a span: a key (only its short id), a prompt, an answer, a query string, a header. The
request span holds the route, the models, the status, the usage counts, the key's short id and
workspace; an attempt span the server, its outcome, its time to first byte and why it was made
(first, retry, hedge, continuation, fallback).

Queue waits (edge/proxy, admission): `current()` gives the request's trace (None unless
sampled), and `trace.child("edge.queue", waited_from, now, {...})` records the wait as a child
span with its own times (time.monotonic() values, as every clock on the request path).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import random
import threading
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import urlsplit

from edge.config import ConfigError, TracingSettings
from edge.observe import otlp
from edge.observe.otlp import CLIENT, INTERNAL, SERVER, SpanData
from edge.observe.record import RequestRecord
from edge.observe.tracecontext import (
    SAMPLED,
    Headers,
    TraceParent,
    format_traceparent,
    incoming,
    new_span_id,
    new_trace_id,
    ratio_sampled,
    tracestate,
)
from edge.routing.attempt import CANCELLED, OK, STREAM_ERROR, Attempt

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger("edge.tracing")

KeyUse = tuple[str, str, float | None]  # the access log's: short key id, workspace, cost

# A sampled request's trace, for whatever runs in its task (its attempts, its queue waits).
CURRENT: ContextVar[RequestTrace | None] = ContextVar("edge_trace", default=None)

# The route -> GenAI's gen_ai.operation.name (the request span's name starts with it).
_OPERATIONS: Final = {
    "chat": "chat", "messages": "chat", "gemini": "generate_content",
    "completions": "text_completion", "embeddings": "embeddings",
}  # fmt: skip
# OTEL_TRACES_SAMPLER -> (ratio, parent-based); None: the ratio is OTEL_TRACES_SAMPLER_ARG.
_SAMPLERS: Final[dict[str, tuple[float | None, bool]]] = {
    "always_on": (1.0, False), "always_off": (0.0, False), "traceidratio": (None, False),
    "parentbased_always_on": (1.0, True), "parentbased_always_off": (0.0, True),
    "parentbased_traceidratio": (None, True),
}  # fmt: skip
_MODEL_MAX: Final = 128  # a client's model name is kept this long in a span


def current() -> RequestTrace | None:
    """The trace of the request running in this task; None when it is not sampled."""
    return CURRENT.get()


def trace_id_of(headers: Headers) -> str | None:
    """The request's W3C trace id for an error it is told of: its trace's when it is traced,
    else its client's `traceparent`'s (read only now: nobody asked before)."""
    trace = CURRENT.get()
    if trace is not None:
        return trace.trace_id
    parent = incoming(headers)
    return parent.trace_id if parent is not None else None


class Incoming(Protocol):
    """What `begin` reads of the request (edge.http.server.Request)."""

    @property
    def method(self) -> str: ...

    @property
    def path(self) -> str: ...

    @property
    def headers(self) -> Headers: ...

    @property
    def remote(self) -> str: ...


def sampling(settings: TracingSettings, env: Mapping[str, str]) -> tuple[float, bool]:
    """(ratio, parent-based): [tracing] sample_ratio when set, else OTEL_TRACES_SAMPLER and
    OTEL_TRACES_SAMPLER_ARG, else OpenTelemetry's default (parent-based, always on)."""
    if settings.sample_ratio >= 0.0:
        return settings.sample_ratio, settings.parent_based
    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if name not in _SAMPLERS:
        raise ConfigError(
            f"OTEL_TRACES_SAMPLER={name!r} is not supported here; use one of {', '.join(_SAMPLERS)}"
        )
    ratio, parent_based = _SAMPLERS[name]
    if ratio is None:
        try:
            ratio = float(env.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
        except ValueError:
            ratio = 1.0  # the specification's answer to an argument that is no number
        ratio = ratio if 0.0 <= ratio <= 1.0 else 1.0
    return ratio, parent_based


def build(settings: TracingSettings, env: Mapping[str, str] | None = None) -> Tracing | None:
    """One worker's `Tracing`, or None when tracing is off ([tracing] enabled false, or
    OTEL_SDK_DISABLED=true)."""
    env = os.environ if env is None else env
    if not settings.enabled or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    return Tracing(settings, env)


class Tracing:
    """One worker's tracer: decides each request, builds the spans of the sampled ones and hands
    them to the batch processor (which exports them over OTLP/HTTP from its own thread)."""

    def __init__(
        self, settings: TracingSettings, env: Mapping[str, str], exporter: Any = None
    ) -> None:
        self.settings = settings
        self.ratio, self.parent_based = sampling(settings, env)
        self.processor = _processor(settings, env, exporter)
        self.begun = 0  # requests sampled
        self.exported = 0  # spans handed to the processor
        self._servers: dict[str, tuple[str, int]] = {}

    def begin(self, request: Incoming, request_id: str, started: float) -> RequestTrace | None:
        """The request's trace when it is sampled; None (and nothing else done) when not."""
        parent = incoming(request.headers)
        if parent is None:
            if self.ratio < 1.0 and random.random() >= self.ratio:
                return None  # the same odds as TraceIdRatioBased on a fresh random id
            trace_id = new_trace_id()
        elif self.parent_based:
            if not parent.sampled:
                return None
            trace_id = parent.trace_id
        elif ratio_sampled(parent.trace_id, self.ratio):
            trace_id = parent.trace_id
        else:
            return None
        self.begun += 1
        return RequestTrace(self, trace_id, parent, request, request_id, started)

    def server(self, url: str) -> tuple[str, int]:
        """(server.address, server.port) of a host's URL; its credentials, path and query
        never reach a span."""
        found = self._servers.get(url)
        if found is None:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            found = self._servers[url] = (parts.hostname or "", port)
        return found

    def export(self, spans: list[SpanData]) -> None:
        on_end = self.processor.on_end
        for span in spans:
            on_end(span)
        self.exported += len(spans)

    def close(self) -> None:
        """Export what is queued (within [tracing] flush_timeout_s), then stop the processor's
        thread. Blocking: the drain runs it in a thread, so a collector on this loop still
        answers."""
        # The SDK's shutdown exports the queue but waits for an export's every retry (its flush
        # ignores its timeout: opentelemetry-python#4568), so it runs in a daemon thread waited
        # for this long at most: a collector that is down does not hold the process's exit.
        closing = threading.Thread(target=self.processor.shutdown, name="edge-tracing", daemon=True)
        closing.start()
        closing.join(self.settings.flush_timeout_s)

    def __repr__(self) -> str:
        return (
            f"<Tracing ratio={self.ratio} parent_based={self.parent_based} begun={self.begun} "
            f"exported={self.exported}>"
        )


class AttemptSpan:
    """One attempt of a traced request: the span id its upstream request carries as parent, and
    what the attempt itself does not keep (why it was made, the host's status)."""

    __slots__ = ("attempt", "span_id", "kind", "status", "header")

    def __init__(self, attempt: Attempt, span_id: str, kind: str, header: bytes) -> None:
        self.attempt = attempt
        self.span_id = span_id
        self.kind = kind  # first | retry | hedge | continuation | fallback
        self.status = 0  # the host's HTTP status, once its head came
        self.header = header  # the traceparent (and tracestate) fields sent upstream

    def __repr__(self) -> str:
        return f"<AttemptSpan {self.kind} {self.span_id} {self.attempt!r}>"


class _Child:
    __slots__ = ("name", "start", "end", "attributes")

    def __init__(self, name: str, start: float, end: float, attributes: dict[str, Any]) -> None:
        self.name, self.start, self.end, self.attributes = name, start, end, attributes


class RequestTrace:
    """A sampled request's trace: its ids, the attempts' span ids, and the waits recorded; its
    spans are built and exported once, by `finish`."""

    __slots__ = (
        "tracing", "trace_id", "span_id", "parent", "state", "started", "_mono", "_wall",
        "attempts", "children", "request", "request_id", "finished",
    )  # fmt: skip

    def __init__(
        self, tracing: Tracing, trace_id: str, parent: TraceParent | None, request: Incoming,
        request_id: str, started: float,
    ) -> None:  # fmt: skip
        self.tracing = tracing
        self.trace_id = trace_id
        self.span_id = new_span_id()  # the request span's
        self.parent = parent
        # The client's tracestate goes on only with its valid traceparent (the spec).
        self.state = tracestate(request.headers) if parent is not None else ""
        self.started = started
        self._mono, self._wall = time.monotonic(), time.time_ns()  # monotonic -> epoch ns
        self.attempts: list[AttemptSpan] = []
        self.children: list[_Child] = []
        self.request = request
        self.request_id = request_id
        self.finished = False

    @property
    def traceresponse(self) -> bytes:
        """The response field that names this request's span (W3C Trace Context Level 2)."""
        value = format_traceparent(self.trace_id, self.span_id, SAMPLED)
        return b"traceresponse: %b\r\n" % value.encode()

    def attempt(self, attempt: Attempt) -> AttemptSpan:
        """`attempt` just started: its span id, and the header fields that carry it upstream."""
        span_id = new_span_id()
        header = b"traceparent: %b\r\n" % format_traceparent(self.trace_id, span_id).encode()
        if self.state:  # as the client sent it: llhttp let no CR or LF through
            header += b"tracestate: %b\r\n" % self.state.encode("utf-8", "surrogateescape")
        span = AttemptSpan(attempt, span_id, self._kind(attempt), header)
        self.attempts.append(span)
        return span

    def _kind(self, attempt: Attempt) -> str:
        if not self.attempts:
            return "first"
        last = self.attempts[-1].attempt
        if any(not a.attempt.outcome for a in self.attempts):
            return "hedge"  # raced against an attempt still waiting for its first byte
        if last.model != attempt.model:
            return "fallback"
        if last.ttfb_s is not None and last.outcome == STREAM_ERROR:
            return "continuation"
        return "retry"

    def child(
        self, name: str, start: float, end: float, attributes: dict[str, Any] | None = None
    ) -> None:
        """A span under the request's for a wait (`start`, `end`: time.monotonic() values)."""
        self.children.append(_Child(name, start, end, attributes or {}))

    def finish(self, record: RequestRecord, asked: str, dialect: str, key: KeyUse | None) -> None:
        """The request is over: its spans, built and handed to the exporter (once)."""
        if self.finished:
            return
        self.finished = True
        trace_id, span_id = bytes.fromhex(self.trace_id), bytes.fromhex(self.span_id)
        spans = [self._request_span(record, asked, dialect, key, trace_id, span_id)]
        now = time.monotonic()
        spans += [self._attempt_span(a, trace_id, span_id, now) for a in self.attempts]
        spans += [self._child_span(c, trace_id, span_id) for c in self.children]
        self.tracing.export(spans)

    def _ns(self, t: float) -> int:
        return self._wall + int((t - self._mono) * 1e9)

    def _request_span(
        self, record: RequestRecord, asked: str, dialect: str, key: KeyUse | None,
        trace_id: bytes, span_id: bytes,
    ) -> SpanData:  # fmt: skip
        request, parent = self.request, self.parent
        attributes = _request_attributes(record, asked[:_MODEL_MAX], dialect, key)
        attributes["http.request.method"] = request.method
        attributes["url.path"] = request.path
        attributes["client.address"] = request.remote
        attributes["edge.request_id"] = self.request_id
        events = []
        if record.first_byte_s is not None:
            events.append(("edge.first_byte_sent", self._ns(self.started + record.first_byte_s)))
        operation = _OPERATIONS.get(record.route, record.route)
        model = record.model or asked[:_MODEL_MAX]
        return SpanData(
            trace_id, span_id, bytes.fromhex(parent.parent_id) if parent is not None else b"",
            f"{operation} {model}" if model else operation, SERVER, self._ns(self.started),
            self._ns(self.started + record.duration_s), attributes, events,
            record.status >= 500 or record.outcome == STREAM_ERROR, self.state,
            remote_parent=parent is not None,
        )  # fmt: skip

    def _attempt_span(
        self, span: AttemptSpan, trace_id: bytes, parent: bytes, now: float
    ) -> SpanData:
        attempt = span.attempt
        address, port = self.tracing.server(attempt.host.url)
        outcome = attempt.outcome or CANCELLED  # still open: the exchange cancels it now
        attributes: dict[str, Any] = {
            "server.address": address, "server.port": port, "gen_ai.request.model": attempt.model,
            "edge.attempt.kind": span.kind, "edge.attempt.outcome": outcome,
        }  # fmt: skip
        if span.status:
            attributes["http.response.status_code"] = span.status
        events = []
        if attempt.ttfb_s is not None:
            attributes["edge.attempt.ttfb_s"] = attempt.ttfb_s
            events.append(("edge.first_byte", self._ns(attempt.started + attempt.ttfb_s)))
        if attempt.completion_tokens is not None:
            attributes["gen_ai.usage.output_tokens"] = attempt.completion_tokens
        failed = outcome not in (OK, CANCELLED)
        if failed:
            attributes["error.type"] = outcome
            attributes["edge.attempt.blame"] = attempt.blame
        end = attempt.ended_at if attempt.outcome else now
        return SpanData(
            trace_id, bytes.fromhex(span.span_id), parent, f"{span.kind} {address}:{port}",
            CLIENT, self._ns(attempt.started), self._ns(end), attributes, events, failed,
        )  # fmt: skip

    def _child_span(self, child: _Child, trace_id: bytes, parent: bytes) -> SpanData:
        return SpanData(
            trace_id, bytes.fromhex(new_span_id()), parent, child.name, INTERNAL,
            self._ns(child.start), self._ns(child.end), child.attributes,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"<RequestTrace {self.trace_id} attempts={len(self.attempts)}>"


def _request_attributes(
    record: RequestRecord, asked: str, dialect: str, key: KeyUse | None
) -> dict[str, Any]:
    """The request span's attributes from its record: GenAI's names where they exist."""
    attributes: dict[str, Any] = {
        "http.response.status_code": record.status,
        "gen_ai.operation.name": _OPERATIONS.get(record.route, record.route),
        "gen_ai.request.model": asked,
        "edge.route": record.route, "edge.dialect": dialect, "edge.outcome": record.outcome,
        "edge.attempts": record.attempts, "edge.affinity": record.affinity,
        "edge.stream": record.stream, "edge.bytes_in": record.bytes_in,
        "edge.bytes_out": record.bytes_out,
    }  # fmt: skip
    if record.model:
        attributes["gen_ai.response.model"] = record.model
    if record.usage is not None:
        attributes["gen_ai.usage.input_tokens"] = record.usage.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = record.usage.completion_tokens
    if record.first_byte_s is not None:
        attributes["edge.ttfb_s"] = record.first_byte_s
    if record.status >= 500 or record.outcome != OK:
        attributes["error.type"] = record.outcome
    if key is not None:
        attributes["edge.key_id"] = key[0]  # the short id, never the key
        if key[1]:
            attributes["edge.workspace"] = key[1]
    return attributes


def _resource(settings: TracingSettings, env: Mapping[str, str]) -> dict[str, Any]:
    """service.name from [tracing], else OTEL_SERVICE_NAME, else "edge"; the SDK adds
    OTEL_RESOURCE_ATTRIBUTES (from the process environment) and its telemetry.sdk.* fields."""
    from opentelemetry.sdk.resources import Resource

    name = settings.service_name or env.get("OTEL_SERVICE_NAME") or "edge"
    found = Resource.create({"service.name": name, "service.version": _version()})
    return dict(found.attributes)


def _processor(settings: TracingSettings, env: Mapping[str, str], exporter: Any) -> Any:
    """The SDK's batch processor and an OTLP/HTTP exporter (edge/observe/otlp.py). Unset bounds
    are left to the SDK, which reads OTEL_BSP_* and OTEL_EXPORTER_OTLP_* itself."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if exporter is None:
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
        )
        if protocol != "http/protobuf":
            log.warning("OTLP protocol %r is not available here; exporting over HTTP", protocol)
        resource = _resource(settings, env)
        exporter = otlp.exporter(_endpoint(settings.endpoint), resource, _version())
    s = settings
    processor: BatchSpanProcessor = BatchSpanProcessor(
        exporter,
        max_queue_size=s.max_queue_size or None,
        schedule_delay_millis=s.schedule_delay_s * 1000.0 or None,
        max_export_batch_size=s.max_export_batch_size or None,
        export_timeout_millis=s.export_timeout_s * 1000.0 or None,
    )
    return processor


def _version() -> str:
    try:
        return importlib.metadata.version("edge")
    except importlib.metadata.PackageNotFoundError:  # a checkout run without installing
        return "0.0.0"


def _endpoint(base: str) -> str | None:
    """[tracing] endpoint is a base URL, as OTEL_EXPORTER_OTLP_ENDPOINT is: the traces path is
    appended (unless already there). None leaves the SDK to read the environment."""
    if not base:
        return None
    base = base.rstrip("/")
    return base if base.endswith("/v1/traces") else base + "/v1/traces"
