"""The door in keys mode: 401 / 403 in each API's shape, each header style, workspaces, and
what reaches the upstream (the server's key, never the client's). Real mock, real SDK clients."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from edge.access.auth import strip_key_param
from edge.access.keys import FileBackend, Limits, create_key

MODEL = "mock-model"
WS = "0123456789abcdef01234567"
OTHER_WS = "fedcba9876543210fedcba98"
CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}]}
GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


@pytest.fixture
def keyfile(tmp_path: Path) -> tuple[str, dict[str, str]]:
    """A key store with a plain key, a workspace key limited to one model, and a revoked key."""
    path = str(tmp_path / "keys.json")
    store = FileBackend(path)
    _, plain = create_key(store, "plain")
    _, scoped = create_key(store, "scoped", workspace=WS, models=(MODEL,), limits=Limits(rpm=100))
    record, revoked = create_key(store, "gone")
    store.put(replace(record, revoked=1.0))
    return path, {"plain": plain, "scoped": scoped, "revoked": revoked}


@pytest.fixture
async def edge(start_mock, start_edge, keyfile):
    mock = await start_mock(models=("mock-model", "other-model"), tokens=4)
    worker = await start_edge(
        models={MODEL: [mock], "other-model": [mock]},
        auth__mode="keys",
        auth__key_store=keyfile[0],
        auth__upstream_keys={mock: "server-secret"},
    )
    return worker, keyfile[1]


def _openai(base: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0)


async def test_openai_bearer_valid_wrong_revoked(edge) -> None:
    worker, keys = edge
    async with _openai(f"{worker.url}/v1", keys["plain"]) as client:
        reply = await client.chat.completions.create(**CHAT)
        assert reply.choices[0].message.content
    wrong = keys["plain"][:-4] + "AAAA"
    for bad, code in ((wrong, "invalid_api_key"), (keys["revoked"], "invalid_api_key"),
                      ("sk-not-even-close", "invalid_api_key")):  # fmt: skip
        async with _openai(f"{worker.url}/v1", bad) as client:
            with pytest.raises(openai.AuthenticationError) as info:
                await client.chat.completions.create(**CHAT)
        assert info.value.status_code == 401
        body = info.value.body
        assert isinstance(body, dict) and body["code"] == code, body
        assert body["type"] == "authentication_error"
        assert bad not in str(info.value.response.text)


async def test_missing_key_each_dialect(edge) -> None:
    worker, _ = edge
    cases = [
        ("/v1/chat/completions", CHAT, lambda d: d["error"]["code"] == "missing_api_key"),
        ("/v1/messages", {**CHAT, "max_tokens": 8},
         lambda d: d["error"]["type"] == "authentication_error" and d["type"] == "error"),
        (f"/v1beta/models/{MODEL}:generateContent", GEMINI_BODY,
         lambda d: d["error"]["status"] == "UNAUTHENTICATED" and d["error"]["code"] == 401),
    ]  # fmt: skip
    async with aiohttp.ClientSession() as session:
        for path, body, shape in cases:
            async with session.post(worker.url + path, json=body) as resp:
                assert resp.status == 401, path
                assert shape(await resp.json()), path
        # An Authorization header that is not a bearer token counts as no key.
        headers = {"Authorization": "Basic dXNlcjpwYXNz"}
        async with session.post(
            f"{worker.url}/v1/chat/completions", json=CHAT, headers=headers
        ) as r:
            assert r.status == 401


async def test_anthropic_x_api_key(edge) -> None:
    worker, keys = edge
    async with anthropic.AsyncAnthropic(
        base_url=worker.url, api_key=keys["plain"], max_retries=0
    ) as client:
        msg = await client.messages.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
        assert msg.usage.output_tokens == 4
    for bad in (keys["plain"][:-1] + "x", keys["revoked"]):
        async with anthropic.AsyncAnthropic(base_url=worker.url, api_key=bad, max_retries=0) as c:
            with pytest.raises(anthropic.AuthenticationError) as info:
                await c.messages.create(
                    model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}]
                )
        assert info.value.status_code == 401
        assert info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


async def test_gemini_header_and_query_key(edge) -> None:
    worker, keys = edge
    url = f"{worker.url}/v1beta/models/{MODEL}:generateContent"
    async with aiohttp.ClientSession() as session:
        for key, status in ((keys["plain"], 200), (keys["revoked"], 401), ("wrong", 401)):
            async with session.post(url, json=GEMINI_BODY, headers={"x-goog-api-key": key}) as r:
                assert r.status == status
                doc = await r.json()
                if status == 401:
                    assert doc["error"]["status"] == "UNAUTHENTICATED"
            async with session.post(url, json=GEMINI_BODY, params={"key": key}) as r:
                assert r.status == status
                if status == 200:
                    assert (await r.json())["usageMetadata"]["candidatesTokenCount"] == 4


async def test_upstream_gets_the_server_key_never_the_clients(edge) -> None:
    worker, keys = edge
    async with aiohttp.ClientSession() as session:
        for headers, params in (
            ({"Authorization": f"Bearer {keys['plain']}"}, {"x": "1"}),
            ({"x-api-key": keys["plain"]}, {"x": "1"}),
            ({"x-goog-api-key": keys["plain"]}, {"x": "1"}),
            ({}, {"key": keys["plain"], "x": "1"}),
        ):
            async with session.post(
                f"{worker.url}/v1/echo", json={"model": MODEL}, headers=headers, params=params
            ) as resp:
                assert resp.status == 200
                seen = await resp.json()
            assert keys["plain"] not in str(seen)
            sent = {k.lower(): v for k, v in seen["headers"].items()}
            assert sent["authorization"] == "Bearer server-secret"
            assert "x-api-key" not in sent and "x-goog-api-key" not in sent
            assert seen["query"] == "x=1"


async def test_workspace_paths(edge) -> None:
    worker, keys = edge
    base = f"{worker.url}/api/{WS}/v1"
    async with _openai(base, keys["scoped"]) as client:
        reply = await client.chat.completions.with_raw_response.create(**CHAT)
        assert reply.http_response.status_code == 200
        assert reply.headers["x-ratelimit-limit-requests"] == "100"
        models = await client.models.list()
        assert MODEL in [m.id for m in models.data]
        with pytest.raises(openai.PermissionDeniedError) as info:
            await client.chat.completions.create(**{**CHAT, "model": "other-model"})
        assert "may not use the model 'other-model'" in info.value.message
    for url, key in ((f"{worker.url}/api/{OTHER_WS}/v1", keys["scoped"]), (base, keys["plain"])):
        async with _openai(url, key) as client:
            with pytest.raises(openai.PermissionDeniedError) as info:
                await client.chat.completions.create(**CHAT)
            assert info.value.body["code"] == "workspace_mismatch"  # type: ignore[index]
    # The upstream sees the plain /v1 path.
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{worker.url}/api/{WS}/v1/echo", json={"model": MODEL},
            headers={"Authorization": f"Bearer {keys['scoped']}"},
        ) as resp:  # fmt: skip
            assert (await resp.json())["path"] == "/v1/echo"
        # Not a workspace id: not a route.
        async with session.post(f"{worker.url}/api/xyz/v1/chat/completions", json=CHAT) as r:
            assert r.status == 404


async def test_auth_check_spends_nothing(start_mock, start_edge, tmp_path: Path) -> None:
    store = FileBackend(str(tmp_path / "k.json"))
    record, key = create_key(store, "one-a-minute", limits=Limits(rpm=1))
    mock = await start_mock()
    worker = await start_edge(
        models={MODEL: [mock]}, auth__mode="keys", auth__key_store=str(tmp_path / "k.json")
    )
    check = f"{worker.url}/libertai/auth/check"
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(check, headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == 200
                assert (await r.json())["key_id"] == record.id
        async with session.get(check, headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
        async with session.get(check) as r:
            assert r.status == 401
    async with _openai(f"{worker.url}/v1", key) as client:
        await client.chat.completions.create(**CHAT)  # the one request of the minute
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(**CHAT)


async def test_passthrough_forwards_the_clients_key(start_mock, start_edge) -> None:
    mock = await start_mock()
    worker = await start_edge(models={MODEL: [mock]}, auth__upstream_keys={mock: "unused"})
    assert worker.gate is None
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": "Bearer client-key", "x-api-key": "client-key-2"}
        async with session.post(
            f"{worker.url}/v1/echo", json={"model": MODEL}, headers=headers
        ) as r:
            sent = {k.lower(): v for k, v in (await r.json())["headers"].items()}
        assert sent["authorization"] == "Bearer client-key"
        assert sent["x-api-key"] == "client-key-2"
        async with session.get(f"{worker.url}/libertai/auth/check", headers=headers) as r:
            assert r.status == 200 and (await r.json())["checked"] is False
        async with session.get(f"{worker.url}/libertai/auth/check") as r:
            assert r.status == 401


async def test_none_mode_strips_client_keys(start_mock, start_edge) -> None:
    mock = await start_mock(models=("mock-model",))
    worker = await start_edge(models={MODEL: [mock]}, auth__mode="none")
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": "Bearer client-key"}
        async with session.post(
            f"{worker.url}/v1/echo?key=abc", json={"model": MODEL}, headers=headers
        ) as r:
            seen = await r.json()
        assert "authorization" not in {k.lower() for k in seen["headers"]}
        assert seen["query"] == ""


async def test_no_key_in_logs_or_metrics(edge, caplog: pytest.LogCaptureFixture) -> None:
    worker, keys = edge
    caplog.set_level(logging.DEBUG)
    async with aiohttp.ClientSession() as session:
        for key in keys.values():
            for headers in ({"Authorization": f"Bearer {key}"}, {"x-api-key": key}):
                async with session.post(
                    f"{worker.url}/v1/chat/completions", json=CHAT, headers=headers
                ) as r:
                    await r.read()
        async with session.get(f"{worker.url}/metrics") as r:
            metrics = await r.text()
    assert 'edge_key_requests_total{code="2xx"' in metrics
    assert 'edge_auth_denied_total{reason="invalid_key"}' in metrics
    for key in keys.values():
        assert key not in caplog.text and key not in metrics
        assert key[8:] not in caplog.text  # not even without its prefix


def test_strip_key_param() -> None:
    assert strip_key_param("/v1beta/models/m:streamGenerateContent?alt=sse&key=abc") == (
        "/v1beta/models/m:streamGenerateContent?alt=sse"
    )
    assert strip_key_param("/p?key=abc") == "/p"
    assert strip_key_param("/p?monkey=1&key=a&x=%20") == "/p?monkey=1&x=%20"
    assert strip_key_param("/p") == "/p"


async def test_usage_per_key_model_and_workspace(start_mock, start_edge, keyfile) -> None:
    mock = await start_mock(tokens=4)
    worker = await start_edge(
        models={MODEL: [mock]},
        auth__mode="keys",
        auth__key_store=keyfile[0],
        auth__prices={MODEL: [1000.0, 2000.0]},  # per million tokens
    )
    keys = keyfile[1]
    async with _openai(f"{worker.url}/api/{WS}/v1", keys["scoped"]) as client:
        for _ in range(2):
            reply = await client.chat.completions.create(**CHAT)
    assert reply.usage is not None and reply.usage.prompt_tokens == 3
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{worker.url}/metrics") as r:
            text = await r.text()
    kid = keys["scoped"][8:16]
    labels = f'key="{kid}",model="{MODEL}"'
    assert f'edge_key_requests_total{{code="2xx",{labels},workspace="{WS}"}} 2.0' in text
    assert f'edge_key_tokens_total{{{labels},type="prompt",workspace="{WS}"}} 6.0' in text
    assert f'edge_key_tokens_total{{{labels},type="completion",workspace="{WS}"}} 8.0' in text
    # 6 prompt tokens at 1000/M and 8 completion tokens at 2000/M
    assert f'edge_key_cost_total{{{labels},workspace="{WS}"}} 0.022' in text


async def test_access_log_names_key_id_workspace_and_cost_never_the_key(
    start_mock, start_edge, keyfile, tmp_path: Path
) -> None:
    mock = await start_mock(tokens=4)
    log = tmp_path / "access.log"
    worker = await start_edge(
        models={MODEL: [mock]},
        auth__mode="keys",
        auth__key_store=keyfile[0],
        auth__prices={MODEL: [1000.0, 2000.0]},
        log__mode="file",
        log__path=str(log),
    )
    key = keyfile[1]["scoped"]
    async with _openai(f"{worker.url}/api/{WS}/v1", key) as client:
        await client.chat.completions.create(**CHAT)
    worker.access.flush()
    lines = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert line["key_id"] == key[8:16] and line["workspace"] == WS
    assert line["cost"] == pytest.approx((3 * 1000.0 + 4 * 2000.0) / 1e6)
    assert key not in log.read_text() and key[16:] not in log.read_text()


def test_upstream_keys_per_server(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from edge.access.auth import UpstreamKeys
    from edge.proxy.route import ProxyRequest
    from edge.routing.fleet import HostTable

    monkeypatch.setenv("EDGE_TEST_UPSTREAM_KEY", "from-env")
    keys = UpstreamKeys({"http://A:80/": "k-a", "http://b": "env:EDGE_TEST_UPSTREAM_KEY"})
    fleet = HostTable().build(
        {"a": ["http://a"], "b": ["http://b"], "ab": ["http://a", "http://b"]}
    )

    def sent(model: str, dialect: str, url: str) -> list[tuple[str, str]]:
        preq = ProxyRequest(dialect, "chat", model, False, b"{}", "/v1/x", {})
        assert keys.headers(preq, fleet.models[model]) == []  # nothing common to all attempts
        host = next(h for h in fleet.models[model] if h.url == url)
        return keys.for_host(preq.dialect, host)

    assert sent("a", "openai", "http://a") == [("Authorization", "Bearer k-a")]  # normalised
    assert sent("b", "anthropic", "http://b") == [("x-api-key", "from-env")]
    assert sent("b", "gemini", "http://b") == [("x-goog-api-key", "from-env")]
    # A request translated to OpenAI's API carries the key where OpenAI's API reads it.
    assert keys.for_host("openai", fleet.models["b"][0]) == [("Authorization", "Bearer from-env")]
    # Servers of one model with different keys: each attempt carries its own server's key.
    assert sent("ab", "openai", "http://a") == [("Authorization", "Bearer k-a")]
    assert sent("ab", "openai", "http://b") == [("Authorization", "Bearer from-env")]
    assert "k-a" not in caplog.text and "from-env" not in caplog.text
    monkeypatch.delenv("EDGE_TEST_UPSTREAM_KEY")
    with pytest.raises(ValueError, match="EDGE_TEST_UPSTREAM_KEY"):
        UpstreamKeys({"http://b": "env:EDGE_TEST_UPSTREAM_KEY"})


async def test_each_server_receives_its_own_key_through_the_edge(start_mock, start_edge):
    a = await start_mock(models=("m",), name="A")
    b = await start_mock(models=("m",), name="B")
    edge = await start_edge(
        {"m": [a, b]}, auth__mode="none", auth__upstream_keys={a: "key-a", b: "key-b"}
    )
    seen = {}
    async with aiohttp.ClientSession() as session:
        for url in (a, b):
            async with session.post(
                f"{edge.url}/v1/echo",
                json={"model": "m"},
                headers={"Authorization": "Bearer client-key", "X-Edge-Server": url},
            ) as resp:
                doc = await resp.json()
            headers = {k.lower(): v for k, v in doc["headers"].items()}
            seen[doc["server"]] = headers.get("authorization")
    assert seen == {"A": "Bearer key-a", "B": "Bearer key-b"}
