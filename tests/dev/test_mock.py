"""The fake model server: wire shapes, scripting headers, and SDK compatibility."""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import logging
import struct
import time
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient

from edge.dev import mock as mock_module
from edge.dev.mock import MockOptions, add_arguments, build_app, options_from_args, serve
from edge.dev.mockwire import held_prefix, held_suffix

OPTS = MockOptions(models=("m1", "org/m2"), name="mock-a", tokens=5)
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture
def make_client(aiohttp_client: Any) -> Any:
    async def make(**changes: Any) -> TestClient[Any, Any]:
        fields = {f: getattr(OPTS, f) for f in OPTS.__dataclass_fields__}
        client: TestClient[Any, Any] = await aiohttp_client(
            build_app(MockOptions(**fields | changes))
        )
        return client

    return make


@pytest.fixture
async def client(make_client: Any) -> TestClient[Any, Any]:
    result: TestClient[Any, Any] = await make_client()
    return result


def base_url(client: TestClient[Any, Any]) -> str:
    return str(client.make_url("")).rstrip("/")


async def post(client: TestClient[Any, Any], path: str, body: Any, **kw: Any) -> tuple[int, Any]:
    async with client.post(path, data=orjson.dumps(body), **kw) as resp:
        assert resp.headers["X-Mock-Server"] == "mock-a"
        return resp.status, orjson.loads(await resp.read())


async def sse_data(resp: aiohttp.ClientResponse) -> list[Any]:
    """The payload of every `data:` line, JSON-decoded except the [DONE] sentinel."""
    events = []
    async for line in resp.content:
        if line.startswith(b"data: "):
            payload = line[6:].strip()
            events.append(payload.decode() if payload == b"[DONE]" else orjson.loads(payload))
    return events


# --- OpenAI -------------------------------------------------------------------------


async def test_models_listing_and_health(client: TestClient[Any, Any]) -> None:
    async with client.get("/v1/models") as resp:
        listing = await resp.json()
        assert resp.headers["X-Mock-Server"] == "mock-a"
    assert [m["id"] for m in listing["data"]] == ["m1", "org/m2"]
    assert {m["owned_by"] for m in listing["data"]} == {"mock-a"}
    assert listing["object"] == "list" and listing["data"][0]["object"] == "model"
    async with client.get("/health") as resp:
        assert (resp.status, await resp.json()) == (200, {"status": "ok"})
    async with client.get("/health/org/m2") as resp:
        assert resp.status == 200
    async with client.get("/health/nope") as resp:
        assert resp.status == 404
        assert resp.headers["X-Mock-Server"] == "mock-a"


async def test_chat_completion_shape(client: TestClient[Any, Any]) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a b c"}, {"type": "image_url"}]},
    ]
    status, body = await post(client, "/v1/chat/completions", {"model": "m1", "messages": messages})
    assert status == 200
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "m1" and body["system_fingerprint"] == "mock-a"
    assert isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 5
    assert choice["finish_reason"] == "stop"
    # 2 + 3 words, plus one per message
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}


async def test_chat_stream_with_usage(client: TestClient[Any, Any]) -> None:
    request = CHAT | {"stream": True, "stream_options": {"include_usage": True}}
    async with client.post("/v1/chat/completions", json=request) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Mock-Server"] == "mock-a"
        events = await sse_data(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert {c["system_fingerprint"] for c in chunks} == {"mock-a"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    tokens = [c["choices"][0]["delta"]["content"] for c in chunks[1:6]]
    assert tokens == ["tok1 ", "tok2 ", "tok3 ", "tok4 ", "tok5 "]
    assert chunks[6]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert chunks[7]["choices"] == []
    assert chunks[7]["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert len(chunks) == 8


async def test_chat_stream_without_include_usage_has_no_usage_chunk(
    client: TestClient[Any, Any],
) -> None:
    async with client.post("/v1/chat/completions", json=CHAT | {"stream": True}) as resp:
        events = await sse_data(resp)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


async def test_completions_non_stream_and_stream(client: TestClient[Any, Any]) -> None:
    request = {"model": "org/m2", "prompt": "one two three"}
    status, body = await post(client, "/v1/completions", request)
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "tok1 tok2 tok3 tok4 tok5 "
    assert body["usage"]["prompt_tokens"] == 3
    stream = request | {"stream": True, "stream_options": {"include_usage": True}}
    async with client.post("/v1/completions", json=stream) as resp:
        events = await sse_data(resp)
    texts = "".join(e["choices"][0]["text"] for e in events[:-2] if e["choices"])
    assert texts == body["choices"][0]["text"]
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["usage"]["completion_tokens"] == 5 and events[-1] == "[DONE]"


def _chat_text(body: Any) -> tuple[int, str]:
    return len(body["choices"][0]["message"]["content"].split()), body["choices"][0][
        "finish_reason"
    ]


def _text_text(body: Any) -> tuple[int, str]:
    return len(body["choices"][0]["text"].split()), body["choices"][0]["finish_reason"]


def _anthropic_text(body: Any) -> tuple[int, str]:
    return len(body["content"][0]["text"].split()), body["stop_reason"]


def _gemini_text(body: Any) -> tuple[int, str]:
    candidate = body["candidates"][0]
    return len(candidate["content"]["parts"][0]["text"].split()), candidate["finishReason"]


@pytest.mark.parametrize(
    ("path", "request_body", "read", "capped"),
    [
        ("/v1/chat/completions", CHAT | {"max_tokens": 2}, _chat_text, "length"),
        ("/v1/chat/completions", CHAT | {"max_completion_tokens": 2}, _chat_text, "length"),
        ("/v1/completions", {"model": "m1", "prompt": "x", "max_tokens": 2}, _text_text, "length"),
        ("/v1/messages", CHAT | {"max_tokens": 2}, _anthropic_text, "max_tokens"),
        (
            "/v1beta/models/m1:generateContent",
            {"contents": [], "generationConfig": {"maxOutputTokens": 2}},
            _gemini_text,
            "MAX_TOKENS",
        ),
    ],
)
async def test_max_tokens_caps_completion(
    client: TestClient[Any, Any], path: str, request_body: Any, read: Any, capped: str
) -> None:
    status, body = await post(client, path, request_body)
    assert status == 200
    assert read(body) == (2, capped)


async def test_max_tokens_above_budget_is_a_normal_stop(client: TestClient[Any, Any]) -> None:
    _, body = await post(client, "/v1/chat/completions", CHAT | {"max_tokens": 50})
    assert _chat_text(body) == (5, "stop")


async def test_embeddings_shape_and_determinism_across_instances(make_client: Any) -> None:
    first, second = await make_client(), await make_client(name="mock-b")
    request = {"model": "m1", "input": ["alpha beta", "gamma"]}
    status, one = await post(first, "/v1/embeddings", request)
    async with second.post("/v1/embeddings", json=request) as resp:
        assert resp.headers["X-Mock-Server"] == "mock-b"
        two = await resp.json()
    assert status == 200 and one["object"] == "list" and one["model"] == "m1"
    assert [d["index"] for d in one["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 8 for d in one["data"])
    assert one["data"] == two["data"]
    assert one["data"][0]["embedding"] != one["data"][1]["embedding"]
    assert one["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


async def test_embeddings_accept_token_ids_and_base64(client: TestClient[Any, Any]) -> None:
    _, floats = await post(client, "/v1/embeddings", {"model": "m1", "input": [[1, 2, 3], [4]]})
    assert floats["usage"]["prompt_tokens"] == 4 and len(floats["data"]) == 2
    _, single = await post(client, "/v1/embeddings", {"model": "m1", "input": [1, 2, 3]})
    assert single["data"][0]["embedding"] == floats["data"][0]["embedding"]
    request = {"model": "m1", "input": [[1, 2, 3]], "encoding_format": "base64"}
    _, packed = await post(client, "/v1/embeddings", request)
    decoded = struct.unpack("<8f", base64.b64decode(packed["data"][0]["embedding"]))
    assert list(decoded) == floats["data"][0]["embedding"]
    status, err = await post(client, "/v1/embeddings", {"model": "m1", "input": [1, "x"]})
    assert status == 400 and err["error"]["param"] == "input"


async def test_rerank_sorted_deterministic_and_top_n(client: TestClient[Any, Any]) -> None:
    docs = ["red apple", "blue sky", {"text": "green tree"}, "yellow sun"]
    request = {"model": "m1", "query": "colour", "documents": docs}
    status, full = await post(client, "/v1/rerank", request)
    assert status == 200 and full["model"] == "m1" and full["id"]
    scores = [r["relevance_score"] for r in full["results"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s < 1 for s in scores)
    assert sorted(r["index"] for r in full["results"]) == [0, 1, 2, 3]
    assert full["usage"] == {"total_tokens": 9}
    _, top = await post(client, "/v1/rerank", request | {"top_n": 2})
    assert top["results"] == full["results"][:2]


async def test_echo_reports_request(client: TestClient[Any, Any]) -> None:
    raw = orjson.dumps({"model": "m1", "x": [1, 2]})
    headers = {"X-Trace": "a", "Content-Type": "application/json"}
    async with client.post("/v1/echo?q=1&q=2", data=raw, headers=headers) as resp:
        assert resp.headers["X-Mock-Server"] == "mock-a"
        body = await resp.json()
    assert body["server"] == "mock-a" and body["method"] == "POST"
    assert body["path"] == "/v1/echo" and body["query"] == "q=1&q=2"
    assert body["headers"]["X-Trace"] == "a"
    assert body["headers"]["Content-Type"] == "application/json"
    assert body["body_sha256"] == hashlib.sha256(raw).hexdigest()
    assert body["body_len"] == len(raw)
    status, _ = await post(client, "/v1/echo", {"model": "other"})
    assert status == 404


async def test_echo_joins_repeated_headers(client: TestClient[Any, Any]) -> None:
    # aiohttp's client merges repeated names, so speak HTTP/1.1 by hand.
    raw = b'{"model": "m1"}'
    head = (
        f"POST /v1/echo HTTP/1.1\r\nHost: x\r\nX-Trace: a\r\nx-trace: b\r\n"
        f"Content-Length: {len(raw)}\r\nConnection: close\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(head.encode() + raw)
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 200")
    body = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["headers"]["X-Trace"] == "a, b" and "x-trace" not in body["headers"]


# --- Anthropic ----------------------------------------------------------------------


async def test_messages_non_stream(client: TestClient[Any, Any]) -> None:
    request = CHAT | {"system": "you are terse", "max_tokens": 100}
    status, body = await post(client, "/v1/messages", request)
    assert status == 200 and body["id"].startswith("msg_")
    assert (body["type"], body["role"], body["model"]) == ("message", "assistant", "m1")
    assert body["content"] == [{"type": "text", "text": "tok1 tok2 tok3 tok4 tok5 "}]
    assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None
    assert body["usage"] == {"input_tokens": 6, "output_tokens": 5}


async def test_messages_stream_event_sequence(client: TestClient[Any, Any]) -> None:
    async with client.post("/v1/messages", json=CHAT | {"stream": True}) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        text = (await resp.read()).decode()
    blocks = [b for b in text.split("\n\n") if b]
    names = [b.split("\n")[0].removeprefix("event: ") for b in blocks]
    datas = [orjson.loads(b.split("\n")[1].removeprefix("data: ")) for b in blocks]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 5,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert [d["type"] for d in datas] == names
    assert datas[0]["message"]["usage"] == {"input_tokens": 3, "output_tokens": 1}
    assert datas[3]["delta"] == {"type": "text_delta", "text": "tok1 "}
    assert datas[-2]["delta"]["stop_reason"] == "end_turn"
    assert datas[-2]["usage"]["output_tokens"] == 5


# --- Gemini -------------------------------------------------------------------------

GEMINI = {
    "contents": [{"role": "user", "parts": [{"text": "hi you"}]}],
    "systemInstruction": {"parts": [{"text": "be kind"}]},
}


async def test_gemini_generate_content(client: TestClient[Any, Any]) -> None:
    status, body = await post(client, "/v1beta/models/org/m2:generateContent", GEMINI)
    assert status == 200 and body["modelVersion"] == "org/m2"
    candidate = body["candidates"][0]
    assert candidate["content"] == {
        "role": "model",
        "parts": [{"text": "tok1 tok2 tok3 tok4 tok5 "}],
    }
    assert candidate["finishReason"] == "STOP" and candidate["index"] == 0
    usage = {"promptTokenCount": 5, "candidatesTokenCount": 5, "totalTokenCount": 10}
    assert body["usageMetadata"] == usage


async def test_gemini_stream_sse_and_json_array(client: TestClient[Any, Any]) -> None:
    path = "/v1beta/models/m1:streamGenerateContent"
    async with client.post(path + "?alt=sse", json=GEMINI) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        sse = await sse_data(resp)
    status, array = await post(client, path, GEMINI)
    assert status == 200 and isinstance(array, list)
    for chunks in (sse, array):
        texts = [c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks]
        assert texts == ["tok1 ", "tok2 ", "tok3 ", "tok4 ", "tok5 "]
        assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
        assert chunks[-1]["usageMetadata"]["candidatesTokenCount"] == 5


# --- errors and scripting -----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "request_body", "expected"),
    [
        (
            "/v1/chat/completions",
            {"model": "nope", "messages": []},
            {"type": "invalid_request_error", "param": "model", "code": "model_not_found"},
        ),
        ("/v1/embeddings", {"model": "nope", "input": "x"}, {"code": "model_not_found"}),
        ("/v1/rerank", {"query": "q", "documents": []}, {"code": "model_not_found"}),
        ("/v1/messages", {"model": "nope"}, {"type": "not_found_error"}),
        ("/v1beta/models/nope:generateContent", {}, {"code": 404, "status": "NOT_FOUND"}),
        ("/v1beta/models/m1:countTokens", {}, {"code": 404, "status": "NOT_FOUND"}),
    ],
)
async def test_unknown_model_is_404_in_route_dialect(
    client: TestClient[Any, Any], path: str, request_body: Any, expected: dict[str, Any]
) -> None:
    status, body = await post(client, path, request_body)
    assert status == 404
    assert expected.items() <= body["error"].items()
    assert body["error"]["message"]
    assert body.get("type") == ("error" if path == "/v1/messages" else None)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/chat/completions", {"type": "invalid_request_error"}),
        ("/v1/messages", {"type": "invalid_request_error"}),
        ("/v1beta/models/m1:generateContent", {"status": "INVALID_ARGUMENT"}),
    ],
)
async def test_non_json_body_is_400(
    client: TestClient[Any, Any], path: str, expected: dict[str, Any]
) -> None:
    async with client.post(path, data=b"{not json") as resp:
        assert resp.status == 400 and resp.headers["X-Mock-Server"] == "mock-a"
        assert expected.items() <= (await resp.json())["error"].items()


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/chat/completions", {"type": "server_error"}),
        ("/v1/embeddings", {"type": "server_error"}),
        ("/v1/messages", {"type": "overloaded_error"}),
        ("/v1beta/models/m1:generateContent", {"status": "UNAVAILABLE", "code": 503}),
    ],
)
async def test_fail_rate_one_always_503(
    make_client: Any, path: str, expected: dict[str, Any]
) -> None:
    flaky = await make_client(fail_rate=1.0)
    async with flaky.post(path, json=CHAT | {"input": "x"}) as resp:
        assert resp.status == 503 and resp.headers["X-Mock-Server"] == "mock-a"
        assert expected.items() <= (await resp.json())["error"].items()
    async with flaky.get("/health") as resp:
        assert resp.status == 200  # failures are for model traffic only


async def test_x_mock_status_answers_scripted_error(client: TestClient[Any, Any]) -> None:
    for code, kind in ((429, "rate_limit_error"), (500, "server_error"), (400, None)):
        headers = {"X-Mock-Status": str(code)}
        status, body = await post(client, "/v1/chat/completions", CHAT, headers=headers)
        assert status == code and body["error"]["code"] == "mock_status"
        assert kind is None or body["error"]["type"] == kind
    status, _ = await post(client, "/v1/messages", CHAT, headers={"X-Mock-Status": "529"})
    assert status == 529


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("X-Mock-Status", "abc"),
        ("X-Mock-Status", "200"),
        ("X-Mock-TTFT-Ms", "-5"),
        ("X-Mock-Chunk-Ms", "nan"),
        ("X-Mock-Tokens", "1.5"),
        ("X-Mock-Context", "-1"),
        ("X-Mock-Context", "2k"),
    ],
)
async def test_invalid_override_is_400(
    client: TestClient[Any, Any], header: str, value: str
) -> None:
    status, body = await post(client, "/v1/chat/completions", CHAT, headers={header: value})
    assert status == 400 and header in body["error"]["message"]


async def test_x_mock_tokens_overrides_budget(client: TestClient[Any, Any]) -> None:
    _, body = await post(client, "/v1/chat/completions", CHAT, headers={"X-Mock-Tokens": "9"})
    assert body["usage"]["completion_tokens"] == 9
    _, body = await post(client, "/v1/chat/completions", CHAT, headers={"X-Mock-Tokens": "0"})
    assert body["choices"][0]["message"]["content"] == ""


async def test_invalid_max_tokens_is_400(client: TestClient[Any, Any]) -> None:
    status, body = await post(client, "/v1/chat/completions", CHAT | {"max_tokens": "many"})
    assert status == 400 and body["error"]["param"] == "max_tokens"


async def test_unrouted_path_still_carries_server_header(client: TestClient[Any, Any]) -> None:
    async with client.get("/no/such/path") as resp:
        assert resp.status == 404 and resp.headers["X-Mock-Server"] == "mock-a"


# --- timing -------------------------------------------------------------------------


async def test_ttft_option_delays_non_stream_answer(make_client: Any) -> None:
    slow = await make_client(ttft_ms=80)
    started = time.monotonic()
    status, _ = await post(slow, "/v1/chat/completions", CHAT)
    assert status == 200 and time.monotonic() - started >= 0.07


async def test_ttft_and_chunk_headers_pace_a_stream(client: TestClient[Any, Any]) -> None:
    headers = {"X-Mock-TTFT-Ms": "60", "X-Mock-Chunk-Ms": "15", "X-Mock-Tokens": "4"}
    started = time.monotonic()
    async with client.post(
        "/v1/chat/completions", json=CHAT | {"stream": True}, headers=headers
    ) as resp:
        first = await resp.content.readline()
        first_at = time.monotonic() - started
        await resp.read()
        done_at = time.monotonic() - started
    assert first.startswith(b"data: ")
    assert first_at >= 0.05
    assert done_at >= 0.05 + 4 * 0.012


async def test_client_disconnect_mid_stream_is_quiet(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    headers = {"X-Mock-Chunk-Ms": "10", "X-Mock-Tokens": "100"}
    with caplog.at_level(logging.ERROR):
        async with client.post(
            "/v1/chat/completions", json=CHAT | {"stream": True}, headers=headers
        ) as resp:
            await resp.content.readline()
            resp.close()
        await asyncio.sleep(0.08)
        async with client.get("/health") as health:
            assert health.status == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- tool calls -----------------------------------------------------------------------

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "scale": {"type": "number"},
        "metric": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "extra": {"type": "object"},
        "note": {"type": "string"},  # not required: left out
    },
    "required": ["city", "days", "scale", "metric", "tags", "extra"],
}
CLOCK = {
    "type": "object",
    "properties": {
        "zone": {"type": "string", "enum": ["UTC", "CET"]},
        "n": {"type": ["null", "integer"]},
    },
    "required": ["zone", "n"],
}
TOOLS = [
    {"type": "function", "function": {"name": "weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "clock", "description": "now", "parameters": CLOCK}},
    {"type": "function", "function": {"name": "ping"}},
]
WEATHER_ARGS = {"city": "mock", "days": 1, "scale": 1.5, "metric": True, "tags": [], "extra": {}}
TOOL_CHAT = CHAT | {"tools": TOOLS}
HELLO: list[dict[str, Any]] = [{"role": "user", "content": "hello there"}]  # CHAT's messages


def _named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def _tool_result(call: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation after `call`: its assistant message, then the tool's answer."""
    return [
        *HELLO,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
    ]


@pytest.mark.parametrize(
    ("choice", "name", "arguments"),
    [
        (None, "weather", WEATHER_ARGS),
        ("auto", "weather", WEATHER_ARGS),
        ("required", "weather", WEATHER_ARGS),
        (_named("clock"), "clock", {"zone": "UTC", "n": 1}),
        (_named("ping"), "ping", {}),
    ],
)
async def test_chat_with_tools_answers_one_tool_call(
    client: TestClient[Any, Any], choice: Any, name: str, arguments: dict[str, Any]
) -> None:
    request = TOOL_CHAT if choice is None else TOOL_CHAT | {"tool_choice": choice}
    status, body = await post(client, "/v1/chat/completions", request)
    assert status == 200 and body["object"] == "chat.completion"
    choice_out = body["choices"][0]
    assert choice_out["finish_reason"] == "tool_calls"
    message = choice_out["message"]
    assert message["role"] == "assistant" and message["content"] is None
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == name
    assert call["id"].startswith("call_") and int(call["id"][5:], 16) >= 0
    assert orjson.loads(call["function"]["arguments"]) == arguments
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


async def test_tool_result_none_choice_and_no_tools_get_text(client: TestClient[Any, Any]) -> None:
    _, body = await post(client, "/v1/chat/completions", TOOL_CHAT)
    call = body["choices"][0]["message"]["tool_calls"][0]
    second = await post(
        client, "/v1/chat/completions", TOOL_CHAT | {"messages": _tool_result(call)}
    )
    refused = await post(client, "/v1/chat/completions", TOOL_CHAT | {"tool_choice": "none"})
    empty = await post(client, "/v1/chat/completions", CHAT | {"tools": [], "max_tokens": 2})
    for status, answer in (second, refused, empty):
        assert status == 200 and "tool_calls" not in answer["choices"][0]["message"]
    assert _chat_text(second[1]) == (5, "stop") and _chat_text(refused[1]) == (5, "stop")
    assert _chat_text(empty[1]) == (2, "length")  # max_tokens truncation as before


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tools": {"type": "function"}}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
        ({"tool_choice": _named("absent")}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": {"type": "function"}}, "tool_choice"),
    ],
)
async def test_malformed_tools_are_400(
    client: TestClient[Any, Any], change: dict[str, Any], param: str
) -> None:
    status, body = await post(client, "/v1/chat/completions", TOOL_CHAT | change)
    assert status == 400 and body["error"]["param"] == param
    assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("include_usage", [True, False])
async def test_tool_call_stream(client: TestClient[Any, Any], include_usage: bool) -> None:
    request = TOOL_CHAT | {"stream": True, "stream_options": {"include_usage": include_usage}}
    async with client.post("/v1/chat/completions", json=request) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        events = await sse_data(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    deltas = [c["delta"] for c in choices]
    assert deltas[0] == {"role": "assistant", "content": ""}
    [start] = deltas[1]["tool_calls"]
    assert start["index"] == 0 and start["type"] == "function" and start["id"].startswith("call_")
    assert start["function"] == {"name": "weather", "arguments": ""}
    pieces = [d["tool_calls"][0] for d in deltas[2:-1]]
    assert 2 <= len(pieces) <= 3 and all(p.keys() == {"index", "function"} for p in pieces)
    arguments = "".join(p["function"]["arguments"] for p in pieces)
    assert orjson.loads(arguments) == WEATHER_ARGS
    assert deltas[-1] == {} and [c["finish_reason"] for c in choices[-2:]] == [None, "tool_calls"]
    usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert [c["usage"] for c in chunks if "usage" in c] == [usage] * include_usage


async def test_tool_call_stream_is_paced_and_cut_as_text(client: TestClient[Any, Any]) -> None:
    headers = {"X-Mock-TTFT-Ms": "40", "X-Mock-Chunk-Ms": "15"}
    request = TOOL_CHAT | {"stream": True, "tool_choice": _named("ping")}
    started = time.monotonic()
    async with client.post("/v1/chat/completions", json=request, headers=headers) as resp:
        events = await sse_data(resp)
    # The call's head and two argument pieces ("{", "}") are paced like tokens.
    assert time.monotonic() - started >= 0.035 + 3 * 0.012
    assert [
        e["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for e in events[1:4]
    ] == ["", "{", "}"]
    async with client.post("/_mock/fault", json={"cut_after": 1}) as resp:
        assert resp.status == 200
    async with client.post("/v1/chat/completions", json=request) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


# --- dialects spoken, the request log ---------------------------------------------------


@pytest.mark.parametrize(
    ("speaks", "unspoken"),
    [
        (("openai",), ["/v1/messages", "/v1beta/models/m1:generateContent"]),
        (("openai", "gemini"), ["/v1/messages"]),
        (("anthropic", "openai"), ["/v1beta/models/m1:streamGenerateContent?alt=sse"]),
    ],
)
async def test_unspoken_dialect_answers_vllms_404(
    make_client: Any, speaks: tuple[str, ...], unspoken: list[str]
) -> None:
    mock = await make_client(speaks=speaks)
    for path in unspoken:
        for method in ("POST", "GET"):
            async with mock.request(method, path, json=CHAT | {"max_tokens": 3}) as resp:
                assert resp.status == 404 and resp.headers["X-Mock-Server"] == "mock-a"
                assert resp.content_type == "application/json"
                assert await resp.json() == {"detail": "Not Found"}
    spoken = {
        "anthropic": ("/v1/messages", CHAT | {"max_tokens": 3}),
        "gemini": ("/v1beta/models/m1:generateContent", {"contents": []}),
        "openai": ("/v1/chat/completions", CHAT),
    }
    for dialect in speaks:
        assert (await post(mock, *spoken[dialect]))[0] == 200, dialect
    async with mock.get("/_mock/requests") as resp:
        assert [r["path"] for r in await resp.json()] == [spoken[d][0] for d in speaks]


def test_speaks_is_validated() -> None:
    assert MockOptions().speaks == ("openai", "anthropic", "gemini")
    assert MockOptions(speaks=("openai",)).speaks == ("openai",)
    for bad in ((), ("anthropic",), ("anthropic", "gemini"), ("openai", "vertex"), "openai"):
        with pytest.raises(ValueError, match="speaks"):
            MockOptions(speaks=bad)  # type: ignore[arg-type]


async def test_request_log_lists_bodies_newest_last_and_clears(
    client: TestClient[Any, Any],
) -> None:
    async def log() -> list[Any]:
        async with client.get("/_mock/requests") as resp:
            assert resp.status == 200 and resp.headers["X-Mock-Server"] == "mock-a"
            result: list[Any] = await resp.json()
            return result

    assert await log() == []
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    chat = {
        "model": "m1",
        "messages": [{"role": "system", "content": "terse"}, {"role": "user", "content": [image]}],
    }
    gemini = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    await post(client, "/v1/chat/completions", chat | {"tools": TOOLS})
    async with client.post("/v1beta/models/m1:streamGenerateContent?alt=sse", json=gemini) as resp:
        assert resp.status == 200 and (await sse_data(resp))[-1]["usageMetadata"]
    await post(client, "/v1/embeddings", {"model": "m1", "input": "x"})
    await post(client, "/v1/chat/completions", {"model": "zz", "messages": []})  # read, then 404
    await post(client, "/v1/chat/completions", CHAT, headers={"X-Mock-Status": "500"})  # not read
    async with client.post("/v1/messages", data=b"{not json") as resp:
        assert resp.status == 400  # not parsed: not logged
    logged = await log()
    assert all(r["headers"]["host"].startswith("127.0.0.1:") for r in logged)
    assert [{"path": r["path"], "body": r["body"]} for r in logged] == [
        {"path": "/v1/chat/completions", "body": chat | {"tools": TOOLS}},
        {"path": "/v1beta/models/m1:streamGenerateContent", "body": gemini},
        {"path": "/v1/embeddings", "body": {"model": "m1", "input": "x"}},
        {"path": "/v1/chat/completions", "body": {"model": "zz", "messages": []}},
    ]
    async with client.delete("/_mock/requests") as resp:
        assert resp.status == 204
    assert await log() == []


async def test_request_log_keeps_the_last_32(client: TestClient[Any, Any]) -> None:
    for i in range(40):
        status, _ = await post(client, "/v1/completions", {"model": "m1", "prompt": str(i)})
        assert status == 200
    async with client.get("/_mock/requests") as resp:
        logged = await resp.json()
    assert [r["body"]["prompt"] for r in logged] == [str(i) for i in range(8, 40)]


# --- SDK compatibility --------------------------------------------------------------


async def raw_post(client: TestClient[Any, Any], path: str, doc: Any) -> bytes:
    """Everything the server sends until it closes: framing included."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    body = orjson.dumps(doc)
    writer.write(
        b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (path.encode(), len(body))
        + body
    )
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_fault_control_slows_fails_and_cuts_until_cleared(
    client: TestClient[Any, Any],
) -> None:
    stream = {**CHAT, "stream": True}
    async with client.get("/_mock/fault") as resp:
        assert (await resp.json())["active"] is False

    async def fault(body: Any) -> tuple[int, Any]:
        async with client.post("/_mock/fault", data=orjson.dumps(body)) as resp:
            return resp.status, await resp.json()

    # Slow: added to the header overrides, not replaced by them.
    status, shown = await fault({"ttft_ms": 150, "chunk_ms": 20})
    assert status == 200 and shown["active"] and shown["ttft_ms"] == 150
    started = time.monotonic()
    assert (await post(client, "/v1/chat/completions", CHAT, headers={"X-Mock-TTFT-Ms": "5"}))[
        0
    ] == 200
    assert time.monotonic() - started >= 0.155
    started = time.monotonic()
    async with client.post("/v1/chat/completions", json=stream) as resp:
        await resp.read()
    assert time.monotonic() - started >= 0.15 + 5 * 0.02

    # A status to a share of requests, in the route's dialect.
    await fault({"status": 503, "rate": 1.0})
    code, body = await post(client, "/v1/messages", {**CHAT, "max_tokens": 5})
    assert code == 503 and body["error"]["type"] == "overloaded_error"
    await fault({"status": 500, "rate": 0.0})
    assert (await post(client, "/v1/chat/completions", CHAT))[0] == 200

    # Cut: the connection drops after two token events, with no end of the chunked body.
    await fault({"cut_after": 2})
    async with client.post("/v1/chat/completions", json=stream) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert (await post(client, "/v1/chat/completions", CHAT))[0] == 200  # not a stream: whole
    await fault({"cut_after": 1, "partial": True})  # and half of the next event's chunk first
    chunks = (await raw_post(client, "/v1/chat/completions", stream)).split(b"\r\n\r\n", 1)[1]
    sizes = []
    while b"\r\n" in chunks:
        size, _, chunks = chunks.partition(b"\r\n")
        sizes.append(int(size, 16))
        if len(chunks) < sizes[-1]:
            break
        assert chunks[sizes[-1] : sizes[-1] + 2] == b"\r\n"
        chunks = chunks[sizes[-1] + 2 :]
    assert len(sizes) == 3 and 0 < len(chunks) < sizes[-1]  # role, one token, half of one

    # Cleared, and bad faults refused (the one in force stays).
    assert (await fault({}))[1]["active"] is False
    async with client.post("/v1/chat/completions", json=stream) as resp:
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    bad_faults = ({"status": 200}, {"rate": 2}, {"cut_after": -2}, {"nope": 1}, {"ttft_ms": "1"})
    for bad in (*bad_faults, {"partial": 1}):
        status, shown = await fault(bad)
        assert status == 400 and "bad fault" in shown["error"]["message"], bad
    async with client.post("/_mock/fault", data=b"[") as resp:
        assert resp.status == 400
    async with client.get("/_mock/fault") as resp:
        assert (await resp.json())["active"] is False


async def test_openai_sdk_round_trip(client: TestClient[Any, Any]) -> None:
    openai = pytest.importorskip("openai")
    async with openai.AsyncOpenAI(
        base_url=f"{base_url(client)}/v1", api_key="x", max_retries=0
    ) as sdk:
        chat = await sdk.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "hi"}]
        )
        assert chat.choices[0].message.content == "tok1 tok2 tok3 tok4 tok5 "
        assert chat.usage is not None and chat.usage.completion_tokens == 5
        stream = await sdk.chat.completions.create(
            model="m1",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        parts, usage = [], None
        async for chunk in stream:
            parts += [c.delta.content or "" for c in chunk.choices]
            usage = chunk.usage or usage
        assert "".join(parts) == "tok1 tok2 tok3 tok4 tok5 "
        assert usage is not None and usage.total_tokens == 7
        emb = await sdk.embeddings.create(model="m1", input=["alpha beta", "gamma"])
        _, raw = await post(
            client, "/v1/embeddings", {"model": "m1", "input": ["alpha beta", "gamma"]}
        )
        assert [d.embedding for d in emb.data] == [d["embedding"] for d in raw["data"]]
        text = await sdk.completions.create(model="org/m2", prompt="x", max_tokens=1)
        assert text.choices[0].text == "tok1 " and text.choices[0].finish_reason == "length"
        with pytest.raises(openai.NotFoundError):
            await sdk.chat.completions.create(model="zz", messages=[])


async def test_openai_sdk_tool_round_trip(client: TestClient[Any, Any]) -> None:
    openai = pytest.importorskip("openai")
    async with openai.AsyncOpenAI(
        base_url=f"{base_url(client)}/v1", api_key="x", max_retries=0
    ) as sdk:
        asked = await sdk.chat.completions.create(model="m1", messages=HELLO, tools=TOOLS)
        choice = asked.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        [call] = choice.message.tool_calls
        assert call.function.name == "weather"
        assert orjson.loads(call.function.arguments) == WEATHER_ARGS
        messages = _tool_result(call.model_dump())
        answered = await sdk.chat.completions.create(model="m1", messages=messages, tools=TOOLS)
        assert answered.choices[0].message.content == "tok1 tok2 tok3 tok4 tok5 "
        assert answered.choices[0].message.tool_calls is None

        # Streamed: the SDK's deltas join into the same call.
        stream = await sdk.chat.completions.create(
            model="m1", messages=HELLO, tools=TOOLS, tool_choice=_named("clock"),
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        name, arguments, finish, usage = "", "", None, None
        async for chunk in stream:
            usage = chunk.usage or usage
            for c in chunk.choices:
                finish = c.finish_reason or finish
                for delta in c.delta.tool_calls or []:
                    assert delta.index == 0 and delta.function is not None
                    name += delta.function.name or ""
                    arguments += delta.function.arguments or ""
        assert (name, orjson.loads(arguments), finish) == (
            "clock",
            {"zone": "UTC", "n": 1},
            "tool_calls",
        )
        assert usage is not None and usage.completion_tokens == 5
    async with client.get("/_mock/requests") as resp:
        sent = [r["body"] for r in await resp.json()]
    assert sent[1]["messages"][-1] == {"role": "tool", "tool_call_id": call.id, "content": "sunny"}
    assert [b["tools"] for b in sent] == [TOOLS] * 3


async def test_anthropic_sdk_round_trip(client: TestClient[Any, Any]) -> None:
    anthropic = pytest.importorskip("anthropic")
    messages = [{"role": "user", "content": "hi"}]
    async with anthropic.AsyncAnthropic(
        base_url=base_url(client), api_key="x", max_retries=0
    ) as sdk:
        msg = await sdk.messages.create(model="m1", max_tokens=3, messages=messages)
        assert msg.content[0].text == "tok1 tok2 tok3 "
        assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3
        async with sdk.messages.stream(model="m1", max_tokens=64, messages=messages) as stream:
            pieces = [t async for t in stream.text_stream]
            final = await stream.get_final_message()
        assert "".join(pieces) == "tok1 tok2 tok3 tok4 tok5 "
        assert final.stop_reason == "end_turn" and final.usage.output_tokens == 5
        assert final.usage.input_tokens == 2
        with pytest.raises(anthropic.NotFoundError):
            await sdk.messages.create(model="zz", max_tokens=1, messages=messages)


# --- faults a stream can meet: stall, error event, Retry-After, count -------------------------


async def set_fault(client: TestClient[Any, Any], **fields: Any) -> Any:
    async with client.post("/_mock/fault", json=fields) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def data_events(resp: aiohttp.ClientResponse, count: int) -> list[Any]:
    """The next `count` SSE `data:` payloads of a stream still open, JSON-decoded."""
    events: list[Any] = []
    while len(events) < count:
        line = await asyncio.wait_for(resp.content.readline(), 2)
        assert line, f"the stream ended after {len(events)} events"
        if line.startswith(b"data: "):
            events.append(orjson.loads(line[6:]))
            assert await resp.content.readline() == b"\n"  # the event's end
    return events


async def test_stall_after_sends_k_events_then_silence_until_the_client_leaves(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    shown = await set_fault(client, stall_after=2)
    assert shown["stall_after"] == 2 and shown["active"] and shown["left"] is None
    with caplog.at_level(logging.ERROR):
        async with client.post("/v1/chat/completions", json=CHAT | {"stream": True}) as resp:
            assert resp.status == 200
            role, *tokens = await data_events(resp, 3)
            assert role["choices"][0]["delta"]["role"] == "assistant"
            assert [t["choices"][0]["delta"]["content"] for t in tokens] == ["tok1 ", "tok2 "]
            with pytest.raises(TimeoutError):  # open, and silent
                await asyncio.wait_for(resp.content.readline(), 0.3)
            assert not resp.content.at_eof()
            resp.close()  # the client leaves; the mock's handler notices and ends
        await asyncio.sleep(0.15)
        await set_fault(client)
        status, body = await post(client, "/v1/chat/completions", CHAT)
        assert status == 200 and body["choices"][0]["message"]["content"].count("tok") == 5
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_stall_ends_in_a_cut_at_its_cap(
    client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mock_module, "STALL_CAP_S", 0.3)
    await set_fault(client, stall_after=1)
    started = time.monotonic()
    async with client.post("/v1/chat/completions", json=CHAT | {"stream": True}) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert 0.25 < time.monotonic() - started < 2


async def test_stall_before_the_first_token_and_not_for_whole_answers(
    client: TestClient[Any, Any],
) -> None:
    await set_fault(client, stall_after=0)
    async with client.post("/v1/messages", json=CHAT | {"stream": True}) as resp:
        head = [await resp.content.readline() for _ in range(9)]  # 3 events, 3 lines each
        assert [line.split(b" ")[0] for line in head[::3]] == [b"event:"] * 3
        assert b"ping" in head[6]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(resp.content.readline(), 0.3)
    assert (await post(client, "/v1/messages", CHAT | {"max_tokens": 9}))[0] == 200


VLLM_STREAM_ERROR = {
    "error": {"message": "Internal server error", "type": "InternalServerError", "param": None,
              "code": 500},
}  # fmt: skip


@pytest.mark.parametrize(("path", "text"), [
    ("/v1/chat/completions", lambda e: e["choices"][0]["delta"]["content"]),
    ("/v1/completions", lambda e: e["choices"][0]["text"]),
])  # fmt: skip
async def test_error_after_ends_an_openai_stream_as_vllm_does(
    client: TestClient[Any, Any], path: str, text: Any
) -> None:
    await set_fault(client, error_after=3)
    request = {"model": "m1", "stream": True, "stream_options": {"include_usage": True}}
    request |= {"messages": CHAT["messages"]} if "chat" in path else {"prompt": "hi"}
    async with client.post(path, json=request) as resp:
        assert resp.status == 200
        events = await sse_data(resp)  # the body ends cleanly: no payload error
    tokens = [e for e in events[:-2] if e.get("choices") and text(e)]
    assert [text(e) for e in tokens] == ["tok1 ", "tok2 ", "tok3 "]
    assert events[-2:] == [VLLM_STREAM_ERROR, "[DONE]"]  # no finish_reason, no usage
    assert all(c["finish_reason"] is None for e in events[:-2] for c in e["choices"])


async def test_error_after_in_anthropic_and_gemini(client: TestClient[Any, Any]) -> None:
    await set_fault(client, error_after=2)
    async with client.post("/v1/messages", json=CHAT | {"stream": True}) as resp:
        blocks = [b for b in (await resp.read()).decode().split("\n\n") if b]
    names = [b.split("\n")[0].removeprefix("event: ") for b in blocks]
    assert names == ["message_start", "content_block_start", "ping", *["content_block_delta"] * 2,
                     "error"]  # fmt: skip
    error = {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}}
    assert orjson.loads(blocks[-1].split("\n")[1].removeprefix("data: ")) == error

    path = "/v1beta/models/m1:streamGenerateContent"
    async with client.post(path + "?alt=sse", json=GEMINI) as resp:
        sse = await sse_data(resp)
    status, array = await post(client, path, GEMINI)  # the array still parses: closed after it
    assert status == 200
    for chunks in (sse, array):
        texts = [c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks[:-1]]
        assert texts == ["tok1 ", "tok2 "] and "finishReason" not in chunks[-2]["candidates"][0]
        assert chunks[-1]["error"]["code"] == 500 and chunks[-1]["error"]["status"] == "INTERNAL"
    await set_fault(client, error_after=0)
    status, array = await post(client, path, GEMINI)
    assert status == 200 and [set(e) for e in array] == [{"error"}]


async def test_retry_after_and_count_fail_the_next_request_only(make_client: Any) -> None:
    broken, healthy = await make_client(), await make_client()
    shown = await set_fault(broken, status=503, retry_after="7", count=1)
    assert shown["active"] and shown["count"] == 1 and shown["left"] == 1
    async with broken.post("/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 503 and resp.headers["Retry-After"] == "7"
        assert (await resp.json())["error"]["code"] == "mock_fault"
    async with broken.get("/_mock/fault") as resp:
        assert (await resp.json())["active"] is False
    async with broken.post("/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200 and "Retry-After" not in resp.headers
    assert (await post(healthy, "/v1/chat/completions", CHAT))[0] == 200

    # A count of two, on a stream fault; the Anthropic route says Retry-After too.
    await set_fault(broken, error_after=1, count=2)
    for left in (1, 0):
        async with broken.post("/v1/chat/completions", json=CHAT | {"stream": True}) as resp:
            assert (await sse_data(resp))[-2:] == [VLLM_STREAM_ERROR, "[DONE]"]
        async with broken.get("/_mock/fault") as resp:
            assert (await resp.json())["active"] is (left > 0)
    async with broken.post("/v1/chat/completions", json=CHAT | {"stream": True}) as resp:
        assert (await sse_data(resp))[-2]["choices"][0]["finish_reason"] == "stop"
    await set_fault(broken, status=429, retry_after="Wed, 21 Oct 2015 07:28:00 GMT")
    for _ in range(2):  # no count: until the next POST
        async with broken.post("/v1/messages", json=CHAT | {"max_tokens": 3}) as resp:
            assert resp.status == 429 and resp.headers["Retry-After"].endswith("GMT")
            assert (await resp.json())["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize("bad", [
    {"retry_after": "5"},  # without a status, it would never be sent
    {"status": 503, "retry_after": "5\r\nX-Evil: 1"},
    {"status": 503, "retry_after": 5},
    {"count": -1},
    {"count": 1.5},
    {"stall_after": -2},
    {"error_after": True},
    {"stall_after": 1, "error_after": 2},
    {"cut_after": 0, "stall_after": 0},
])  # fmt: skip
async def test_bad_new_faults_are_refused(client: TestClient[Any, Any], bad: Any) -> None:
    await set_fault(client, ttft_ms=1)
    async with client.post("/_mock/fault", json=bad) as resp:
        assert resp.status == 400 and "bad fault" in (await resp.json())["error"]["message"]
    async with client.get("/_mock/fault") as resp:
        assert (await resp.json())["ttft_ms"] == 1  # the one in force stays


# --- context length -------------------------------------------------------------------------


def vllm_context_error(context: int, prompt: int, completion: int) -> dict[str, Any]:
    message = (
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{completion} output tokens and your prompt contains at least {prompt} input tokens, "
        f"for a total of at least {prompt + completion} tokens. Please reduce the length of the "
        f"input prompt or the number of requested output tokens. "
        f"(parameter=input_tokens, value={prompt})"
    )
    return {"error": {"message": message, "type": "BadRequestError", "param": "input_tokens",
                      "code": 400}}  # fmt: skip


async def test_context_length_is_refused_in_vllms_words(make_client: Any) -> None:
    small = await make_client(context=10)
    # CHAT's prompt is 3 tokens: the answer's 5 fit, 8 asked for do not.
    assert (await post(small, "/v1/chat/completions", CHAT))[0] == 200
    assert (await post(small, "/v1/chat/completions", CHAT | {"max_tokens": 7}))[0] == 200
    for asked in ({"max_tokens": 8}, {"max_completion_tokens": 8, "max_tokens": 1}):
        status, body = await post(small, "/v1/chat/completions", CHAT | asked)
        assert (status, body) == (400, vllm_context_error(10, 3, 8))
    status, body = await post(small, "/v1/chat/completions", CHAT, headers={"X-Mock-Tokens": "8"})
    assert (status, body) == (400, vllm_context_error(10, 3, 8))  # no limit: the answer's length
    request = {"model": "m1", "prompt": "one two three four", "stream": True}
    status, body = await post(small, "/v1/completions", request, headers={"X-Mock-Context": "8"})
    assert (status, body) == (400, vllm_context_error(8, 4, 5))
    # The header overrides the option: 0 is unlimited.
    headers = {"X-Mock-Context": "0"}
    assert (await post(small, "/v1/chat/completions", CHAT | {"max_tokens": 99}, headers=headers))[
        0
    ] == 200
    big = CHAT | {"max_tokens": 99}
    assert (await post(await make_client(), "/v1/chat/completions", big))[0] == 200


async def test_context_length_in_anthropic_and_gemini_words(client: TestClient[Any, Any]) -> None:
    headers = {"X-Mock-Context": "6"}
    status, body = await post(client, "/v1/messages", CHAT | {"max_tokens": 4}, headers=headers)
    assert status == 400 and body["type"] == "error"
    assert body["error"] == {
        "type": "invalid_request_error",
        "message": "input length and `max_tokens` exceed context limit: 3 + 4 > 6, decrease "
        "input length or `max_tokens` and try again",
    }
    long = {"model": "m1", "max_tokens": 1, "messages": [{"role": "user", "content": "a " * 9}]}
    status, body = await post(client, "/v1/messages", long, headers=headers)
    assert body["error"]["message"] == "prompt is too long: 10 tokens > 6 maximum"
    path = "/v1beta/models/m1:generateContent"
    status, body = await post(client, path, GEMINI, headers={"X-Mock-Context": "4"})
    assert status == 400 and body["error"]["status"] == "INVALID_ARGUMENT"
    assert body["error"]["message"] == (
        "The input token count (5) exceeds the maximum number of tokens allowed (4)."
    )
    status, body = await post(client, path, GEMINI, headers={"X-Mock-Context": "9"})
    assert status == 400 and "plus maxOutputTokens (5)" in body["error"]["message"]
    assert (await post(client, path, GEMINI, headers={"X-Mock-Context": "10"}))[0] == 200


# --- continuation ---------------------------------------------------------------------------

FULL = "tok1 tok2 tok3 tok4 tok5 "


def prefill(held: int) -> str:
    return "".join(f"tok{i} " for i in range(1, held + 1))


def continued_chat(held: int, **extra: Any) -> dict[str, Any]:
    assistant = {"role": "assistant", "content": prefill(held)}
    return {"model": "m1", "messages": [*HELLO, assistant], **extra}


@pytest.mark.parametrize("held", range(6))
async def test_chat_continues_a_final_assistant_message(
    client: TestClient[Any, Any], held: int
) -> None:
    for extra in ({}, {"continue_final_message": True, "add_generation_prompt": False}):
        status, body = await post(client, "/v1/chat/completions", continued_chat(held, **extra))
        assert status == 200
        assert prefill(held) + body["choices"][0]["message"]["content"] == FULL
        assert body["choices"][0]["finish_reason"] == "stop"
        # The prompt counts the prefill: 2 + 1 for the user's, held + 1 for the assistant's.
        usage = {"prompt_tokens": held + 4, "completion_tokens": 5 - held}
        assert usage.items() <= body["usage"].items()
    request = continued_chat(held, stream=True, stream_options={"include_usage": True})
    async with client.post("/v1/chat/completions", json=request) as resp:
        events = await sse_data(resp)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events[1:-2]]
    assert prefill(held) + "".join(pieces) == FULL
    assert events[-2]["usage"]["completion_tokens"] == 5 - held and events[-1] == "[DONE]"


async def test_a_broken_stream_joined_with_its_continuation_is_the_whole_answer(
    make_client: Any,
) -> None:
    first, second = await make_client(), await make_client(name="mock-b")
    whole = (await post(first, "/v1/chat/completions", CHAT))[1]["choices"][0]["message"]
    await set_fault(first, error_after=2, count=1)
    async with first.post("/v1/chat/completions", json=CHAT | {"stream": True}) as resp:
        events = await sse_data(resp)
    part = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-2])
    assert part == "tok1 tok2 "
    request = CHAT | {"stream": True, "messages": [*HELLO, {"role": "assistant", "content": part}]}
    async with second.post("/v1/chat/completions", json=request) as resp:
        assert resp.headers["X-Mock-Server"] == "mock-b"
        rest = await sse_data(resp)
    assert rest[0]["id"] != events[0]["id"]
    assert (
        part + "".join(e["choices"][0]["delta"].get("content", "") for e in rest[1:-1])
        == (whole["content"])
    )


async def test_continuation_within_max_tokens(client: TestClient[Any, Any]) -> None:
    cases = [(1, 2, "tok2 tok3 ", "length"), (3, 5, "tok4 tok5 ", "stop"), (3, 2, "tok4 tok5 ",
             "stop"), (5, 3, "", "stop"), (0, 1, "tok1 ", "length")]  # fmt: skip
    for held, limit, text, finish in cases:
        request = continued_chat(held, max_completion_tokens=limit)
        _, body = await post(client, "/v1/chat/completions", request)
        assert _chat_text(body)[1] == finish and body["choices"][0]["message"]["content"] == text
    # Content parts, and a prefill that is not the mock's own: the answer from its start.
    parts = [{"type": "text", "text": "tok1 "}, {"type": "text", "text": "tok2 "}]
    request = {"model": "m1", "messages": [*HELLO, {"role": "assistant", "content": parts}]}
    _, body = await post(client, "/v1/chat/completions", request)
    assert body["choices"][0]["message"]["content"] == "tok3 tok4 tok5 "
    _, body = await post(client, "/v1/chat/completions", continued_chat(0) | {
        "messages": [*HELLO, {"role": "assistant", "content": "Sure: tok1 "}]})  # fmt: skip
    assert body["choices"][0]["message"]["content"] == FULL
    # A final assistant message is continued in words even where tools are offered.
    _, body = await post(client, "/v1/chat/completions", continued_chat(4) | {"tools": TOOLS})
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "tok5 "}


@pytest.mark.parametrize(("generation_prompt", "message"), [
    ({"add_generation_prompt": True},
     "Value error, Cannot set both `continue_final_message` and `add_generation_prompt` to True."),
    ({}, "continue_final_message and add_generation_prompt are not compatible."),
])  # fmt: skip
async def test_continue_final_message_needs_no_generation_prompt(
    client: TestClient[Any, Any], generation_prompt: dict[str, Any], message: str
) -> None:
    request = continued_chat(2, continue_final_message=True, **generation_prompt)
    status, body = await post(client, "/v1/chat/completions", request)
    assert status == 400 and body["error"]["message"].startswith(message)
    kind = "Bad Request" if generation_prompt else "BadRequestError"
    assert body["error"]["type"] == kind and body["error"]["code"] == 400
    async with client.get("/_mock/requests") as resp:  # read and logged, then refused
        assert (await resp.json())[-1]["body"]["continue_final_message"] is True


@pytest.mark.parametrize("held", range(6))
async def test_completions_continue_a_prompt_that_ends_with_the_answer(
    client: TestClient[Any, Any], held: int
) -> None:
    request = {"model": "m1", "prompt": "Write it: " + prefill(held)}
    _, body = await post(client, "/v1/completions", request)
    assert prefill(held) + body["choices"][0]["text"] == FULL
    assert body["usage"] == {"prompt_tokens": 2 + held, "completion_tokens": 5 - held,
                             "total_tokens": 7}  # fmt: skip
    async with client.post("/v1/completions", json=request | {"stream": True}) as resp:
        events = await sse_data(resp)
    assert prefill(held) + "".join(e["choices"][0]["text"] for e in events[:-1]) == FULL


@pytest.mark.parametrize("prompt", ["tok1 tok3 ", "xtok1 ", "tok1 tok2", "tok2 ", "tok0 ", "tok "])
async def test_completions_continue_only_an_exact_run(
    client: TestClient[Any, Any], prompt: str
) -> None:
    _, body = await post(client, "/v1/completions", {"model": "m1", "prompt": prompt})
    assert body["choices"][0]["text"] == FULL


@pytest.mark.parametrize("held", [0, 2, 5])
async def test_anthropic_and_gemini_continue_a_final_assistant_turn(
    client: TestClient[Any, Any], held: int
) -> None:
    blocks = [{"type": "text", "text": prefill(held)}]
    for content in (prefill(held), blocks):
        assistant = {"role": "assistant", "content": content}
        request = {"model": "m1", "max_tokens": 9, "messages": [*HELLO, assistant]}
        _, body = await post(client, "/v1/messages", request)
        assert prefill(held) + body["content"][0]["text"] == FULL
        assert body["usage"] == {"input_tokens": held + 4, "output_tokens": 5 - held}
    async with client.post("/v1/messages", json=request | {"stream": True}) as resp:
        events = [e for e in (await resp.read()).decode().split("\n\n") if e]
    datas = [orjson.loads(e.split("\n")[1].removeprefix("data: ")) for e in events]
    texts = [d["delta"]["text"] for d in datas if d["type"] == "content_block_delta"]
    assert prefill(held) + "".join(texts) == FULL

    model = {"role": "model", "parts": [{"text": prefill(held)}]}
    request = {"contents": [*GEMINI["contents"], model]}
    _, body = await post(client, "/v1beta/models/m1:generateContent", request)
    candidate = body["candidates"][0]
    assert prefill(held) + candidate["content"]["parts"][0]["text"] == FULL
    assert candidate["finishReason"] == "STOP"
    status, body = await post(client, "/v1beta/models/m1:streamGenerateContent", request)
    texts = [c["candidates"][0]["content"]["parts"][0]["text"] for c in body]
    assert prefill(held) + "".join(texts) == FULL


def test_held_tokens_are_counted_from_the_right_end() -> None:
    assert [held_prefix(t) for t in ("", "tok1", "tok1 ", "tok1 tok2 x", "tok2 tok1 ")] == [
        0, 0, 1, 2, 0]  # fmt: skip
    texts = ("", "tok1 ", "a tok1 tok2 ", "tok1 tok2 tok1 ", "a\ttok1 ", "tok١ ", "tok99999 ")
    assert [held_suffix(t) for t in texts] == [0, 1, 2, 1, 1, 0, 0]


# --- options, CLI arguments, serve --------------------------------------------------


def test_arguments_map_onto_options() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert options_from_args(parser.parse_args([])) == MockOptions()
    argv = "--port 7 --model a --model b --name n --ttft-ms 5 --chunk-ms 1.5 --tokens 3"
    opts = options_from_args(parser.parse_args([*argv.split(), "--fail-rate", "0.25"]))
    assert opts == MockOptions(7, "127.0.0.1", ("a", "b"), "n", 5.0, 1.5, 3, 0.25)
    opts = options_from_args(parser.parse_args(["--keepalive-s", "0.2"]))
    assert opts.keepalive_s == 0.2
    opts = options_from_args(parser.parse_args(["--speaks", "openai, gemini"]))
    assert opts.speaks == ("openai", "gemini")
    assert options_from_args(parser.parse_args(["--context", "4096"])).context == 4096


@pytest.mark.parametrize(
    "argv",
    [
        ["--fail-rate", "1.5"],
        ["--tokens", "-1"],
        ["--context", "-1"],
        ["--ttft-ms", "x"],
        ["--speaks", "anthropic"],
        ["--speaks", "openai,vertex"],
        ["--speaks", ""],
    ],
)
def test_bad_arguments_are_rejected(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert argv[0] in capsys.readouterr().err


def test_options_validate_themselves() -> None:
    with pytest.raises(ValueError):
        MockOptions(fail_rate=2.0)
    with pytest.raises(ValueError):
        MockOptions(models=())
    with pytest.raises(ValueError, match="context"):
        MockOptions(context=-1)


async def test_serve_prints_ready_line_and_cleans_up(capsys: pytest.CaptureFixture[str]) -> None:
    opts = MockOptions(port=0, models=("a", "b"), name="srv", keepalive_s=0.2)
    task = asyncio.create_task(serve(opts))
    out = ""
    for _ in range(100):
        await asyncio.sleep(0.01)
        out += capsys.readouterr().out
        if out:
            break
    prefix = "mock srv serving a,b on http://127.0.0.1:"
    assert out.startswith(prefix) and out.endswith("\n")
    url = out.strip().rsplit(" ", 1)[1]
    async with aiohttp.ClientSession() as session, session.get(f"{url}/health") as resp:
        assert resp.status == 200 and resp.headers["X-Mock-Server"] == "srv"
    # An idle keep-alive connection is closed by the mock after keepalive_s, not before.
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    await reader.readexactly(len(b'{"status":"ok"}'))
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 2) == b""
    assert 0.15 < time.monotonic() - started < 1.5
    writer.close()
    await writer.wait_closed()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"{url}/health")
