"""Spans as OTLP protobuf bytes, written directly, and the exporter that posts them.

Why not the SDK's encoder: it builds a protobuf object per span, attribute and value through
Python calls, about 40 to 60 us of CPU per span here (measured: loadtests/tracing_cost.py); a
traced request makes two or three spans, so encoding would cost more than proxying the request.
Written as bytes, field by field (the wire format is stable and small: opentelemetry-proto's
`trace.proto`, `common.proto`, `resource.proto`), a span costs a few microseconds. The tests
decode every export with the protocol's own generated code (tests/observe/otlp_receiver.py) and
compare with the SDK's encoder (tests/observe/test_otlp.py).

The rest is the SDK's: its batch processor queues `SpanData` (it reads only
`span.context.trace_flags.sampled`), and the exporter is its OTLP/HTTP one, with only the
encoding replaced, so endpoint, headers, timeout, compression, certificates and retries follow
the OTEL_EXPORTER_OTLP_* variables as the SDK documents them.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, Final

# Span kinds (trace.proto: Span.SpanKind).
INTERNAL: Final = 1
SERVER: Final = 2
CLIENT: Final = 3
# Span.flags: the W3C trace flags in bits 0-7, then whether the parent is known to be remote.
_SAMPLED: Final = 0x01
_HAS_IS_REMOTE: Final = 0x100
_IS_REMOTE: Final = 0x200
_MASK64: Final = 0xFFFFFFFFFFFFFFFF
_SMALL: Final = [bytes((i,)) for i in range(128)]
_FIXED64: Final = struct.Struct("<Q")
_FIXED32: Final = struct.Struct("<I")
_DOUBLE: Final = struct.Struct("<d")


class _Flags:
    sampled = True


class _Context:
    """What the SDK's batch processor reads of a span: whether it is sampled (always, here: an
    unsampled request makes no span)."""

    trace_flags = _Flags()


class SpanData:
    """One finished span, as the exporter encodes it."""

    __slots__ = (
        "trace_id", "span_id", "parent_id", "remote_parent", "state", "name", "kind", "start",
        "end", "attributes", "events", "error",
    )  # fmt: skip
    context = _Context()

    def __init__(
        self, trace_id: bytes, span_id: bytes, parent_id: bytes, name: str, kind: int,
        start: int, end: int, attributes: dict[str, Any],
        events: Sequence[tuple[str, int]] = (), error: bool = False, state: str = "",
        remote_parent: bool = False,
    ) -> None:  # fmt: skip
        self.trace_id = trace_id  # 16 bytes
        self.span_id = span_id  # 8 bytes
        self.parent_id = parent_id  # 8 bytes, or b"" for a root span
        self.remote_parent = remote_parent
        self.state = state  # the W3C tracestate
        self.name = name
        self.kind = kind
        self.start = start  # epoch nanoseconds
        self.end = end
        self.attributes = attributes
        self.events = events  # (name, epoch nanoseconds)
        self.error = error  # status ERROR; else UNSET

    def __repr__(self) -> str:
        return f"<SpanData {self.name} {self.span_id.hex()} parent={self.parent_id.hex()}>"


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag, the payload's length, the payload."""
    return tag + _varint(len(payload)) + payload


def _text(value: str) -> bytes:
    # Protobuf strings must be valid UTF-8 (a client's path may hold surrogate escapes).
    return value.encode("utf-8", "replace")


def any_value(value: Any) -> bytes:
    """common.proto's AnyValue (bool before int: a bool is an int in Python)."""
    if isinstance(value, str):
        return _field(b"\x0a", _text(value))
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & _MASK64)  # int64: two's complement, as 10 bytes
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, list | tuple):
        return _field(b"\x2a", b"".join(_field(b"\x0a", any_value(v)) for v in value))
    return _field(b"\x0a", _text(str(value)))


def key_values(tag: bytes, attributes: dict[str, Any]) -> bytes:
    """Each attribute as a KeyValue, in the repeated field `tag`."""
    return b"".join(
        _field(tag, (_KEYS.get(k) or _key(k)) + _field(b"\x12", any_value(v)))
        for k, v in attributes.items()
    )


def _key(name: str) -> bytes:
    """KeyValue.key, encoded: the names are the edge's own few, so each is encoded once."""
    found = _field(b"\x0a", _text(name))
    if len(_KEYS) < _KEYS_MAX:
        _KEYS[name] = found
    return found


_KEYS: dict[str, bytes] = {}
_KEYS_MAX: Final = 256


def span(s: SpanData) -> bytes:
    """trace.proto's Span, as field 2 (spans) of a ScopeSpans."""
    parts = [b"\x0a\x10", s.trace_id, b"\x12\x08", s.span_id]
    if s.state:
        parts.append(_field(b"\x1a", _text(s.state)))
    if s.parent_id:
        parts += (b"\x22\x08", s.parent_id)
    parts += (
        _field(b"\x2a", _text(s.name)), b"\x30", _SMALL[s.kind],
        b"\x39", _FIXED64.pack(s.start), b"\x41", _FIXED64.pack(s.end),
        key_values(b"\x4a", s.attributes),
    )  # fmt: skip
    for name, at in s.events:
        parts.append(_field(b"\x5a", b"\x09" + _FIXED64.pack(at) + _field(b"\x12", _text(name))))
    if s.error:
        parts.append(b"\x7a\x02\x18\x02")  # Status{code: STATUS_CODE_ERROR}
    flags = _SAMPLED | _HAS_IS_REMOTE | (_IS_REMOTE if s.remote_parent else 0)
    parts += (b"\x85\x01", _FIXED32.pack(flags))  # field 16, fixed32
    return _field(b"\x12", b"".join(parts))


def resource(attributes: dict[str, Any]) -> bytes:
    """resource.proto's Resource (encoded once per exporter)."""
    return key_values(b"\x0a", attributes)


def scope(name: str, version: str) -> bytes:
    """common.proto's InstrumentationScope (encoded once per exporter)."""
    return _field(b"\x0a", _text(name)) + _field(b"\x12", _text(version))


def export_request(spans: Sequence[SpanData], resource_bytes: bytes, scope_bytes: bytes) -> bytes:
    """ExportTraceServiceRequest: one ResourceSpans, one ScopeSpans, every span."""
    scope_spans = _field(b"\x0a", scope_bytes) + b"".join(span(s) for s in spans)
    resource_spans = _field(b"\x0a", resource_bytes) + _field(b"\x12", scope_spans)
    return _field(b"\x0a", resource_spans)


def exporter(endpoint: str | None, resource_attributes: dict[str, Any], version: str) -> Any:
    """The SDK's OTLP/HTTP span exporter, encoding `SpanData` with `export_request` (imported
    here: only a worker that traces loads the SDK)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    resource_bytes, scope_bytes = resource(resource_attributes), scope("edge", version)

    class Exporter(OTLPSpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            if self._shutdown:
                return SpanExportResult.FAILURE
            data = export_request(spans, resource_bytes, scope_bytes)
            done = self._client.export(data)  # the SDK's: compression, headers, retries
            return SpanExportResult.SUCCESS if done.success else SpanExportResult.FAILURE

    return Exporter(endpoint=endpoint)
