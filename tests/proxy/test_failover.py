"""Failover under real faults: processes killed, ports closed, servers hung (SIGSTOP), streams
broken mid-way, every server down, retry storms, stale keep-alive connections, per-model timeouts.

The scenario test prints what the client saw; its numbers are quoted in the change's notes.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from edge.dev.mock import MockOptions, build_app
from edge.routing.fleet import EJECTED, UP, Host
from tests.procs import Procs, free_port
from tests.routing.test_health import controllable, until

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}
FAST = ("--ttft-ms", "5", "--chunk-ms", "5", "--tokens", "4")
# Short limits, so that faults show within a second: the defaults are for real model servers.
QUICK: dict[str, Any] = {
    "upstream__connect_timeout_s": 0.5,
    "upstream__first_byte_timeout_s": 1.0,
    "upstream__idle_timeout_s": 1.0,
    "health__interval_s": 0.2,
    "health__timeout_s": 0.3,
    "health__unhealthy_threshold": 2,
    "health__healthy_threshold": 2,
    "outlier__consecutive_failures": 2,
    "outlier__base_ejection_s": 0.5,
    "outlier__max_ejection_s": 2.0,
    "routing__affinity": False,  # one prompt would otherwise stick to one server
    "routing__policy": "round_robin",  # a recovered server gets its share at once
}


class Load:
    """Clients posting streamed chats in a loop; each answer is classified."""

    def __init__(self, base: str) -> None:
        self.url = f"{base}/v1/chat/completions"
        self.seen: Counter[str] = Counter()
        self.before_stream: list[str] = []  # failed before any byte: must stay empty
        self.served: list[tuple[float, str]] = []
        self.running = True

    async def client(self, session: aiohttp.ClientSession) -> None:
        while self.running:
            self.seen["sent"] += 1
            try:
                async with session.post(self.url, json=STREAM) as resp:
                    if resp.status != 200:
                        self.before_stream.append(f"{resp.status} {await resp.text()}")
                        continue
                    server = resp.headers["X-Mock-Server"]
                    try:
                        body = await resp.read()
                    except aiohttp.ClientPayloadError:
                        body = b"(cut)"
            except aiohttp.ClientError as exc:
                self.before_stream.append(repr(exc))
                continue
            if body.endswith(b"data: [DONE]\n\n"):
                self.seen["ok"] += 1
                self.served.append((time.monotonic(), server))
            else:
                assert b'data: {"error"' in body, body[-200:]
                self.seen["broken_mid_stream"] += 1

    def served_by_since(self, name: str, since: float) -> bool:
        return any(t > since and s == name for t, s in self.served)


class Closable:
    """An in-process mock whose listening port can be closed and opened again."""

    def __init__(self, port: int, name: str) -> None:
        self.port, self.name = port, name
        self.runner: web.AppRunner | None = None

    async def open(self) -> str:
        opts = MockOptions(models=("m",), name=self.name, ttft_ms=5, chunk_ms=5, tokens=4)
        self.runner = web.AppRunner(build_app(opts), shutdown_timeout=2.0)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


async def test_kill_close_and_hang_under_steady_load(procs: Procs, start_edge):
    port_a, port_c = free_port(), free_port()
    a = procs.mock(port_a, "m", name="A", extra=FAST)
    proc_a = procs.started[-1]
    b_server = Closable(free_port(), "B")
    b = await b_server.open()
    c = procs.mock(port_c, "m", name="C", extra=FAST)
    proc_c = procs.started[-1]
    edge = await start_edge({"m": [a, b, c]}, **QUICK)
    host_a, host_b, host_c = edge.view.fleet.models["m"]
    load = Load(edge.url)
    phases: dict[str, dict[str, int]] = {}

    def snapshot(name: str, since: dict[str, int]) -> dict[str, int]:
        now = {**load.seen, "retries": edge.forwarder.budget.retries}
        phases[name] = {k: v - since.get(k, 0) for k, v in now.items()}
        return now

    async def recovered(host: Host, name: str) -> None:
        back = time.monotonic()
        await until(lambda: host.state == UP and load.served_by_since(name, back))

    try:
        async with aiohttp.ClientSession() as session:
            clients = [asyncio.create_task(load.client(session)) for _ in range(6)]
            await until(lambda: {s for _, s in load.served} == {"A", "B", "C"})
            mark = snapshot("warm-up", {})

            proc_a.send_signal(signal.SIGKILL)
            await until(lambda: host_a.state != UP)
            await asyncio.sleep(0.5)
            procs.mock(port_a, "m", name="A", extra=FAST)  # the same server, restarted
            await recovered(host_a, "A")
            mark = snapshot("A killed -9, restarted", mark)

            await b_server.close()  # the port closes; B's keep-alive connections too
            await until(lambda: host_b.state != UP)
            await asyncio.sleep(0.5)
            await b_server.open()
            await recovered(host_b, "B")
            mark = snapshot("B's port closed, reopened", mark)

            proc_c.send_signal(signal.SIGSTOP)  # C hangs: connections accepted, no answer
            await until(lambda: host_c.state != UP)
            await asyncio.sleep(1.5)
            proc_c.send_signal(signal.SIGCONT)
            await recovered(host_c, "C")
            mark = snapshot("C hung (SIGSTOP), resumed", mark)
            load.running = False
            await asyncio.wait_for(asyncio.gather(*clients), timeout=10)
    finally:
        load.running = False
        proc_c.send_signal(signal.SIGCONT)
        await b_server.close()
    for name, counts in phases.items():
        print(f"{name}: {counts}")
    print(f"total: {dict(load.seen)} {edge.forwarder.budget!r} {edge.health!r}")
    assert load.before_stream == []
    assert load.seen["ok"] > 100
    assert all(p.get("sent", 0) > 0 for p in phases.values())
    assert edge.health.ejections >= 3 and edge.health.restores >= 3
    assert all(h.state == UP for h in (host_a, host_b, host_c))


async def test_upstream_killed_or_hung_mid_stream_ends_with_the_error_event(procs, start_edge):
    slow = ("--chunk-ms", "100", "--tokens", "100")
    killed = procs.mock(free_port(), "k", name="K", extra=slow)
    hung = procs.mock(free_port(), "h", name="H", extra=slow)
    proc_k, proc_h = procs.started
    edge = await start_edge(
        {"k": [killed], "h": [hung]}, **{**QUICK, "upstream__idle_timeout_s": 2.0}
    )
    async with aiohttp.ClientSession() as client:
        for model, fault, proc in (("k", signal.SIGKILL, proc_k), ("h", signal.SIGSTOP, proc_h)):
            async with client.post(
                f"{edge.url}/v1/chat/completions", json={**STREAM, "model": model}
            ) as resp:
                assert resp.status == 200
                first = await asyncio.wait_for(resp.content.readany(), timeout=5)
                proc.send_signal(fault)
                hit = time.monotonic()
                rest = await asyncio.wait_for(resp.content.read(), timeout=5)
                took = time.monotonic() - hit
            assert first.startswith(b"data: ")
            tail = orjson.loads(rest.rstrip().rsplit(b"\n\n", 1)[-1].removeprefix(b"data: "))
            assert tail["error"]["code"] == "upstream_error"
            # A killed server resets its connections: well before the idle timeout. A hung one
            # is given up after the idle timeout.
            assert took < 1.0 if fault == signal.SIGKILL else 1.8 < took < 2.0 + 1.0, took
    proc_h.send_signal(signal.SIGCONT)


async def test_all_servers_down_is_503_naming_each_server_and_why(start_edge, aiohttp_server):
    refused = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    failing = await aiohttp_server(controllable("F", {"post": 503}))
    urls = [*refused, f"http://127.0.0.1:{failing.port}"]
    edge = await start_edge(
        {"m": urls}, outlier__consecutive_failures=1, outlier__base_ejection_s=30.0,
        health__enabled=False,
    )  # fmt: skip
    async with aiohttp.ClientSession() as client:
        messages = []
        for _ in range(2):
            async with client.post(f"{edge.url}/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 503
                doc = await resp.json()
                messages.append(doc["error"]["message"])
                assert doc["detail"] == doc["error"]["message"]
    first, second = messages
    assert first.startswith("All servers failed for this model 'm':")
    lines = first.splitlines()[1:]
    assert len(lines) == 3 and all(any(u in line for line in lines) for u in urls)
    assert sum("connect failed" in line for line in lines) == 2 and "HTTP 503" in first
    # All three are ejected now: one gets an early trial, the other two say why they were not.
    lines = second.splitlines()[1:]
    assert len(lines) == 3 and sum("ejected for" in line for line in lines) == 2, second
    assert all(h.state == EJECTED for h in edge.view.fleet.models["m"])


async def test_a_model_whose_every_server_is_ejected_still_gets_a_trial(start_edge):
    port = free_port()
    server = Closable(port, "S")
    url = f"http://127.0.0.1:{port}"
    edge = await start_edge(
        {"m": [url]}, outlier__consecutive_failures=1, outlier__base_ejection_s=30.0,
        health__enabled=False,
    )  # fmt: skip
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{edge.url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 503
        host = edge.view.fleet.models["m"][0]
        assert host.state == EJECTED and host.until - time.monotonic() > 20
        await server.open()
        try:
            async with client.post(f"{edge.url}/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 200  # not 503 for the next 30 s
            assert host.state == UP
        finally:
            await server.close()


async def test_retry_budget_stops_a_retry_storm(start_edge, aiohttp_server):
    servers = [await aiohttp_server(controllable(n, {"post": 500})) for n in "XYZ"]
    edge = await start_edge(
        {"m": [f"http://127.0.0.1:{s.port}" for s in servers]},
        upstream__retry_ratio=0.2, upstream__retry_min_per_s=0.1, upstream__retry_window_s=10.0,
    )  # fmt: skip
    hosts = edge.view.fleet.models["m"]
    async with aiohttp.ClientSession() as client:
        for _ in range(40):
            async with client.post(f"{edge.url}/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 503
                last = await resp.text()
    attempts = sum(h.requests for h in hosts)
    print(f"40 requests, every server failing: {attempts} attempts; {edge.forwarder!r}")
    # Without a budget: 120 attempts. With it: 40 + 0.2 x 40 + 0.1 x 10 at most.
    assert 40 < attempts <= 49, attempts
    assert edge.forwarder.budget.denied >= 40 - 9 and "retry budget is spent" in last
    assert all(h.fails_in_row == 0 and h.state == UP for h in hosts)  # 500 does not eject


async def test_429_and_500_move_on_without_ejecting_and_4xx_passes_through(
    start_edge, aiohttp_server
):
    busy = await aiohttp_server(controllable("busy", {"post": 429}))
    good = await aiohttp_server(controllable("good", {}))
    edge = await start_edge(
        {"m": [f"http://127.0.0.1:{busy.port}", f"http://127.0.0.1:{good.port}"]},
        outlier__consecutive_failures=1, routing__affinity=False,
    )  # fmt: skip
    host_busy, host_good = edge.view.fleet.models["m"]
    async with aiohttp.ClientSession() as client:
        for _ in range(10):
            async with client.post(f"{edge.url}/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 200 and resp.headers["X-Mock-Server"] == "good"
        assert host_busy.requests > 0 and host_busy.state == UP
        requests_before = host_good.requests + host_busy.requests
        headers = {"X-Mock-Status": "404"}
        async with client.post(
            f"{edge.url}/v1/chat/completions", json=CHAT, headers=headers
        ) as resp:
            assert resp.status == 404  # the client's problem: passed through, not retried
    assert host_good.requests + host_busy.requests - requests_before in (1, 2)
    assert host_good.state == UP


async def test_stale_keep_alive_connection_is_redone_and_never_counted(start_edge):
    """A host that closes its end of a kept-alive connection (as llama.cpp does) exactly when
    the edge reuses it: with one server and one attempt, no POST may fail."""
    answered = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            body = b'{"ok":true}'
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            answered += 1
            await reader.readuntil(b"\r\n\r\n")  # the next request on this connection...
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()  # ...is never answered: the connection closes under it

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        edge = await start_edge({"m": [url]}, upstream__max_attempts=1, health__enabled=False)
        async with aiohttp.ClientSession() as client:
            for _ in range(6):
                async with client.post(f"{edge.url}/v1/chat/completions", json=CHAT) as resp:
                    assert resp.status == 200, await resp.text()
        host = edge.view.fleet.models["m"][0]
        assert answered == 6 and edge.forwarder.stale_retries == 5
        assert host.fails_in_row == 0 and edge.health.ejections == 0
    finally:
        server.close()
        await server.wait_closed()


async def test_timeouts_are_per_model(start_mock, start_edge):
    url = await start_mock(models=("quick", "patient"), tokens=2)
    edge = await start_edge(
        {"quick": [url], "patient": [url]},
        upstream__first_byte_timeout_s=5.0,
        upstream__models={"quick": {"first_byte_timeout_s": 0.3}},
        health__enabled=False,
    )
    slow = {"X-Mock-TTFT-Ms": "800"}
    async with aiohttp.ClientSession() as client:
        async with client.post(
            f"{edge.url}/v1/chat/completions", json={**STREAM, "model": "quick"}, headers=slow
        ) as resp:
            assert resp.status == 503
            assert "timed out before the first byte" in (await resp.json())["detail"]
        async with client.post(
            f"{edge.url}/v1/chat/completions", json={**STREAM, "model": "patient"}, headers=slow
        ) as resp:
            assert resp.status == 200 and (await resp.read()).endswith(b"data: [DONE]\n\n")
