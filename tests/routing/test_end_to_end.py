"""Routing through a real in-process edge and real mock servers on 127.0.0.1: sticky cookies,
cookie-less conversations, forged cookies, X-Edge-Server pins, per-request policies, hedging,
and the in-flight table shared by --workers processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from edge.dev.mock import MockOptions, build_app
from edge.routing.affinity import CookieCodec, affinity_key, conversation_tag, host_id
from tests.procs import free_port

CHAT = "/v1/chat/completions"


class Mock:
    """A mock model server that counts what reached it and can be made to stall."""

    def __init__(self, server: Any, name: str) -> None:
        self.server, self.name = server, name
        self.url = f"http://127.0.0.1:{server.port}"
        self.hits = 0
        self.stall = False
        self.release = asyncio.Event()


@pytest.fixture
async def mocks(aiohttp_server):
    made: list[Mock] = []

    async def make(*names: str, model: str = "m", **options: Any) -> list[Mock]:
        out = []
        for name in names:
            app = build_app(MockOptions(name=name, models=(model,), **options))
            holder: list[Mock] = []

            @web.middleware
            async def count(request: web.Request, handler: Any, holder=holder) -> Any:
                mock = holder[0]
                mock.hits += request.method == "POST"  # health probes are GETs
                if mock.stall:
                    # Until the test ends: a host that sent nothing yet (a prefill stall).
                    await asyncio.wait_for(mock.release.wait(), 10)
                return await handler(request)

            app.middlewares.append(count)
            mock = Mock(await aiohttp_server(app), name)
            holder.append(mock)
            made.append(mock)
            out.append(mock)
        return out

    yield make
    for mock in made:
        mock.release.set()


def chat(content: str, history: list[dict[str, str]] | None = None, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
    return {"model": "m", "messages": messages + (history or []), **extra}


async def ask(client: aiohttp.ClientSession, edge: Any, body: dict[str, Any], **headers: str):
    async with client.post(edge.url + CHAT, json=body, headers=headers) as resp:
        doc = await resp.json()
        return resp, doc


def served_by(resp: aiohttp.ClientResponse, doc: dict[str, Any]) -> str:
    name = resp.headers["X-Mock-Server"]
    assert doc["system_fingerprint"] == name
    return name


# --- cookies --------------------------------------------------------------------------------


async def test_cookie_jar_client_conversation_moves_once_when_its_server_dies_then_sticks(
    mocks, start_edge
):
    fleet = await mocks("A", "B", "C")
    edge = await start_edge({"m": [m.url for m in fleet]})
    jar = aiohttp.CookieJar(unsafe=True)  # the edge is an IP address
    async with aiohttp.ClientSession(cookie_jar=jar) as client:
        history: list[dict[str, str]] = []
        seen = []
        for turn in range(5):  # one conversation: at its home, by key; no cookie to set
            resp, doc = await ask(client, edge, chat("one conversation", history))
            assert resp.status == 200 and "Set-Cookie" not in resp.headers
            seen.append(served_by(resp, doc))
            history += [
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": f"{turn}"},
            ]
        assert len(set(seen)) == 1, seen
        home = next(m for m in fleet if m.name == seen[0])
        await home.server.close()
        after = []
        for turn in range(10):  # moved once; the cookie holds the conversation where it went
            resp, doc = await ask(client, edge, chat("one conversation", history))
            assert resp.status == 200 and "edge_affinity=" in resp.headers["Set-Cookie"]
            after.append(served_by(resp, doc))
            history += [
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": f"{turn}"},
            ]
    assert home.name not in after and len(set(after)) == 1, after
    assert edge.balancer.outcomes["cookie_hit"] == 9 and edge.balancer.outcomes["moved"] == 1
    assert all(h.inflight == 0 for h in edge.view.fleet.models["m"])


async def test_cookie_attributes_and_no_cookie_when_affinity_is_off(mocks, start_edge):
    fleet = await mocks("A", "B")
    await fleet[0].server.close()  # conversations whose home is A are answered by B: moved

    async def moved(client: aiohttp.ClientSession, edge: Any, **headers: str) -> Any:
        for i in range(40):  # about half the conversations have their home on A
            resp, _ = await ask(client, edge, chat(f"hi {i}"), **headers)
            assert resp.status == 200 and resp.headers["X-Edge-Server"] == fleet[1].url
            if "Set-Cookie" in resp.headers:
                return resp
        raise AssertionError("no conversation moved")

    edge = await start_edge({"m": [m.url for m in fleet]}, routing__cookie_max_age_s=120)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
        cookie = (await moved(client, edge)).headers["Set-Cookie"]
        assert cookie.startswith("edge_affinity=")
        for part in ("Max-Age=120", "Path=/", "HttpOnly", "SameSite=Lax"):
            assert part in cookie
        assert "Secure" not in cookie  # plain HTTP here
        # Behind a TLS terminator the client spoke https: the cookie must not travel over http.
        resp = await moved(client, edge, **{"X-Forwarded-Proto": "https"})
        assert resp.headers["Set-Cookie"].endswith("; Secure")
    off = await start_edge(
        {"m": [m.url for m in fleet]}, routing__models={"m": {"affinity": False}}
    )
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
        for i in range(10):
            resp, _ = await ask(client, off, chat(f"hi {i}"))
            assert resp.status == 200 and "Set-Cookie" not in resp.headers


async def test_forged_or_foreign_cookies_are_ignored(mocks, start_edge):
    fleet = await mocks("A", "B", "C")
    edge = await start_edge({"m": [m.url for m in fleet]})
    target = fleet[2]
    secret, limit = edge.config.routing.cookie_secret, edge.config.routing.prefix_bytes

    def cookie(secret: str, session: str) -> str:
        _, key = affinity_key(chat("x"), session, limit)  # type: ignore[misc]
        entry = host_id(target.url) + conversation_tag("session", key, chat("x"), limit)  # type: ignore[operator]
        return CookieCodec(secret, 600).encode(entry, time.time())

    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
        homes, with_forged, with_genuine, with_garbage = [], [], [], []
        for i in range(8):
            session = {"X-Session-ID": f"session-{i}"}
            homes.append(served_by(*await ask(client, edge, chat("x"), **session)))
            forged = {
                "Cookie": f"edge_affinity={cookie('not-the-edge-secret-at-all', f'session-{i}')}",
                **session,
            }
            resp, doc = await ask(client, edge, chat("x"), **forged)
            with_forged.append(served_by(resp, doc))
            assert resp.status == 200 and "Set-Cookie" not in resp.headers  # at home: none set
            genuine = {"Cookie": f"edge_affinity={cookie(secret, f'session-{i}')}", **session}
            with_genuine.append(served_by(*await ask(client, edge, chat("x"), **genuine)))
            garbage = {"Cookie": "edge_affinity=%%%garbage; other=1", **session}
            with_garbage.append(served_by(*await ask(client, edge, chat("x"), **garbage)))
    assert with_forged == homes == with_garbage  # as if there were no cookie
    assert with_genuine == ["C"] * 8
    assert set(homes) != {"C"}  # so the comparison above means something


# --- cookie-less conversations --------------------------------------------------------------


async def test_cookieless_multi_turn_conversations_keep_their_server(mocks, start_edge):
    fleet = await mocks("A", "B", "C")
    edge = await start_edge({"m": [m.url for m in fleet]})
    homes: dict[int, set[str]] = {}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
        for conversation in range(15):
            history: list[dict[str, str]] = []
            for turn in range(5):
                body = chat(f"conversation {conversation} opens", history)
                resp, doc = await ask(client, edge, body)
                homes.setdefault(conversation, set()).add(served_by(resp, doc))
                answer = doc["choices"][0]["message"]["content"]
                history += [
                    {"role": "assistant", "content": answer},
                    {"role": "user", "content": f"follow-up {turn}"},
                ]
    assert all(len(servers) == 1 for servers in homes.values()), homes
    assert len({next(iter(s)) for s in homes.values()}) >= 2  # spread, not all on one host
    assert edge.balancer.outcomes["key_hit"] == 75


async def test_anthropic_and_session_header_keys_stick_too(mocks, start_edge):
    fleet = await mocks("A", "B", "C")
    edge = await start_edge({"m": [m.url for m in fleet]})
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
        for conversation in range(4):
            seen = set()
            messages = [{"role": "user", "content": f"anthropic {conversation}"}]
            for turn in range(4):
                body = {"model": "m", "system": "Be brief.", "max_tokens": 8, "messages": messages}
                async with client.post(edge.url + "/v1/messages", json=body) as resp:
                    assert resp.status == 200
                    seen.add(resp.headers["X-Mock-Server"])
                messages = messages + [
                    {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": f"more {turn}"},
                ]
            assert len(seen) == 1
            header = {"X-Session-ID": f"s-{conversation}"}
            names = {served_by(*await ask(client, edge, chat(f"t{t}"), **header)) for t in range(4)}
            assert len(names) == 1


# --- pins -----------------------------------------------------------------------------------


async def test_x_edge_server_pins_to_a_known_server(mocks, start_edge):
    fleet = await mocks("A", "B", "C")
    edge = await start_edge({"m": [m.url for m in fleet]})
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as client:
        await ask(client, edge, chat("hello"))  # a cookie for some server
        for target in fleet:
            for _ in range(3):
                resp, doc = await ask(client, edge, chat("hello"), **{"X-Edge-Server": target.url})
                assert resp.status == 200 and served_by(resp, doc) == target.name
                assert "Set-Cookie" not in resp.headers  # a pin does not move the session
    assert edge.balancer.outcomes["pinned"] == 9


@pytest.mark.parametrize(
    "pin",
    ["http://127.0.0.1:1", "http://example.com", "file:///etc/passwd", "other-model", "  "],
)
async def test_x_edge_server_refuses_anything_else_and_forwards_nothing(mocks, start_edge, pin):
    fleet = await mocks("A", "B")
    (other,) = await mocks("O", model="other")
    edge = await start_edge({"m": [m.url for m in fleet], "other": [other.url]})
    pin = other.url if pin == "other-model" else pin
    async with aiohttp.ClientSession() as client:
        resp, doc = await ask(client, edge, chat("hello"), **{"X-Edge-Server": pin})
    assert resp.status == 400
    assert doc["error"]["param"] == "X-Edge-Server" and doc["error"]["code"] == "unknown_server"
    assert "GET /libertai/models" in doc["error"]["message"]
    assert [m.hits for m in (*fleet, other)] == [0, 0, 0]


async def test_a_pinned_server_that_is_down_fails_the_request_with_the_reason(mocks, start_edge):
    fleet = await mocks("A", "B")
    edge = await start_edge({"m": [m.url for m in fleet]})
    dead = fleet[0]
    await dead.server.close()
    async with aiohttp.ClientSession() as client:
        resp, doc = await ask(client, edge, chat("hello"), **{"X-Edge-Server": dead.url})
    assert resp.status == 503
    assert dead.url in doc["error"]["message"] and "connect" in doc["error"]["message"]
    assert fleet[1].hits == 0  # no silent move


# --- policies per request -------------------------------------------------------------------


async def test_route_header_and_provider_sort_choose_the_policy(mocks, start_edge):
    fleet = await mocks("A", "B", "C")
    prices = {
        fleet[0].url: {"input": 3, "output": 9},
        fleet[1].url: {"input": 0.1, "output": 0.2},
        fleet[2].url: {"input": 1, "output": 2},
    }
    edge = await start_edge(
        {"m": [m.url for m in fleet]}, routing__models={"m": {"prices": prices}},
        routing__affinity=False,
    )  # fmt: skip
    async with aiohttp.ClientSession() as client:
        by_header = [
            served_by(*await ask(client, edge, chat(f"q{i}"), **{"X-Edge-Route": "price"}))
            for i in range(6)
        ]
        body = chat("q", provider={"sort": "price"})
        by_body = [served_by(*await ask(client, edge, body)) for _ in range(6)]
        default = {served_by(*await ask(client, edge, chat(f"q{i}"))) for i in range(30)}
        resp, doc = await ask(client, edge, chat("q"), **{"X-Edge-Route": "cheapest"})
    assert by_header == by_body == ["B"] * 6
    assert len(default) >= 2  # no price preference without the header: unmeasured peers tried
    assert edge.balancer.policies["latency"] == 30
    assert resp.status == 400 and doc["error"]["param"] == "X-Edge-Route"
    assert edge.balancer.policies["price"] == 12


# --- hedging --------------------------------------------------------------------------------


async def test_a_stalled_first_attempt_is_hedged_and_the_loser_released(mocks, start_edge):
    slow, fast = await mocks("slow", "fast")
    edge = await start_edge(
        {"m": [slow.url, fast.url]}, routing__policy="round_robin", routing__affinity=False,
        routing__models={"m": {"hedging": True}}, routing__hedge_budget=1.0,
        routing__hedge_min_delay_s=0.05,
    )  # fmt: skip
    async with aiohttp.ClientSession() as client:
        for i in range(20):  # 10 samples each: a p95 to judge by
            assert (await ask(client, edge, chat(f"warm {i}")))[0].status == 200
        assert edge.balancer.hedges == 0
        slow.stall = True
        started = time.monotonic()
        names = [served_by(*await ask(client, edge, chat(f"q{i}"))) for i in range(4)]
        elapsed = time.monotonic() - started
    assert names == ["fast"] * 4 and elapsed < 2.0
    assert edge.balancer.hedges == 2  # slow was first every other request
    assert all(h.inflight == 0 for h in edge.view.fleet.models["m"])


# --- --workers: the shared in-flight table --------------------------------------------------


def test_workers_share_one_in_flight_table_and_remove_it_on_exit(procs, tmp_path):
    mock_url = procs.mock(free_port(), "m", name="A")
    port = free_port()
    edge = procs.edge(port, "--workers", "2", "--config", str(_config(tmp_path, mock_url)))
    path = f"/dev/shm/edge-load-{edge.pid}-{port}"
    size = 4 * 4096 * 4  # two rows per worker, int32 cells
    deadline = time.monotonic() + 10
    # The file is created, then sized: wait for both (a check in between would see 0 bytes).
    while time.monotonic() < deadline:
        if os.path.exists(path) and os.path.getsize(path) == size:
            break
        time.sleep(0.05)
    assert os.path.getsize(path) == size
    edge.send_signal(signal.SIGTERM)
    edge.wait(timeout=20)
    assert not os.path.exists(path)


def _config(tmp_path, mock_url: str):
    path = tmp_path / "edge.toml"
    path.write_text(f'[models."m"]\nservers = ["{mock_url}"]\n')
    return path
