"""Every dialect on every engine: Anthropic's and Gemini's official SDKs through the edge to mock
servers that speak only OpenAI's API, the request and its answer translated (JSON and streams,
tools, images, errors), the servers' dialects configured or learnt; and a server that speaks the
client's dialect still gets the bytes as they came."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from edge.access.keys import FileBackend, Limits, create_key
from tests.observe.test_metrics import scrape, total

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
WEATHER: Any = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
    },
}  # fmt: skip


async def openai_only(start_mock: Any, start_edge: Any, configured: bool = True) -> tuple[Any, str]:
    """An edge in front of one mock that speaks only OpenAI's API: said in [dialects], or not
    (then learnt from the mock's 404)."""
    mock = await start_mock(models=("m",), speaks=("openai",), tokens=5)
    dialects = {mock: ["openai"]} if configured else None
    edge = await start_edge({"m": [mock]}, dialects=dialects)
    return edge, mock


async def sent_upstream(mock: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as client, client.get(f"{mock}/_mock/requests") as resp:
        requests: list[dict[str, Any]] = await resp.json()
    return requests


@contextlib.asynccontextmanager
async def gemini_client(edge: Any) -> AsyncIterator[genai.Client]:
    """Gemini's SDK on a session of our own: its default async session subclasses aiohttp's
    ClientSession, which aiohttp warns about (and warnings fail the tests)."""
    async with aiohttp.ClientSession() as session:
        options = types.HttpOptions(base_url=edge.url, aiohttp_client=session)
        yield genai.Client(api_key="g-key", http_options=options)


# --- Anthropic ---------------------------------------------------------------------------------


async def test_anthropic_sdk_plain_and_streaming_through_an_openai_only_server(
    start_mock, start_edge
):
    edge, mock = await openai_only(start_mock, start_edge)
    client = anthropic.AsyncAnthropic(base_url=edge.url, api_key="a-key", max_retries=0)
    msg = await client.messages.create(
        model="m", max_tokens=64, system="Be brief.",
        messages=[{"role": "user", "content": "hello there"}],
    )  # fmt: skip
    assert msg.content[0].type == "text" and msg.content[0].text == "tok1 tok2 tok3 tok4 tok5 "
    assert msg.stop_reason == "end_turn" and msg.usage.output_tokens == 5
    async with client.messages.stream(
        model="m", max_tokens=3, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    await client.close()
    assert text == "tok1 tok2 tok3 " and final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 3
    plain, streamed = await sent_upstream(mock)
    assert plain["path"] == streamed["path"] == "/v1/chat/completions"
    assert plain["body"]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert plain["body"]["max_tokens"] == 64 and streamed["body"]["stream"] is True
    # Passthrough: the client's key reaches the server where OpenAI's API reads it.
    assert plain["headers"]["authorization"] == "Bearer a-key"
    assert "x-api-key" not in plain["headers"] and "anthropic-version" not in plain["headers"]
    s = await _samples(edge)
    assert total(s, "edge_translated_requests_total", **{"from": "anthropic"}) == 2
    assert total(s, "edge_tokens_total", type="completion") == 8  # usage read as it passed


async def test_anthropic_tool_call_round_trip_and_an_image(start_mock, start_edge):
    edge, mock = await openai_only(start_mock, start_edge)
    client = anthropic.AsyncAnthropic(base_url=edge.url, api_key="a-key", max_retries=0)
    image = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(PNG).decode()}
    question = {
        "role": "user",
        "content": [
            {"type": "image", "source": image},
            {"type": "text", "text": "What is the weather where this was taken?"},
        ],
    }
    async with client.messages.stream(
        model="m",
        max_tokens=64,
        tools=[WEATHER],
        messages=[question],  # type: ignore[list-item]
    ) as stream:
        called = await stream.get_final_message()
    assert called.stop_reason == "tool_use"
    (use,) = [b for b in called.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "mock"}
    answer = await client.messages.create(
        model="m", max_tokens=64, tools=[WEATHER],
        messages=[
            question,  # type: ignore[list-item]
            {"role": "assistant", "content": called.content},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 21 C"},
            ]},
        ],
    )  # fmt: skip
    await client.close()
    assert answer.stop_reason == "end_turn" and answer.content[0].type == "text"
    first, second = (r["body"] for r in await sent_upstream(mock))
    part = first["messages"][0]["content"][0]
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith(
        "data:image/png;base64,"
    )
    assert first["tools"][0]["function"]["name"] == "get_weather"
    call = second["messages"][1]["tool_calls"][0]
    assert second["messages"][2] == {
        "role": "tool", "tool_call_id": call["id"], "content": "Sunny, 21 C",
    }  # fmt: skip


async def test_anthropic_errors_come_back_in_anthropic_s_shape(start_mock, start_edge):
    edge, mock = await openai_only(start_mock, start_edge)
    client = anthropic.AsyncAnthropic(base_url=edge.url, api_key="a-key", max_retries=0)
    async with aiohttp.ClientSession() as http:
        # Not translatable (Anthropic requires max_tokens): refused before any host is asked.
        async with http.post(
            f"{edge.url}/v1/messages", json={"model": "m", "messages": []}
        ) as resp:
            doc = await resp.json()
        assert resp.status == 400 and doc["type"] == "error"
        assert doc["error"]["type"] == "invalid_request_error"
        await http.post(f"{mock}/_mock/fault", json={"status": 400})
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.messages.create(
            model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    await client.close()
    assert caught.value.status_code == 400
    assert caught.value.body["type"] == "error"  # type: ignore[index]


async def test_a_stream_broken_mid_answer_ends_with_anthropic_s_error_event(start_mock, start_edge):
    edge, mock = await openai_only(start_mock, start_edge)
    async with aiohttp.ClientSession() as http:
        await http.post(f"{mock}/_mock/fault", json={"cut_after": 3})
        body = {"model": "m", "max_tokens": 64, "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        async with http.post(f"{edge.url}/v1/messages", json=body) as resp:
            raw = await resp.read()
    events = [e for e in raw.decode().split("\n\n") if e.strip()]
    assert events[0].startswith("event: message_start")
    assert events[-1].startswith("event: error") and "api_error" in events[-1]
    assert not any(e.startswith("event: message_stop") for e in events)


async def test_a_server_that_speaks_anthropic_gets_the_request_as_it_came(start_mock, start_edge):
    mock = await start_mock(models=("m",), tokens=2)  # speaks all three
    edge = await start_edge({"m": [mock]})
    client = anthropic.AsyncAnthropic(base_url=edge.url, api_key="a-key", max_retries=0)
    msg = await client.messages.create(
        model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
    )
    await client.close()
    assert msg.usage.output_tokens == 2
    (sent,) = await sent_upstream(mock)
    assert sent["path"] == "/v1/messages"
    s = await _samples(edge)
    assert total(s, "edge_translated_requests_total") == 0


async def test_a_404_on_the_dialect_s_path_is_learnt_and_the_request_goes_on_translated(
    start_mock, start_edge
):
    edge, mock = await openai_only(start_mock, start_edge, configured=False)
    client = anthropic.AsyncAnthropic(base_url=edge.url, api_key="a-key", max_retries=0)
    for _ in range(3):
        msg = await client.messages.create(
            model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
        assert msg.content[0].type == "text"
    await client.close()
    assert edge.speaks.learnt == 1  # the first request taught it; the others went translated
    assert [r["path"] for r in await sent_upstream(mock)] == ["/v1/chat/completions"] * 3
    (host,) = edge.view.fleet.models["m"]
    assert host.fails_in_row == 0 and host.state == "up"  # a 404 there is no failure


# --- Gemini ------------------------------------------------------------------------------------


async def test_gemini_sdk_generate_content_and_its_stream(start_mock, start_edge):
    edge, mock = await openai_only(start_mock, start_edge)
    async with gemini_client(edge) as client:
        await _generate_and_stream(client)
    plain, streamed = (r["body"] for r in await sent_upstream(mock))
    assert plain["messages"][0] == {"role": "system", "content": "Be brief."}
    assert plain["temperature"] == 0.2 and plain["max_tokens"] == 64 and plain["stop"] == ["END"]
    assert streamed["stream"] is True and streamed["max_tokens"] == 2
    s = await _samples(edge)
    assert total(s, "edge_translated_requests_total", **{"from": "gemini"}) == 2


async def _generate_and_stream(client: genai.Client) -> None:
    config = types.GenerateContentConfig(
        system_instruction="Be brief.", temperature=0.2, max_output_tokens=64,
        stop_sequences=["END"],
    )  # fmt: skip
    resp = await client.aio.models.generate_content(model="m", contents="hello", config=config)
    assert resp.text == "tok1 tok2 tok3 tok4 tok5 "
    assert resp.usage_metadata is not None and resp.usage_metadata.candidates_token_count == 5
    assert resp.candidates and resp.candidates[0].finish_reason == types.FinishReason.STOP
    pieces = [
        chunk.text or ""
        async for chunk in await client.aio.models.generate_content_stream(
            model="m", contents="hello", config=types.GenerateContentConfig(max_output_tokens=2)
        )
    ]
    assert "".join(pieces) == "tok1 tok2 "


async def test_gemini_function_call_round_trip_and_an_inline_image(start_mock, start_edge):
    edge, mock = await openai_only(start_mock, start_edge)
    async with gemini_client(edge) as client:
        await _call_a_function(client)
    first, second = (r["body"] for r in await sent_upstream(mock))
    assert first["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png")
    assert first["tools"][0]["function"]["parameters"]["properties"]["city"]["type"] == "string"
    call = second["messages"][1]["tool_calls"][0]
    reply = second["messages"][2]
    assert reply["role"] == "tool" and reply["tool_call_id"] == call["id"]
    assert orjson.loads(reply["content"]) == {"forecast": "Sunny"}


async def _call_a_function(client: genai.Client) -> None:
    tool = types.Tool(
        function_declarations=[
            types.FunctionDeclaration(
                name="get_weather",
                description="The weather in a city.",
                parameters=types.Schema(
                    type=types.Type.OBJECT,
                    properties={"city": types.Schema(type=types.Type.STRING)},
                    required=["city"],
                ),
            )  # fmt: skip
        ]
    )
    config = types.GenerateContentConfig(
        tools=[tool],
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
    )
    question = types.Content(
        role="user",
        parts=[types.Part.from_bytes(data=PNG, mime_type="image/png"), types.Part(text="Weather?")],
    )
    resp = await client.aio.models.generate_content(model="m", contents=[question], config=config)
    assert resp.function_calls and resp.function_calls[0].name == "get_weather"
    assert resp.function_calls[0].args == {"city": "mock"}
    assert resp.candidates and resp.candidates[0].content is not None
    answer = await client.aio.models.generate_content(
        model="m",
        contents=[
            question,
            resp.candidates[0].content,
            types.Content(
                role="user",
                parts=[
                    types.Part.from_function_response(
                        name="get_weather",
                        response={"forecast": "Sunny"},
                    )
                ],
            ),
        ],  # fmt: skip
        config=config,
    )
    assert answer.text


async def test_gemini_json_array_stream_errors_and_count_tokens(start_mock, start_edge):
    edge, mock = await openai_only(start_mock, start_edge)
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
            "generationConfig": {"maxOutputTokens": 3}}  # fmt: skip
    base = f"{edge.url}/v1beta/models/m"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}:streamGenerateContent", json=body) as resp:
            assert resp.headers["Content-Type"].startswith("application/json")
            array = orjson.loads(await resp.read())
        async with http.post(f"{base}:countTokens", json=body) as resp:
            counted = await resp.json()
            assert resp.status == 501 and counted["error"]["status"] == "UNIMPLEMENTED"
        await http.post(f"{mock}/_mock/fault", json={"status": 400})
    text = "".join(p.get("text", "") for c in array for p in c["candidates"][0]["content"]["parts"])
    assert text == "tok1 tok2 tok3 " and array[-1]["usageMetadata"]["candidatesTokenCount"] == 3
    with pytest.raises(genai_errors.ClientError) as caught:
        async with gemini_client(edge) as client:
            await client.aio.models.generate_content(model="m", contents="hi")
    assert caught.value.code == 400


async def _samples(edge: Any) -> Any:
    async with aiohttp.ClientSession() as client:
        return await scrape(client, edge.url)


async def test_a_translated_request_fails_over_and_honours_a_pin(start_mock, start_edge):
    broken = await start_mock(models=("m",), speaks=("openai",), tokens=2)
    good = await start_mock(models=("m",), speaks=("openai",), tokens=2)
    edge = await start_edge({"m": [broken, good]}, dialects={"http://127.0.0.1": ["openai"]})
    async with aiohttp.ClientSession() as http:
        await http.post(f"{broken}/_mock/fault", json={"status": 503})
    client = anthropic.AsyncAnthropic(base_url=edge.url, api_key="a-key", max_retries=0)
    for _ in range(4):  # whichever the balancer tries first, the answer comes from `good`
        reply = await client.messages.with_raw_response.create(
            model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
        message = await reply.parse()
        assert reply.headers["X-Edge-Server"] == good and message.usage.output_tokens == 2
    with pytest.raises(anthropic.InternalServerError) as caught:  # pinned to the broken one
        await client.messages.create(
            model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Edge-Server": broken},
        )  # fmt: skip
    await client.close()
    assert caught.value.status_code == 503
    assert "All servers failed" in caught.value.body["error"]["message"]  # type: ignore[index]


async def test_keys_rate_limits_metering_and_affinity_work_the_same_translated(
    start_mock, start_edge, tmp_path: Path
):
    path = str(tmp_path / "keys.json")
    _, key = create_key(FileBackend(path), "translated", limits=Limits(rpm=3))
    mock = await start_mock(models=("m",), speaks=("openai",), tokens=3)
    edge = await start_edge(
        {"m": [mock]}, dialects={mock: ["openai"]}, auth__mode="keys", auth__key_store=path,
        auth__upstream_keys={mock: "server-secret"},
    )  # fmt: skip
    client = anthropic.AsyncAnthropic(base_url=edge.url, api_key=key, max_retries=0)
    for _ in range(2):
        reply = await client.messages.with_raw_response.create(
            model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
        assert "set-cookie" not in reply.headers  # one server: no affinity work, no cookie
    async with aiohttp.ClientSession() as http:  # Gemini's key in the query, translated
        url = f"{edge.url}/v1beta/models/m:generateContent?key={key}"
        async with http.post(url, json={"contents": [{"parts": [{"text": "hi"}]}]}) as resp:
            assert resp.status == 200 and "candidates" in await resp.json()
    with pytest.raises(anthropic.RateLimitError) as caught:
        await client.messages.create(
            model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    await client.close()
    assert caught.value.body["type"] == "error"  # type: ignore[index]
    s = await _samples(edge)
    kid = key[8:16]
    assert total(s, "edge_key_tokens_total", key=kid, type="completion") == 9  # from the server
    assert total(s, "edge_key_requests_total", key=kid, code="2xx") == 3
    sent = await sent_upstream(mock)
    assert [r["headers"]["authorization"] for r in sent] == ["Bearer server-secret"] * 3
    assert key not in str(sent)  # the client's key never reaches the server
