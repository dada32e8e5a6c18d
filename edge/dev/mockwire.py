"""What the mock model server (edge/dev/mock.py) writes in each dialect: OpenAI's usage, Anthropic's
SSE events, Gemini's chunks and JSON-array stream, all built from one generated `Turn`; and the
`Fault` it can be told to commit; and its deterministic embedding vectors and rerank scores."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import orjson

_EMBEDDING_DIM = 8
_VECTOR = struct.Struct(f"<{_EMBEDDING_DIM}f")
_RAW_VECTOR = struct.Struct(f"<{_EMBEDDING_DIM}i")


@dataclass(frozen=True, slots=True)
class Turn:
    """One generated answer: who asked, how much was read, how much is written."""

    model: str
    prompt: int
    completion: int
    truncated: bool

    @property
    def text(self) -> str:
        return "".join(token_texts(self.completion))

    @property
    def finish(self) -> str:
        return "length" if self.truncated else "stop"


@dataclass(frozen=True, slots=True)
class Events:
    """A stream's events: head right after TTFT, body paced one per chunk delay, then tail."""

    head: Iterable[bytes]
    body: Iterable[bytes]
    tail: Iterable[bytes]


@dataclass(frozen=True, slots=True)
class Fault:
    """What the mock does wrong to every request until the next `POST /_mock/fault` (a test
    control of the mock: edge/dev/mock.py)."""

    ttft_ms: float = 0.0  # added to each request's time to first token ...
    chunk_ms: float = 0.0  # ... and to the pause before each streamed event
    status: int = 0  # answer this status (400..599) instead, ...
    rate: float = 1.0  # ... to this share of requests
    cut_after: int = -1  # streams: the connection is dropped after this many events; -1: never
    partial: bool = False  # ... with half of the next event's chunk sent (it died mid-write)

    def __post_init__(self) -> None:
        numbers = (self.ttft_ms, self.chunk_ms, self.rate)
        if any(isinstance(v, bool) or not isinstance(v, int | float) for v in numbers):
            raise ValueError("ttft_ms, chunk_ms and rate must be numbers")
        integers = (self.status, self.cut_after)
        if any(isinstance(v, bool) or not isinstance(v, int) for v in integers):
            raise ValueError("status and cut_after must be integers")
        if not isinstance(self.partial, bool):
            raise ValueError("partial must be true or false")
        if self.ttft_ms < 0 or self.chunk_ms < 0 or not 0.0 <= self.rate <= 1.0:
            raise ValueError("delays must be >= 0 and rate within [0, 1]")
        if self.status and not 400 <= self.status <= 599 or self.cut_after < -1:
            raise ValueError("status must be 0 or 400..599, cut_after >= -1")


def sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def token_texts(count: int) -> Iterator[str]:
    return (f"tok{i} " for i in range(1, count + 1))


def openai_usage(turn: Turn) -> dict[str, int]:
    p, c = turn.prompt, turn.completion
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def anthropic_event(kind: str, **fields: Any) -> bytes:
    """One Anthropic SSE event; the event name always equals the payload's type."""
    return (
        b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **fields}) + b"\n\n"
    )


def anthropic_events(message: dict[str, Any], turn: Turn) -> Events:
    def delta(text: str) -> bytes:
        return anthropic_event(
            "content_block_delta", index=0, delta={"type": "text_delta", "text": text}
        )

    head = (
        anthropic_event("message_start", message=message),
        anthropic_event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        anthropic_event("ping"),
    )
    stop = {"stop_reason": "max_tokens" if turn.truncated else "end_turn", "stop_sequence": None}
    tail = (
        anthropic_event("content_block_stop", index=0),
        anthropic_event("message_delta", delta=stop, usage={"output_tokens": turn.completion}),
        anthropic_event("message_stop"),
    )
    return Events(head, (delta(t) for t in token_texts(turn.completion)), tail)


def gemini_chunks(turn: Turn) -> list[dict[str, Any]]:
    """One chunk per token; the last one carries the finish reason and usage, like Gemini."""
    texts = list(token_texts(turn.completion)) or [""]
    chunks: list[dict[str, Any]] = [
        {"candidates": [_candidate(t)], "modelVersion": turn.model} for t in texts
    ]
    chunks[-1]["candidates"][0]["finishReason"] = "MAX_TOKENS" if turn.truncated else "STOP"
    p, c = turn.prompt, turn.completion
    usage = {"promptTokenCount": p, "candidatesTokenCount": c, "totalTokenCount": p + c}
    chunks[-1]["usageMetadata"] = usage
    return chunks


def _candidate(text: str) -> dict[str, Any]:
    return {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}


def gemini_merge(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    text = "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks)
    last = chunks[-1]
    return {**last, "candidates": [{**last["candidates"][0], **_candidate(text)}]}


def json_array(chunks: list[dict[str, Any]]) -> Events:
    """Gemini's non-SSE stream: one JSON array whose elements arrive as they are generated."""
    body = ((b"[" if i == 0 else b",\r\n") + orjson.dumps(c) for i, c in enumerate(chunks))
    return Events((), body, (b"]",))


def vector(item: str | list[int]) -> tuple[float, ...]:
    """A unit vector from the input's hash, rounded to float32 so both encodings agree."""
    raw = item.encode() if isinstance(item, str) else orjson.dumps(item)
    ints = _RAW_VECTOR.unpack(hashlib.sha256(raw).digest())
    norm = math.sqrt(sum(i * i for i in ints)) or 1.0
    return _VECTOR.unpack(_VECTOR.pack(*(i / norm for i in ints)))


def encode_vector(values: tuple[float, ...], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(_VECTOR.pack(*values)).decode()
    return list(values)


def relevance(query: str, doc: str) -> float:
    digest = hashlib.sha256(query.encode() + b"\x00" + doc.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


def cut_connection(transport: asyncio.BaseTransport, event: bytes) -> None:
    """Drop the connection as a host that dies mid-answer: no end of body; with `event`, half of
    its chunk written first, straight to the socket (a death in the middle of a write)."""
    transport = cast(asyncio.Transport, transport)  # uvloop's is one, not a subclass of it
    if event:
        transport.write(b"%x\r\n" % len(event) + event[: len(event) // 2])
    transport.close()  # after what was written (an abort's reset could drop it): a FIN
