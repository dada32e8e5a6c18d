"""W3C Trace Context's traceparent, read and written (edge/observe/tracecontext.py), checked
against the specification's rules and its test suite's cases."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from edge.observe.tracecontext import (
    TraceParent,
    format_traceparent,
    incoming,
    new_span_id,
    new_trace_id,
    parse,
    ratio_sampled,
    tracestate,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"


def test_the_specifications_example_reads_as_its_fields() -> None:
    assert parse(VALID) == TraceParent(TRACE, PARENT, 1)
    assert parse(VALID).sampled  # type: ignore[union-attr]
    unsampled = parse(f"00-{TRACE}-{PARENT}-00")
    assert unsampled is not None and not unsampled.sampled
    assert parse(f" {VALID}\t") == TraceParent(TRACE, PARENT, 1)  # optional whitespace


@pytest.mark.parametrize(
    "value",
    [
        "",
        VALID.upper(),  # uppercase hex is invalid
        f"00-{TRACE.upper()}-{PARENT}-01",
        f"00-{TRACE}-{PARENT.upper()}-01",
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"ff-{TRACE}-{PARENT}-01",  # version ff
        f"0-{TRACE}-{PARENT}-01",
        f"00-{TRACE}-{PARENT}-1",
        f"00-{TRACE[:-1]}-{PARENT}-01",
        f"00-{TRACE}-{PARENT}-01-",  # version 00 has four fields exactly
        f"00-{TRACE}-{PARENT}-01.",
        f"00_{TRACE}_{PARENT}_01",
        f"00-{TRACE}-{PARENT}-0g",
        f"zz-{TRACE}-{PARENT}-01",
        f"01-{TRACE}-{PARENT}-01x",  # a later version's extra fields come after a "-"
    ],
)
def test_invalid_values_are_ignored_whole(value: str) -> None:
    assert parse(value) is None


def test_a_later_version_is_read_as_version_00() -> None:
    assert parse(f"01-{TRACE}-{PARENT}-01") == TraceParent(TRACE, PARENT, 1)
    assert parse(f"cc-{TRACE}-{PARENT}-09-what-comes-next") == TraceParent(TRACE, PARENT, 9)


def test_one_field_only_and_tracestate_joined() -> None:
    headers = CIMultiDict([("TraceParent", VALID), ("tracestate", "a=1"), ("Tracestate", "b=2")])
    assert incoming(headers) == TraceParent(TRACE, PARENT, 1)
    assert tracestate(headers) == "a=1,b=2"
    twice = CIMultiDict([("traceparent", VALID), ("traceparent", VALID)])
    assert incoming(twice) is None  # the test suite's duplicated traceparent: a new trace
    assert incoming(CIMultiDict()) is None and tracestate(CIMultiDict()) == ""


def test_new_ids_are_valid_and_format_round_trips() -> None:
    ids = {new_trace_id() for _ in range(100)}
    assert len(ids) == 100
    for trace_id in ids:
        span_id = new_span_id()
        written = format_traceparent(trace_id, span_id)
        assert parse(written) == TraceParent(trace_id, span_id, 1)
    assert format_traceparent(TRACE, PARENT, 0).endswith("-00")


def test_ratio_sampling_reads_the_low_64_bits_of_the_trace_id() -> None:
    low, high = "0" * 16 + "0" * 15 + "1", "0" * 16 + "f" * 16
    assert ratio_sampled(low, 0.001) and not ratio_sampled(high, 0.999)
    assert not ratio_sampled(low, 0.0) and ratio_sampled(high, 1.0)
    drawn = [new_trace_id() for _ in range(4000)]
    share = sum(ratio_sampled(t, 0.25) for t in drawn) / len(drawn)
    assert 0.2 < share < 0.3


@given(st.text(max_size=80))
def test_parse_never_raises_and_accepts_only_lowercase_hex(value: str) -> None:
    found = parse(value)
    if found is not None:
        assert set(found.trace_id + found.parent_id) <= set("0123456789abcdef")
        assert found.trace_id != "0" * 32 and found.parent_id != "0" * 16
