"""What the mock model server (edge/dev/mock.py) writes in each dialect: OpenAI's usage and tool
calls, Anthropic's SSE events, Gemini's chunks and JSON-array stream, all built from one generated
`Turn`; its errors (`Reject`) in each dialect's shape; the `Fault` it can be told to commit; and
its deterministic embedding vectors and rerank scores."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import orjson

_EMBEDDING_DIM = 8
_VECTOR = struct.Struct(f"<{_EMBEDDING_DIM}f")
_RAW_VECTOR = struct.Struct(f"<{_EMBEDDING_DIM}i")


# A required tool argument of each JSON-schema type, filled so that the call validates.
_FILLERS: dict[str, Any] = {
    "string": "mock",
    "integer": 1,
    "number": 1.5,
    "boolean": True,
    "array": [],
    "object": {},
}
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
# status -> (Anthropic error type, Google status name)
_DIALECT_NAMES = {
    400: ("invalid_request_error", "INVALID_ARGUMENT"),
    401: ("authentication_error", "UNAUTHENTICATED"),
    403: ("permission_error", "PERMISSION_DENIED"),
    404: ("not_found_error", "NOT_FOUND"),
    429: ("rate_limit_error", "RESOURCE_EXHAUSTED"),
    500: ("api_error", "INTERNAL"),
    503: ("overloaded_error", "UNAVAILABLE"),
    529: ("overloaded_error", "UNAVAILABLE"),
}


@dataclass(eq=False)
class Reject(Exception):
    """A request answered with an error; the route picks the dialect unless shape is set."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    shape: Callable[[Reject], dict[str, Any]] | None = None


def openai_error(err: Reject) -> dict[str, Any]:
    fallback = "server_error" if err.status >= 500 else "invalid_request_error"
    kind = _OPENAI_TYPES.get(err.status, fallback)
    return {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}


def _dialect_names(status: int) -> tuple[str, str]:
    return _DIALECT_NAMES.get(status) or _DIALECT_NAMES[500 if status >= 500 else 400]


def anthropic_error(err: Reject) -> dict[str, Any]:
    kind = _dialect_names(err.status)[0]
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def google_error(err: Reject) -> dict[str, Any]:
    status = _dialect_names(err.status)[1]
    return {"error": {"code": err.status, "message": err.message, "status": status}}


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The one function call an OpenAI chat answer makes instead of text."""

    id: str
    name: str
    arguments: str  # a JSON object, as a string: OpenAI's wire shape

    def message(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": self.arguments}
        call = {"id": self.id, "type": "function", "function": function}
        return {"role": "assistant", "content": None, "tool_calls": [call]}

    def deltas(self) -> Iterator[dict[str, Any]]:
        """Streamed as OpenAI does: the call named with empty arguments, then the arguments in
        pieces, so that clients (and translators) must join them."""
        function = {"name": self.name, "arguments": ""}
        yield {
            "tool_calls": [{"index": 0, "id": self.id, "type": "function", "function": function}]
        }
        for piece in _thirds(self.arguments):
            yield {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}


@dataclass(frozen=True, slots=True)
class Turn:
    """One generated answer: who asked, how much was read, how much is written, and the tool
    call it makes instead of text, if any."""

    model: str
    prompt: int
    completion: int
    truncated: bool
    call: ToolCall | None = None

    @property
    def text(self) -> str:
        return "".join(token_texts(self.completion))

    @property
    def finish(self) -> str:
        if self.call is not None:
            return "tool_calls"
        return "length" if self.truncated else "stop"

    def chat_message(self) -> dict[str, Any]:
        if self.call is not None:
            return self.call.message()
        return {"role": "assistant", "content": self.text}


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


def tool_call(body: dict[str, Any]) -> ToolCall | None:
    """The call an OpenAI chat request gets instead of text: with `tools`, unless tool_choice is
    "none" or the last message is a tool's result (the model then answers in words)."""
    tools = _functions(body.get("tools"))
    name = _chosen(body.get("tool_choice"), tools)
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if name is None or isinstance(last, dict) and last.get("role") == "tool":
        return None
    arguments = orjson.dumps(_required(tools[name])).decode()
    return ToolCall("call_" + os.urandom(8).hex(), name, arguments)


def _functions(tools: object) -> dict[str, object]:
    """Function name -> its parameters schema, in the request's order; a malformed tool is
    refused rather than skipped, so a translator's mistake shows in tests."""
    if tools is None:
        return {}
    if not isinstance(tools, list):
        raise Reject(400, "tools must be a list", param="tools")
    found: dict[str, object] = {}
    for i, tool in enumerate(tools):
        function = _typed(tool, "function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise Reject(400, f"tools[{i}] must be a function tool with a name", param="tools")
        found[function["name"]] = function.get("parameters")
    return found


def _typed(item: object, kind: str) -> object:
    """`item[kind]` where item is `{"type": kind, kind: ...}`, OpenAI's tagged shape; else None."""
    return item.get(kind) if isinstance(item, dict) and item.get("type") == kind else None


def _chosen(choice: object, tools: dict[str, object]) -> str | None:
    """The function tool_choice picks: a named one, else the first; None for "none" or no tools."""
    if choice in (None, "auto", "required"):
        return next(iter(tools), None)
    if choice == "none":
        return None
    function = _typed(choice, "function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        message = "tool_choice must be none, auto, required or a function"
        raise Reject(400, message, param="tool_choice")
    if name not in tools:
        message = f"tool_choice names {name!r}, which is not in tools"
        raise Reject(400, message, param="tool_choice")
    return name


def _required(schema: object) -> dict[str, Any]:
    """Each required property of a parameters schema, filled by its type (or its first enum)."""
    if not isinstance(schema, dict) or not isinstance(schema.get("required"), list):
        return {}
    properties = schema.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    return {n: _filler(properties.get(n)) for n in schema["required"] if isinstance(n, str)}


def _filler(prop: object) -> Any:
    if not isinstance(prop, dict):
        return None
    if isinstance(prop.get("enum"), list) and prop["enum"]:
        return prop["enum"][0]
    kinds = prop.get("type")
    for kind in kinds if isinstance(kinds, list) else [kinds]:
        if isinstance(kind, str) and kind in _FILLERS:
            return _FILLERS[kind]
    return None  # no type, or "null": JSON's null fits


def _thirds(text: str) -> list[str]:
    step = max(1, len(text) // 3)
    pieces = [text[:step], text[step : 2 * step], text[2 * step :]]
    return [p for p in pieces if p]


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


def _is_tokens(value: object) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)


def embedding_inputs(value: Any) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if _is_tokens(value):
            return [value]
        if all(isinstance(v, str) for v in value) or all(_is_tokens(v) for v in value):
            return list(value)
    raise Reject(400, "input must be a string, strings, or token id lists", param="input")


def rerank_text(doc: object) -> str:
    if isinstance(doc, str):
        return doc
    if isinstance(doc, dict) and isinstance(doc.get("text"), str):
        return str(doc["text"])
    raise Reject(400, "documents must be strings or objects with text", param="documents")


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
