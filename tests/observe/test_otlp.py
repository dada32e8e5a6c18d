"""The OTLP bytes edge/observe/otlp.py writes by hand, decoded by the protocol's own generated
code (opentelemetry-proto): every field and every kind of attribute value."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from edge.observe import otlp
from tests.observe.otlp_receiver import value

TRACE = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")


def decode(data: bytes) -> ExportTraceServiceRequest:
    message = ExportTraceServiceRequest()
    message.ParseFromString(data)
    return message


def test_a_span_and_its_resource_and_scope_decode_field_by_field() -> None:
    attributes = {
        "text": "héllo", "yes": True, "no": False, "small": 7, "big": 2**40, "negative": -3,
        "ratio": 0.25, "raw": b"\x00\xff", "list": ["a", 1], "odd": "bad \udcff byte",
    }  # fmt: skip
    span = otlp.SpanData(
        TRACE, b"\x01" * 8, b"\x02" * 8, "chat m", otlp.SERVER, 1_700_000_000_000_000_001,
        1_700_000_000_500_000_000, attributes, [("edge.first_byte", 1_700_000_000_100_000_000)],
        error=True, state="vendor=abc", remote_parent=True,
    )  # fmt: skip
    child = otlp.SpanData(TRACE, b"\x03" * 8, b"\x01" * 8, "retry h:1", otlp.CLIENT, 5, 6, {})
    data = otlp.export_request(
        [span, child], otlp.resource({"service.name": "edge"}), otlp.scope("edge", "0.1.0")
    )
    (resource_spans,) = decode(data).resource_spans
    assert {a.key: value(a.value) for a in resource_spans.resource.attributes} == {
        "service.name": "edge"
    }
    (scope_spans,) = resource_spans.scope_spans
    assert (scope_spans.scope.name, scope_spans.scope.version) == ("edge", "0.1.0")
    first, second = scope_spans.spans
    assert (first.trace_id, first.span_id, first.parent_span_id) == (
        TRACE,
        b"\x01" * 8,
        b"\x02" * 8,
    )
    assert (first.name, first.kind, first.trace_state) == (
        "chat m",
        Span.SPAN_KIND_SERVER,
        "vendor=abc",
    )
    assert (first.start_time_unix_nano, first.end_time_unix_nano) == (
        1_700_000_000_000_000_001, 1_700_000_000_500_000_000,
    )  # fmt: skip
    decoded = {a.key: value(a.value) for a in first.attributes}
    assert decoded == {**attributes, "odd": "bad ? byte"}  # valid UTF-8, as protobuf wants
    assert [(e.name, e.time_unix_nano) for e in first.events] == [
        ("edge.first_byte", 1_700_000_000_100_000_000)
    ]
    assert first.status.code == Status.STATUS_CODE_ERROR
    assert first.flags == 0x301  # sampled, the parent's remoteness known: remote
    assert (second.kind, second.status.code, second.flags) == (
        Span.SPAN_KIND_CLIENT, Status.STATUS_CODE_UNSET, 0x101,
    )  # fmt: skip
    assert second.parent_span_id == b"\x01" * 8 and list(second.attributes) == []


def test_a_root_span_has_no_parent_field() -> None:
    root = otlp.SpanData(TRACE, b"\x09" * 8, b"", "r", otlp.INTERNAL, 1, 2, {})
    (s,) = decode(otlp.export_request([root], b"", b"")).resource_spans[0].scope_spans[0].spans
    assert s.parent_span_id == b"" and s.kind == Span.SPAN_KIND_INTERNAL


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.one_of(
            st.text(max_size=20),
            st.booleans(),
            st.integers(-(2**63), 2**63 - 1),
            st.floats(allow_nan=False),
            st.binary(max_size=8),
        ),  # fmt: skip
        max_size=6,
    ),
    st.text(max_size=30),
)
def test_any_attributes_and_name_round_trip(attributes: dict[str, object], name: str) -> None:
    span = otlp.SpanData(TRACE, b"\x01" * 8, b"", name, otlp.CLIENT, 1, 2, dict(attributes))
    (s,) = decode(otlp.export_request([span], b"", b"")).resource_spans[0].scope_spans[0].spans
    clean = {k.encode("utf-8", "replace").decode(): v for k, v in attributes.items()}
    assert {a.key: value(a.value) for a in s.attributes} == {
        k: v.encode("utf-8", "replace").decode() if isinstance(v, str) else v
        for k, v in clean.items()
    }
    assert s.name == name.encode("utf-8", "replace").decode()
