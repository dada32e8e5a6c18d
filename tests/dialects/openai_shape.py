"""What every translated request must be: a well-formed OpenAI chat completions body. Shared by
the dialects' property tests, which then check that it says what the client's request said."""

from __future__ import annotations

import json
from typing import Any

import orjson


def walk(
    body: dict[str, Any], data_urls_only: bool = False, json_results: bool = False
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Check the messages' structure; returns the tool calls by id and the ids answered, in
    order. `data_urls_only`: images must be inline; `json_results`: tool results are objects."""
    calls: dict[str, dict[str, Any]] = {}
    answered: list[str] = []
    for i, message in enumerate(body["messages"]):
        role, content = message["role"], message.get("content")
        assert set(message) <= {"role", "content", "tool_calls", "tool_call_id"}
        if role == "system":
            assert i == 0 and isinstance(content, str) and content
        elif role == "user":
            assert (
                isinstance(content, str)
                or content
                and all(_part(part, data_urls_only) for part in content)
            )
        elif role == "assistant":
            assert isinstance(content, str) or content is None and message["tool_calls"]
            for tool_call in message.get("tool_calls", ()):
                assert tool_call["type"] == "function" and tool_call["id"] not in calls
                assert isinstance(tool_call["function"]["name"], str)
                arguments = tool_call["function"]["arguments"]
                assert isinstance(arguments, str) and isinstance(json.loads(arguments), dict)
                calls[tool_call["id"]] = tool_call
        else:
            assert role == "tool" and isinstance(content, str)
            assert not json_results or isinstance(json.loads(content), dict)
            assert message["tool_call_id"] in calls and message["tool_call_id"] not in answered
            assert body["messages"][i - 1]["role"] in ("tool", "assistant")
            answered.append(message["tool_call_id"])
    return calls, answered


def image_parts(body: dict[str, Any]) -> int:
    return sum(
        1
        for m in body["messages"]
        if isinstance(m.get("content"), list)
        for p in m["content"]
        if p["type"] == "image_url"
    )


def _part(part: dict[str, Any], data_urls_only: bool) -> bool:
    if part["type"] == "text":
        return isinstance(part["text"], str)
    url = part["image_url"]["url"] if part["type"] == "image_url" else None
    return isinstance(url, str) and (not data_urls_only or url.startswith("data:"))


# --- OpenAI streams, as the engines send them --------------------------------------------------


def sse(*chunks: Any, done: bool = True) -> bytes:
    body = b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks)
    return body + (b"data: [DONE]\n\n" if done else b"")


def chunk(
    delta: dict[str, Any] | None = None, finish: str | None = None, index: int = 0, **extra: Any
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta or {}, "finish_reason": finish}
    return {"id": "chatcmpl-9", "object": "chat.completion.chunk", "choices": [choice], **extra}


def call(
    index: int, arguments: str, id: str | None = None, name: str | None = None
) -> dict[str, Any]:
    function = {"arguments": arguments} | ({"name": name} if name else {})
    return {"index": index, "function": function} | ({"id": id, "type": "function"} if id else {})


USAGE = {"id": "chatcmpl-9", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9}}
# Text (multi-byte), then two tool calls (the first in pieces), the finish, the usage.
CHUNKS = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "H\u00e9"}),
    chunk({"content": "llo \u2713"}),
    chunk({"tool_calls": [call(0, "", "call_a", "weather")]}),
    chunk({"tool_calls": [call(0, '{"city": ')]}),
    chunk({"tool_calls": [call(0, '"Oslo"}')]}),
    chunk({"tool_calls": [call(1, '{"tz": "UTC"}', "call_b", "clock")]}),
    chunk({}, "tool_calls"),
    USAGE,
]
STREAM = sse(*CHUNKS)
