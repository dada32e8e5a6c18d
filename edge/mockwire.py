"""What the mock model server (edge/mock.py) writes in each dialect: OpenAI's usage, Anthropic's
SSE events, Gemini's chunks and JSON-array stream, all built from one generated `Turn`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson


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
