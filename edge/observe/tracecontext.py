"""W3C Trace Context (https://www.w3.org/TR/trace-context/): the `traceparent` header read and
written, pure and without the OpenTelemetry SDK, so that reading a client's trace id costs
nothing the proxy does not already do when nobody asks for one.

`traceparent: 00-<trace id: 32 hex>-<parent id: 16 hex>-<flags: 2 hex>`. Lowercase hex only;
an all-zero trace id or parent id is invalid; version ff is invalid. A later version is read as
version 00 is (its first four fields), provided the value is at least as long and whatever
follows them starts with "-", so a newer client still continues its trace through the edge.
Several `traceparent` fields in one request are as invalid as a malformed one. An invalid
`traceparent` is ignored whole: the trace starts afresh and the client's `tracestate` goes with
it (the spec: a vendor that could not parse traceparent must not read tracestate).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Final, Protocol

SAMPLED: Final = 0x01
# The four fields of version 00, lowercase hex only (the spec: uppercase is invalid).
_FIELDS: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_LENGTH: Final = 55  # version 00: 2 + 1 + 32 + 1 + 16 + 1 + 2
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16
_MAX64: Final = 0xFFFFFFFFFFFFFFFF


class Headers(Protocol):
    """What is read of the request's header fields (a CIMultiDict: case-insensitive)."""

    def get(self, key: str, /) -> str | None: ...

    def getall(self, key: str, default: list[str], /) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class TraceParent:
    """A valid `traceparent`: the ids as the lowercase hex they travel as, and the flags."""

    trace_id: str
    parent_id: str
    flags: int

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)


def parse(value: str) -> TraceParent | None:
    """A `traceparent` value, or None when it is not a valid one."""
    value = value.strip(" \t")
    found = _FIELDS.match(value)
    if found is None:
        return None
    version, trace_id, parent_id, flags = found.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    if len(value) != _LENGTH and (version == "00" or value[_LENGTH] != "-"):
        return None  # version 00 has exactly four fields; a later one may add some, after "-"
    return TraceParent(trace_id, parent_id, int(flags, 16))


def incoming(headers: Headers) -> TraceParent | None:
    """The request's `traceparent`, when it sent exactly one valid field."""
    value = headers.get("traceparent")
    if value is None:
        return None
    if len(headers.getall("traceparent", [])) != 1:
        return None
    return parse(value)


def tracestate(headers: Headers) -> str:
    """The request's `tracestate` fields joined as one list (RFC 9110: fields that repeat are
    one comma-separated list); "" when it sent none."""
    return ",".join(headers.getall("tracestate", []))


def format_traceparent(trace_id: str, span_id: str, flags: int = SAMPLED) -> str:
    return f"00-{trace_id}-{span_id}-{flags:02x}"


def new_trace_id() -> str:
    """128 random bits, never all zero (the spec's invalid value)."""
    return f"{random.getrandbits(128) or 1:032x}"


def new_span_id() -> str:
    return f"{random.getrandbits(64) or 1:016x}"


def ratio_sampled(trace_id: str, ratio: float) -> bool:
    """OpenTelemetry's TraceIdRatioBased decision: the low 64 bits of the trace id below
    ratio x 2^64. Read from the id, so every replica and the engine behind them agree."""
    return int(trace_id[16:], 16) < round(ratio * _MAX64)
