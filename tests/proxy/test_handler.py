"""The proxy through the official SDKs and raw HTTP: routes, bad input, headers, local endpoints."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from multidict import CIMultiDictProxy

from tests.procs import free_port

MESSAGES: Any = [{"role": "user", "content": "hello there"}]
CHAT = {"model": "m1", "messages": MESSAGES}


@pytest.fixture
async def fleet(start_mock, start_edge):
    a = await start_mock(models=("m1", "m2"), name="A", tokens=5)
    b = await start_mock(models=("m1",), name="B", tokens=5)
    edge = await start_edge({"m1": [a, b], "m2": [a]}, server__max_body_bytes=4096)
    return edge


async def test_openai_async_sdk_plain_and_streaming(fleet):
    client = openai.AsyncOpenAI(base_url=f"{fleet.url}/v1", api_key="sk-test", max_retries=0)
    reply = await client.chat.completions.create(model="m1", messages=MESSAGES)
    assert reply.choices[0].message.content == "tok1 tok2 tok3 tok4 tok5 "
    assert reply.system_fingerprint in {"A", "B"}
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    stream = await client.chat.completions.create(
        model="m1", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    text, usage = [], None
    async for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
        usage = chunk.usage or usage
    assert "".join(text) == "tok1 tok2 tok3 tok4 tok5 "
    assert usage is not None and usage.completion_tokens == 5
    embedding = await client.embeddings.create(model="m2", input=["a", "b"])
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) == 8
    await client.close()


async def test_openai_sync_sdk_plain_and_streaming(fleet):
    def run() -> tuple[str, str]:
        with openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="k", max_retries=0) as client:
            reply = client.completions.create(model="m1", prompt="say")
            stream = client.chat.completions.create(model="m1", messages=MESSAGES, stream=True)
            streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            return reply.choices[0].text, streamed

    text, streamed = await asyncio.to_thread(run)
    assert text == streamed == "tok1 tok2 tok3 tok4 tok5 "


async def test_anthropic_sdk_messages_plain_and_streaming(fleet):
    client = anthropic.AsyncAnthropic(base_url=fleet.url, api_key="k", max_retries=0)
    msg = await client.messages.create(
        model="m1", max_tokens=3, messages=[{"role": "user", "content": "hi"}]
    )
    assert msg.content[0].type == "text" and msg.content[0].text == "tok1 tok2 tok3 "
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3
    async with client.messages.stream(
        model="m1", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        final = await stream.get_final_message()
    assert final.usage.output_tokens == 5 and final.stop_reason == "end_turn"
    await client.close()


async def test_gemini_routes_by_path_model_and_keeps_query(fleet):
    async with aiohttp.ClientSession() as client:
        url = f"{fleet.url}/v1beta/models/m2:streamGenerateContent?alt=sse"
        body = {"contents": [{"parts": [{"text": "hi"}]}]}
        async with client.post(url, json=body, headers={"x-goog-api-key": "g"}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = [e for e in (await resp.read()).split(b"\n\n") if e.strip()]
        async with client.post(f"{fleet.url}/v1beta/models/m2:generateContent", json=body) as r:
            doc = await r.json()
    assert len(events) == 5 and all(e.startswith(b"data: ") for e in events)
    assert doc["usageMetadata"]["candidatesTokenCount"] == 5


async def _post(url: str, data, **kw) -> tuple[int, Any, CIMultiDictProxy[str]]:
    async with aiohttp.ClientSession() as client:
        async with client.post(url, data=data, **kw) as resp:
            return resp.status, orjson.loads(await resp.read()), resp.headers


def _openai_error(doc: dict) -> dict:
    assert set(doc) == {"error", "detail"}
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    assert doc["detail"] == doc["error"]["message"]
    return doc["error"]


async def test_bad_input_openai_shapes(fleet):
    url = f"{fleet.url}/v1/chat/completions"
    status, doc, _ = await _post(url, b"not json")
    assert status == 400 and "JSON" in _openai_error(doc)["message"]
    status, doc, _ = await _post(url, b'{"messages": []}')
    assert status == 422 and _openai_error(doc)["param"] == "model"
    status, doc, _ = await _post(url, b'{"model": 7}')
    assert status == 422 and "'model'" in _openai_error(doc)["message"]
    status, doc, _ = await _post(url, b"[1, 2]")
    assert status == 422
    status, doc, _ = await _post(url, orjson.dumps({"model": "nope"}))
    err = _openai_error(doc)
    assert status == 404 and err["code"] == "model_not_found" and "/v1/models" in err["message"]
    status, doc, _ = await _post(url, b'{"model":"m1","pad":"' + b"x" * 5000 + b'"}')
    assert status == 413 and "4096" in _openai_error(doc)["message"]


async def test_body_over_limit_chunked_is_refused(fleet):
    async def body():
        for _ in range(10):
            yield b"x" * 1000

    status, doc, _ = await _post(f"{fleet.url}/v1/chat/completions", body())
    assert status == 413 and doc["error"]["type"] == "invalid_request_error"


async def test_wrong_method_and_unknown_path(fleet):
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{fleet.url}/v1/chat/completions") as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "POST"
            assert _openai_error(await resp.json())["type"] == "invalid_request_error"
        async with client.post(f"{fleet.url}/v1/models") as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "GET"
        async with client.get(f"{fleet.url}/nowhere") as resp:
            assert resp.status == 404


async def test_bad_input_anthropic_and_gemini_shapes(fleet):
    status, doc, _ = await _post(f"{fleet.url}/v1/messages", orjson.dumps({"model": "zz"}))
    assert status == 404
    assert doc == {
        "type": "error",
        "error": {"type": "not_found_error", "message": doc["error"]["message"]},
    }
    status, doc, _ = await _post(f"{fleet.url}/v1/messages", b"{")
    assert status == 400 and doc["error"]["type"] == "invalid_request_error"
    status, doc, _ = await _post(f"{fleet.url}/v1beta/models/zz:generateContent", b"{}")
    assert status == 404 and doc["error"]["status"] == "NOT_FOUND" and doc["error"]["code"] == 404
    status, doc, _ = await _post(f"{fleet.url}/v1beta/models/m2:generateContent", b"nope")
    assert status == 400 and doc["error"]["status"] == "INVALID_ARGUMENT"
    status, doc, _ = await _post(f"{fleet.url}/v1beta/models/m2:explode", b"{}")
    assert status == 404 and set(doc["error"]) == {"code", "message", "status"}


async def test_no_server_reachable_is_503(start_edge):
    dead = f"http://127.0.0.1:{free_port()}"
    edge = await start_edge({"m1": [dead]})
    status, doc, _ = await _post(f"{edge.url}/v1/chat/completions", orjson.dumps(CHAT))
    err = _openai_error(doc)
    assert status == 503 and "All servers failed" in err["message"] and dead in err["message"]
    status, doc, _ = await _post(f"{edge.url}/v1/messages", orjson.dumps(CHAT))
    assert status == 503 and doc["error"]["type"] == "overloaded_error"


async def test_upstream_client_errors_pass_through_unchanged(fleet):
    async with aiohttp.ClientSession() as direct:
        async with direct.post(
            fleet.view.fleet.models["m2"][0].url + "/v1/chat/completions",
            json={**CHAT, "model": "m2"},
            headers={"X-Mock-Status": "400"},
        ) as resp:
            expected = await resp.read()
    status, doc, headers = await _post(
        f"{fleet.url}/v1/chat/completions",
        orjson.dumps({**CHAT, "model": "m2"}),
        headers={"X-Mock-Status": "400"},
    )
    assert status == 400 and orjson.dumps(doc) == orjson.dumps(orjson.loads(expected))
    assert headers["X-Mock-Server"] == "A"


async def test_request_headers_hop_by_hop_dropped_and_forwarding_added(fleet):
    headers = {
        "Authorization": "Bearer sk-secret",
        "x-api-key": "ant-key",
        "x-goog-api-key": "goog-key",
        "Connection": "keep-alive, X-Hop-Custom",
        "X-Hop-Custom": "drop me",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "Proxy-Connection": "keep-alive",
        "X-Request-ID": "req-123",
        "X-Forwarded-For": "10.1.2.3",
        "X-Custom": "kept",
    }
    body = orjson.dumps({"model": "m2", "anything": [1, 2]})
    status, doc, resp_headers = await _post(f"{fleet.url}/v1/echo", body, headers=headers)
    assert status == 200
    seen = {k.lower(): v for k, v in doc["headers"].items()}
    for name in ("x-hop-custom", "keep-alive", "te", "proxy-authorization", "proxy-connection"):
        assert name not in seen, name
    assert seen["authorization"] == "Bearer sk-secret"
    assert seen["x-api-key"] == "ant-key" and seen["x-goog-api-key"] == "goog-key"
    assert seen["x-custom"] == "kept" and seen["x-request-id"] == "req-123"
    assert seen["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    # A TLS terminator's X-Forwarded-Proto goes on (anything but https reads as http).
    for said, relayed in (("https", "https"), ("HTTPS, http", "https"), ("gopher", "http")):
        _, doc, _ = await _post(f"{fleet.url}/v1/echo", body, headers={"X-Forwarded-Proto": said})
        assert {k.lower(): v for k, v in doc["headers"].items()}["x-forwarded-proto"] == relayed
    assert seen["host"].startswith("127.0.0.1:")
    assert doc["body_len"] == len(body)
    assert resp_headers["X-Request-ID"] == "req-123"
    assert resp_headers["X-Edge-Server"].startswith("http://127.0.0.1:")


async def test_request_id_generated_when_absent(fleet):
    status, doc, headers = await _post(f"{fleet.url}/v1/echo", orjson.dumps({"model": "m2"}))
    rid = headers["X-Request-ID"]
    assert status == 200 and len(rid) == 24
    assert {k.lower(): v for k, v in doc["headers"].items()}["x-request-id"] == rid


async def test_local_endpoints(fleet):
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{fleet.url}/v1/models") as resp:
            models = await resp.json()
        async with client.get(f"{fleet.url}/libertai/models") as resp:
            registry = await resp.json()
        async with client.get(f"{fleet.url}/health") as resp:
            assert resp.status == 200
        async with client.get(f"{fleet.url}/ready") as resp:
            assert resp.status == 200 and (await resp.json())["servers"] == 2
        await client.post(f"{fleet.url}/v1/chat/completions", json=CHAT)
        async with client.get(f"{fleet.url}/metrics") as resp:
            text = await resp.text()
    assert models["object"] == "list" and sorted(m["id"] for m in models["data"]) == ["m1", "m2"]
    assert len(registry["m1"]["servers"]) == 2 and registry["m2"]["servers"][0].startswith("http")
    assert 'edge_requests_total{code="2xx",model="m1"' in text


async def test_ready_is_503_without_servers_and_when_draining(start_edge, fleet):
    empty = await start_edge({})
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{empty.url}/ready") as resp:
            assert resp.status == 503 and (await resp.json())["status"] == "no servers"
        fleet.life.draining = True
        async with client.get(f"{fleet.url}/ready") as resp:
            assert resp.status == 503 and (await resp.json())["status"] == "draining"
        fleet.life.draining = False


async def test_least_inflight_spreads_concurrent_streams(start_mock, start_edge):
    a = await start_mock(models=("m1",), name="A")
    b = await start_mock(models=("m1",), name="B")
    edge = await start_edge(
        {"m1": [a, b]}, routing__policy="least_inflight", routing__affinity=False
    )
    async with aiohttp.ClientSession() as client:

        async def one():
            body = {**CHAT, "stream": True}
            async with client.post(
                f"{edge.url}/v1/chat/completions", json=body, headers={"X-Mock-Chunk-Ms": "30"}
            ) as resp:
                await resp.read()
                return resp.headers["X-Mock-Server"]

        served = await asyncio.gather(*(one() for _ in range(10)))
    assert sorted(set(served)) == ["A", "B"] and 3 <= served.count("A") <= 7
    assert all(h.inflight == 0 for h in edge.view.fleet.models["m1"])


ODD_VALUES: tuple[object, ...] = (
    None, True, 0, -1, 1.5, "", "x" * 300, [], [1, "a", None], {}, {"a": [1]}, [[[]]],
)  # fmt: skip
ODD_FIELDS = (
    "stream", "user", "metadata", "messages", "system", "prompt", "input", "contents",
    "systemInstruction", "provider", "stream_options", "max_tokens",
)  # fmt: skip


async def test_fields_of_any_type_never_break_the_edge(start_mock, start_edge, caplog):
    """Every field the edge reads (for streaming, affinity, routing) given every JSON type: the
    compiled modules check types at their boundaries, so a value of a type the code did not
    expect would surface here as the edge's own 500 and an error in its log."""
    a = await start_mock(models=("m1",), name="A", tokens=2)
    b = await start_mock(models=("m1",), name="B", tokens=2)
    edge = await start_edge({"m1": [a, b]})  # affinity on: prefixes are hashed from the body
    paths = (
        "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages",
        "/v1beta/models/m1:generateContent",
    )  # fmt: skip
    statuses: set[int] = set()
    async with aiohttp.ClientSession() as client:
        for path in paths:
            for name in ODD_FIELDS:
                for value in ODD_VALUES:
                    headers = {"X-Session-ID": str(value)[:50]} if value else {}
                    body = orjson.dumps({"model": "m1", name: value})
                    async with client.post(edge.url + path, data=body, headers=headers) as resp:
                        answer = await resp.read()
                    assert b"Internal error" not in answer, (path, name, value)
                    statuses.add(resp.status)
    assert 200 in statuses
    assert not [r for r in caplog.records if r.name.startswith("edge") and r.levelno >= 40]
