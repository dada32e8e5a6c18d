"""What the edge records of one answered request: the metrics' request families and the access
log read it. What happened on each host is the attempt's (edge/routing/attempt.py)."""

from __future__ import annotations

from dataclasses import dataclass

from edge.routing.fleet import Host


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


# Not frozen: a frozen dataclass sets each field through object.__setattr__, which with this many
# fields costs ~4 us per request instead of ~1 us; nobody mutates a record after building it.
@dataclass(slots=True)
class RequestRecord:
    """One request, once answered (by a host, or by the edge itself)."""

    model: str  # "" when the request never named a known model
    host: Host | None  # the host whose answer reached the client; None when none did
    route: str
    status: int
    outcome: str  # ok | stream_error (the answer broke) | edge_error | client_disconnect
    duration_s: float  # request start to last byte
    bytes_out: int = 0
    usage: Usage | None = None
    attempts: int = 1  # attempts the request made (0 when none)
    bytes_in: int = 0  # request body bytes
    stream: bool = False  # the client asked for a stream
    first_byte_s: float | None = None  # request start to first body byte sent to the client
    stream_s: float | None = None  # the upstream's first body byte to its last
    upstream_s: float = 0.0  # time spent waiting on upstreams (attempts and relayed body)
    affinity: str = "none"  # cookie_hit | key_hit | moved | none | pinned
