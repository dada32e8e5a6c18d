"""edge.direct under the official SDKs (sync and async OpenAI and Anthropic, google-genai): real
mock model servers as subprocesses on loopback, the transports routing to them directly."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from google import genai
from google.genai import types as genai_types

import edge.direct
from edge.config import ConfigError
from edge.routing.fleet import EJECTED
from tests.procs import Procs, free_port, write_fleet
from tests.proxy.faults import fault, prices

MODEL = "m"
HI: Any = [{"role": "user", "content": "Hello"}]  # the SDKs' TypedDicts, loosely


@pytest.fixture(scope="module")
def fleet() -> Iterator[list[str]]:
    """Three mock servers of MODEL, named m0, m1, m2 (X-Mock-Server)."""
    procs = Procs()
    try:
        yield [procs.mock(free_port(), MODEL, name=f"m{i}") for i in range(3)]
    finally:
        procs.stop_all()


def served(response: Any) -> str:
    """The mock that answered a raw SDK response."""
    return str(response.headers["x-mock-server"])


def sync_openai(transport: httpx2.BaseTransport) -> openai.OpenAI:
    client = httpx2.Client(transport=transport)
    return openai.OpenAI(base_url="http://direct/v1", api_key="k", http_client=client)


def test_sync_openai_spreads_requests_by_policy(fleet: list[str]) -> None:
    transport = edge.direct.transport(models={MODEL: fleet}, policy="round_robin", affinity=False)
    with sync_openai(transport) as client:
        seen = Counter(
            served(client.chat.completions.with_raw_response.create(model=MODEL, messages=HI))
            for _ in range(30)
        )
        stream = client.chat.completions.create(model=MODEL, messages=HI, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    transport.close()
    assert seen == {"m0": 10, "m1": 10, "m2": 10}
    assert text.startswith("tok1 tok2")
    assert transport.router.budget.retries == 0


def test_default_policy_spreads_conversations_over_every_host(fleet: list[str]) -> None:
    """Peak-EWMA P2C with affinity: 60 different prompts land on all three hosts."""
    transport = edge.direct.transport(models={MODEL: fleet})
    with sync_openai(transport) as client:
        seen = Counter(
            served(
                client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": f"question {i}"}]
                )
            )
            for i in range(60)
        )
    transport.close()
    assert set(seen) == {"m0", "m1", "m2"}, seen


def test_a_killed_host_is_failed_over_with_no_client_error(tmp_path: Path) -> None:
    procs = Procs()
    try:
        urls = [procs.mock(free_port(), MODEL, name=f"k{i}") for i in range(2)]
        transport = edge.direct.transport(
            models={MODEL: urls}, policy="round_robin", affinity=False,
            outlier__consecutive_failures=2,
        )  # fmt: skip
        with sync_openai(transport) as client:
            client.chat.completions.create(model=MODEL, messages=HI)
            victim = procs.started[0]
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(timeout=10)
            seen = Counter(
                served(client.chat.completions.with_raw_response.create(model=MODEL, messages=HI))
                for _ in range(10)
            )
        transport.close()
    finally:
        procs.stop_all()
    assert seen == {"k1": 10}
    dead = transport.router.view.fleet.models[MODEL][0]
    assert dead.url == urls[0] and dead.state == EJECTED  # passive ejection, no probes


async def test_async_openai_fails_over_a_host_answering_503(fleet: list[str]) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: connect refused
    # Round robin: the down host is certain to be tried (P2C might never draw it in 12).
    transport = edge.direct.async_transport(
        models={MODEL: [down, *fleet]}, affinity=False, policy="round_robin"
    )
    async with openai.AsyncOpenAI(
        base_url="http://direct/v1", api_key="k",
        http_client=httpx2.AsyncClient(transport=transport),
    ) as client:  # fmt: skip
        for _ in range(12):
            reply = await client.chat.completions.create(model=MODEL, messages=HI)
            assert reply.choices[0].message.content
        chunks = [c async for c in await client.chat.completions.create(
            model=MODEL, messages=HI, stream=True)]  # fmt: skip
    assert chunks
    assert transport.router.view.fleet.models[MODEL][0].fails_in_row >= 1 or (
        transport.router.view.fleet.models[MODEL][0].state == EJECTED
    )


def test_a_conversation_keeps_its_host_sync_anthropic(fleet: list[str]) -> None:
    transport = edge.direct.transport(models={MODEL: fleet})
    client = anthropic.Anthropic(
        base_url="http://direct", api_key="k", http_client=httpx2.Client(transport=transport)
    )
    for conversation in range(5):
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": f"conversation {conversation}: hello"}
        ]
        hosts = set()
        for _turn in range(4):
            raw = client.messages.with_raw_response.create(
                model=MODEL,
                max_tokens=16,
                system="be brief",
                messages=messages,  # type: ignore[arg-type]
            )
            hosts.add(served(raw))
            text = raw.parse().content[0].text  # type: ignore[union-attr]
            messages += [
                {"role": "assistant", "content": text},
                {"role": "user", "content": "and then?"},
            ]
        assert len(hosts) == 1, hosts
    client.close()
    transport.close()


async def test_a_session_keeps_its_host_async_anthropic_streaming(fleet: list[str]) -> None:
    transport = edge.direct.async_transport(models={MODEL: fleet})
    client = anthropic.AsyncAnthropic(
        base_url="http://direct", api_key="k",
        http_client=httpx2.AsyncClient(transport=transport),
    )  # fmt: skip
    for session in range(6):
        hosts = set()
        for turn in range(3):
            async with client.messages.stream(
                model=MODEL, max_tokens=16, extra_headers={"X-Session-ID": f"s-{session}"},
                messages=[{"role": "user", "content": f"turn {turn}"}],
            ) as stream:  # fmt: skip
                text = await stream.get_final_text()
                hosts.add(stream.response.headers["x-mock-server"])
            assert text
        assert len(hosts) == 1, hosts
    await client.close()
    await transport.aclose()


def test_all_servers_failed_is_the_dialects_503_with_reasons_not_retried() -> None:
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    transport = edge.direct.transport(models={MODEL: dead})
    oai = sync_openai(transport)
    with pytest.raises(openai.InternalServerError) as raised:
        oai.chat.completions.create(model=MODEL, messages=HI)
    assert raised.value.status_code == 503
    assert "All servers failed for this model 'm'" in str(raised.value)
    assert all(url in str(raised.value) for url in dead)
    ant = anthropic.Anthropic(
        base_url="http://direct", api_key="k", http_client=httpx2.Client(transport=transport)
    )
    with pytest.raises(anthropic.InternalServerError) as failed:
        ant.messages.create(model=MODEL, max_tokens=8, messages=HI)
    assert failed.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert "connect failed" in failed.value.body["error"]["message"]  # type: ignore[index]
    # One request each: the SDKs did not retry the 503 (x-should-retry: false).
    assert transport.router.budget.requests == 2
    transport.close()


def test_pins_restrict_a_model_to_named_hosts_listed_by_discovery(fleet: list[str]) -> None:
    transport = edge.direct.transport(models={MODEL: fleet}, pins={MODEL: [fleet[2] + "/"]})
    with sync_openai(transport) as client:
        seen = {
            served(client.chat.completions.with_raw_response.create(model=MODEL, messages=HI))
            for _ in range(8)
        }
        assert seen == {"m2"}
        # The pin header narrows to one of the model's hosts; an unknown one is refused.
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=HI, extra_headers={"X-Edge-Server": fleet[2]}
        )
        assert served(raw) == "m2"
        with pytest.raises(openai.BadRequestError, match="does not name a server"):
            client.chat.completions.create(
                model=MODEL, messages=HI, extra_headers={"X-Edge-Server": "http://10.9.9.9"}
            )
    transport.close()
    stranger = edge.direct.transport(models={MODEL: fleet}, pins={MODEL: ["http://10.9.9.9"]})
    with sync_openai(stranger) as client, pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model=MODEL, messages=HI)
    assert "No server pinned" in str(raised.value)
    assert stranger.router.attempts.started == 0  # never sent anywhere
    stranger.close()


def test_the_edges_own_fields_do_not_reach_the_host(fleet: list[str]) -> None:
    transport = edge.direct.transport(models={MODEL: fleet})
    with httpx2.Client(transport=transport, base_url="http://ignored.example") as client:
        reply = client.post(
            "/v1/echo", json={"model": MODEL},
            headers={"X-Edge-Route": "random", "Authorization": "Bearer sk-1"},
        )  # fmt: skip
    transport.close()
    assert reply.status_code == 200, reply.text
    headers = {k.lower(): v for k, v in reply.json()["headers"].items()}
    assert headers["authorization"] == "Bearer sk-1"  # hosts take the same key
    assert "x-edge-route" not in headers
    assert headers["host"] == reply.headers["x-edge-server"].removeprefix("http://")


def test_gemini_sdk_over_the_transport(fleet: list[str]) -> None:
    """google-genai takes an httpx2 client too; the model comes from the path."""
    transport = edge.direct.transport(models={MODEL: fleet})
    options = genai_types.HttpOptions(
        base_url="http://direct", api_version="v1beta",
        httpx_client=httpx2.Client(transport=transport),
    )  # fmt: skip
    client = genai.Client(api_key="k", http_options=options)
    reply = client.models.generate_content(model=MODEL, contents="Hello")
    assert reply.text
    assert transport.router.attempts.started == 1
    transport.close()


def test_bad_requests_get_the_dialects_error(fleet: list[str]) -> None:
    transport = edge.direct.transport(models={MODEL: fleet})
    with sync_openai(transport) as client, pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="unknown", messages=HI)
    assert raised.value.code == "model_not_found"
    with httpx2.Client(transport=transport, base_url="http://direct") as raw:
        refused = raw.post("/v1/messages", content=b"{not json")
    assert refused.status_code == 400
    assert refused.json()["type"] == "error"  # Anthropic's shape
    transport.close()


def test_settings_map_onto_the_edges_config(tmp_path: Path) -> None:
    fleet_file = write_fleet(tmp_path / "fleet.json", {MODEL: ["http://127.0.0.1:1"]})
    settings = edge.direct.settings_from(
        sources=[str(fleet_file)], policy="least_inflight", max_attempts=2, probes=True,
        health__timeout_s=1.5, consecutive_failures=9,
    )  # fmt: skip
    config = settings.config
    assert config.discovery.sources == (str(fleet_file),)
    assert config.routing.policy == "least_inflight"
    assert config.upstream.max_attempts == 2
    assert config.health.enabled and config.health.timeout_s == 1.5
    assert config.outlier.consecutive_failures == 9
    assert not edge.direct.settings_from(sources=[str(fleet_file)]).config.health.enabled
    with pytest.raises(TypeError, match="unknown setting 'polcy'"):
        edge.direct.transport(sources=[str(fleet_file)], polcy="latency")
    with pytest.raises(TypeError, match="unknown setting 'timeout_s'"):
        edge.direct.transport(sources=[str(fleet_file)], timeout_s=1.0)  # two sections have it
    with pytest.raises(ConfigError):
        edge.direct.transport(sources=[str(fleet_file)], max_attempts="3")
    with pytest.raises(ConfigError, match="needs sources"):
        edge.direct.transport()


async def test_connections_go_back_to_the_pool(fleet: list[str]) -> None:
    """A pool of 2 connections carries 40 requests, streamed or whole, sync and async."""
    transport = edge.direct.transport(models={MODEL: fleet[:1]}, max_connections_per_server=2)
    with httpx2.Client(transport=transport, base_url="http://direct") as client:
        for i in range(20):
            body = {"model": MODEL, "stream": i % 2 == 0, "messages": HI}
            with client.stream("POST", "/v1/chat/completions", json=body) as reply:
                assert reply.status_code == 200
                assert b"tok1" in b"".join(reply.iter_raw())
    transport.close()
    assync = edge.direct.async_transport(models={MODEL: fleet[:1]}, max_connections_per_server=2)
    async with httpx2.AsyncClient(transport=assync, base_url="http://direct") as aclient:
        for i in range(20):
            body = {"model": MODEL, "stream": i % 2 == 0, "messages": HI}
            async with aclient.stream("POST", "/v1/chat/completions", json=body) as reply:
                assert reply.status_code == 200
                assert b"tok1" in b"".join([c async for c in reply.aiter_raw()])
    for router in (transport.router, assync.router):
        assert router.budget.retries == 0 and router.attempts.started == 20
    await assync.aclose()


def test_an_error_can_be_streamed_by_a_raw_client(fleet: list[str]) -> None:
    transport = edge.direct.transport(models={MODEL: fleet})
    with httpx2.Client(transport=transport, base_url="http://direct") as client:
        body = {"model": "unknown", "messages": HI}
        with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            assert reply.status_code == 404
            assert b"model_not_found" in b"".join(reply.iter_raw())
    transport.close()


async def test_async_hedges_a_slow_first_byte_on_a_second_host() -> None:
    """Hedging on: the price policy sends every request to h0; once h0 has a p95, a first token
    slower than it races h1, and h1's answer wins long before h0's."""
    procs = Procs()
    try:
        urls = [procs.mock(free_port(), MODEL, name=f"h{i}") for i in range(2)]
        transport = edge.direct.async_transport(
            models={MODEL: urls}, hedging=True, hedge_budget=1.0, hedge_min_delay_s=0.05,
            routing__models=prices(urls),
        )  # fmt: skip
        async with httpx2.AsyncClient(transport=transport, base_url="http://direct") as client:
            body = {"model": MODEL, "messages": HI}
            for _ in range(6):  # samples for h0's p95
                reply = await client.post("/v1/chat/completions", json=body)
                assert reply.headers["x-mock-server"] == "h0"
            await fault(urls[0], ttft_ms=3000, count=1)
            started = time.monotonic()
            reply = await client.post("/v1/chat/completions", json=body)
            elapsed = time.monotonic() - started
        await transport.aclose()
    finally:
        procs.stop_all()
    assert reply.status_code == 200 and reply.headers["x-mock-server"] == "h1"
    assert elapsed < 1.5, elapsed
    assert transport.router.balancer.hedges == 1
    assert transport.router.attempts.started == 8


def test_threads_share_one_sync_transport(fleet: list[str]) -> None:
    """Eight threads, 20 requests each, one transport: every answer whole, every attempt ended
    (the in-flight counts are back to zero)."""
    transport = edge.direct.transport(models={MODEL: fleet})
    client = sync_openai(transport)

    def ask(worker: int) -> int:
        done = 0
        for i in range(20):
            content = f"thread {worker} question {i}"
            reply = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": content}], stream=i % 2 == 0
            )
            done += 1 if i % 2 else len(list(reply))
        return done

    with ThreadPoolExecutor(8) as pool:
        assert all(n > 10 for n in pool.map(ask, range(8)))
    client.close()
    transport.close()
    assert transport.router.attempts.started == 160
    assert all(h.inflight == 0 for h in transport.router.view.fleet.models[MODEL])


def test_a_source_that_never_answered_is_a_503_not_an_unknown_model(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/libertai/models"
    transport = edge.direct.transport(sources=[dead], first_view_timeout_s=5.0)
    with sync_openai(transport) as client, pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model=MODEL, messages=HI)
    assert "sources have not answered" in str(raised.value)
    transport.close()


async def test_a_retry_after_date_holds_the_busy_host_for_that_long() -> None:
    # h0 (first by price) answers one 429 with Retry-After as an HTTP-date (RFC 850's form) 3 s
    # ahead, read by the edge's own reader (http/heads.py): the request moves to h1, and h0 is
    # held, so the next requests go to h1 too until the date passes, then back to h0.
    procs = Procs()
    try:
        urls = [procs.mock(free_port(), MODEL, name=f"h{i}") for i in range(2)]
        transport = edge.direct.async_transport(models={MODEL: urls}, routing__models=prices(urls))
        until = time.time() + 3
        date = time.strftime("%A, %d-%b-%y %H:%M:%S GMT", time.gmtime(until))
        await fault(urls[0], status=429, retry_after=date, count=1)
        async with httpx2.AsyncClient(transport=transport, base_url="http://direct") as client:
            body = {"model": MODEL, "messages": HI}

            async def ask() -> str:
                reply = await client.post("/v1/chat/completions", json=body)
                assert reply.status_code == 200
                return str(reply.headers["x-mock-server"])

            held = [await ask() for _ in range(3)]
            while time.time() < until + 0.2:
                await asyncio.sleep(0.1)
            after = await ask()
        await transport.aclose()
    finally:
        procs.stop_all()
    assert held == ["h1", "h1", "h1"] and after == "h0"
