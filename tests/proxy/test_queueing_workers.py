"""Capacity across the workers of one edge: `edge serve --workers 2` with `[admission]` in front of
one slow server. Both workers take requests; the server never runs more than its capacity at once,
and a worker's waiters are woken by the other worker's releases (the recheck timer). In one
process, two rows of one shared table stand for two workers: each attempt's start and end is seen
by the other at once, and a grant the other worker's attempt overtook waits for the next.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from edge.config import AdmissionSettings, HealthSettings, OutlierSettings
from edge.proxy.queueing import Queueing
from edge.routing.admission import Ticket
from edge.routing.attempt import OK, Attempt, Attempts
from edge.routing.fleet import Fleet, Host
from edge.routing.health import Health
from edge.routing.stats import SharedLoad
from loadtests.bench import quota
from tests.procs import Procs, free_port, write_fleet

CAPACITY, REQUESTS, HOLD_S = 2, 12, 0.3


class Upstream:
    """One server that holds each request HOLD_S, counts how many it runs at once and notes
    which worker of the edge sent each one (by the edge's end of the connection)."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.served = 0
        self.workers: set[int] = set()
        self.pids: list[int] = []

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            if peer is not None:
                self.workers.add(owner(int(peer[1]), self.pids))
            await asyncio.sleep(HOLD_S)
        finally:
            self.running -= 1
        self.served += 1
        return web.json_response(
            {
                "id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )  # fmt: skip

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/health", self.health)
        return app


def _sockets(port: int) -> list[list[str]]:
    """/proc/net/tcp's rows of loopback sockets whose local port is `port`."""
    rows = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            rows.append(fields)
    return rows


def owner(port: int, pids: list[int]) -> int:
    """Which of `pids` holds the socket bound to local `port` (0 if none)."""
    inodes = {f"socket:[{row[9]}]" for row in _sockets(port)}
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        for fd in os.listdir(fds):
            try:
                if os.readlink(fds / fd) in inodes:
                    return pid
            except OSError:
                continue
    return 0


def listening(port: int) -> int:
    return sum(1 for row in _sockets(port) if row[3] == "0A")  # 0A: LISTEN


async def ask(client: aiohttp.ClientSession, base: str, i: int) -> int:
    body = {"model": "m", "messages": [{"role": "user", "content": f"r{i}"}]}
    async with client.post(f"{base}/v1/chat/completions", json=body) as resp:
        await resp.read()
        return resp.status


async def test_two_workers_share_one_capacity_and_wake_each_other(
    procs: Procs, tmp_path: Path, aiohttp_server: Any
) -> None:
    upstream = Upstream()
    server = await aiohttp_server(upstream.app())
    fleet = write_fleet(tmp_path / "fleet.json", {"m": [f"http://127.0.0.1:{server.port}"]})
    config = tmp_path / "edge.toml"
    config.write_text(f'[admission]\nservers = {{"*" = {CAPACITY}}}\n')
    port = free_port()
    edge = procs.edge(port, "--workers", "2", "--config", str(config), "--models", str(fleet))
    deadline = time.monotonic() + 15
    while (len(quota.workers(edge.pid)) < 2 or listening(port) < 2) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # both workers listening before the load
    assert listening(port) == 2
    upstream.pids = quota.workers(edge.pid)
    base = f"http://127.0.0.1:{port}"
    # A connection per request: the kernel spreads them over both workers' sockets.
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as client:
        started = time.monotonic()
        statuses = await asyncio.gather(*(ask(client, base, i) for i in range(REQUESTS)))
        took = time.monotonic() - started
    assert statuses == [200] * REQUESTS
    assert upstream.served == REQUESTS
    assert upstream.workers == set(upstream.pids)  # both workers sent some
    assert upstream.most <= CAPACITY  # never more at once, whichever worker sent them
    # Each worker's waiters went as soon as the other's releases were seen (not at the end of
    # their own attempts only): the whole run is about REQUESTS / CAPACITY rounds of HOLD_S.
    assert took < REQUESTS * HOLD_S / CAPACITY + 2.0


async def until(check: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def done(attempt: Attempt) -> None:
    now = time.monotonic()
    attempt.answered(now)
    attempt.finish(OK, now)


def worker(shared: SharedLoad, host: Host) -> tuple[Queueing, Attempts]:
    """One worker's admission and attempts, wired to `shared` as edge/app.py wires them."""
    queueing = Queueing(AdmissionSettings(servers={"*": 1}), lambda: Fleet({"m": (host,)}))
    attempts = Attempts(Health(HealthSettings(), OutlierSettings()))
    attempts.released = queueing.released
    attempts.shared = queueing.capacity.shared = shared
    return queueing, attempts


async def test_each_attempt_is_seen_by_the_other_worker_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "load")
    one, two = SharedLoad(path, rows=2, row=0), SharedLoad(path, rows=2, row=1)
    try:
        mine, theirs = Host("http://a"), Host("http://a")  # one server, as each worker sees it
        (q1, a1), (q2, _) = worker(one, mine), worker(two, theirs)
        attempt = a1.start(mine, "m")
        # No publish in between: worker two's capacity reads worker one's cell as it is now.
        assert q2.capacity.load(theirs) == 1 and not q2.capacity.has_room(theirs, "m")
        assert theirs.stats.remote_inflight == 0  # the policies' copy waits for a publish
        two.publish([theirs])
        assert theirs.stats.remote_inflight == 1 and q2.capacity.load(theirs) == 1
        done(attempt)
        assert q2.capacity.load(theirs) == 0 and q1.capacity.load(mine) == 0
    finally:
        two.close()
        one.close()


async def test_a_grant_the_other_worker_overtook_waits_for_the_next(tmp_path: Path) -> None:
    path = str(tmp_path / "load")
    one, two = SharedLoad(path, rows=2, row=0), SharedLoad(path, rows=2, row=1)
    try:
        mine, theirs = Host("http://a"), Host("http://a")
        (q1, a1), (_, a2) = worker(one, mine), worker(two, theirs)
        running = a1.start(mine, "m")
        waiter = asyncio.create_task(q1.wait("m", (mine,), Ticket("t", 1.0, 5, 5.0)))
        await until(lambda: q1.length("m") == 1)
        # Worker one's attempt ends: its waiter is granted the slot and resumes a loop turn
        # later; within that turn worker two starts an attempt on the same server.
        done(running)
        assert q1.length("m") == 0 and q1.admission.queues["m"].granted == 1
        overtaking = a2.start(theirs, "m")
        await until(lambda: q1.length("m") == 1)  # back in the queue, not sent
        assert not waiter.done() and q1.admission.queues["m"].granted == 0
        done(overtaking)  # worker two's release...
        await asyncio.wait_for(waiter, 1.0)  # ...reaches worker one by its recheck timer
        assert q1.length("m") == 0 and q1.admission.queues["m"].granted == 0
    finally:
        two.close()
        one.close()
