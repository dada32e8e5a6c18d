"""An OTLP/HTTP trace receiver on loopback, as a collector is one: `POST /v1/traces` with an
`ExportTraceServiceRequest` in protobuf (gzip'd or not), decoded with the `opentelemetry-proto`
package (the protocol's own generated code, not the SDK that sent it), answered with an
`ExportTraceServiceResponse`. Every span received is kept as a plain `Span`.
"""

from __future__ import annotations

import asyncio
import gzip
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto

WAIT_S = 10.0  # a batch is exported within its schedule delay (the tests' 50 ms), or never

KINDS = {
    SpanProto.SPAN_KIND_INTERNAL: "internal", SpanProto.SPAN_KIND_SERVER: "server",
    SpanProto.SPAN_KIND_CLIENT: "client", SpanProto.SPAN_KIND_PRODUCER: "producer",
    SpanProto.SPAN_KIND_CONSUMER: "consumer", SpanProto.SPAN_KIND_UNSPECIFIED: "unspecified",
}  # fmt: skip


@dataclass
class Span:
    name: str
    trace_id: str  # lowercase hex, as traceparent writes it
    span_id: str
    parent_id: str  # "" for a root span
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[tuple[str, int]]
    status: int  # 0 unset, 1 ok, 2 error
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""


def value(any_value: AnyValue) -> Any:
    which = any_value.WhichOneof("value")
    if which == "array_value":
        return [value(v) for v in any_value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: value(kv.value) for kv in any_value.kvlist_value.values}
    return getattr(any_value, which) if which else None


class OtlpReceiver:
    """The receiver; `url` is its base URL (OTEL_EXPORTER_OTLP_ENDPOINT's form)."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.posts = 0
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._arrived = asyncio.Event()

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        assert request.content_type == "application/x-protobuf", request.content_type
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        for resource_spans in message.resource_spans:
            resource = {a.key: value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    self.spans.append(_span(s, resource, scope_spans.scope.name))
        self.posts += 1
        self._arrived.set()
        reply = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    async def wait(self, count: int) -> list[Span]:
        """At least `count` spans received (all of them), within WAIT_S."""
        async with asyncio.timeout(WAIT_S):
            while len(self.spans) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.spans

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]


def _span(s: SpanProto, resource: dict[str, Any], scope: str) -> Span:
    return Span(
        s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), KINDS[s.kind],
        s.start_time_unix_nano, s.end_time_unix_nano,
        {a.key: value(a.value) for a in s.attributes},
        [(e.name, e.time_unix_nano) for e in s.events], s.status.code, resource, scope,
    )  # fmt: skip
