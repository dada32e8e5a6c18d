"""The queue at the edge, end to end: a real edge with `[admission]` capacity in front of servers
that hold each request a while, the official SDKs as clients.

A host at capacity takes nothing more while another has room; when every host is full, requests
wait in the edge (nothing sent) and go in order of priority, then by fair shares of workspaces;
a request that cannot be served within its deadline gets a 429 with Retry-After in its own
dialect; a client that leaves while queued leaves the queue at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from google import genai
from google.genai import errors as gerrors
from google.genai import types as gtypes

from edge.access.keys import FileBackend, create_key
from edge.config import AdmissionSettings
from edge.errors import TooManyRequests, Unavailable
from edge.proxy.queueing import Queueing
from edge.routing.admission import Ticket
from edge.routing.fleet import EJECTED, Fleet, Host
from tests.observe.test_metrics import scrape, total

WS_HEAVY, WS_LIGHT = "a" * 24, "b" * 24


class Slots:
    """An OpenAI-compatible server that holds each request `delay_s` and records, per request,
    the tag in its message and how many it was running at once."""

    def __init__(self, delay_s: float = 0.15) -> None:
        self.delay_s = delay_s
        self.running = 0
        self.most = 0
        self.arrivals: list[str] = []

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.arrivals.append(body["messages"][0]["content"])
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(float(request.headers.get("X-Hold-S", self.delay_s)))
        finally:
            self.running -= 1
        return web.json_response(
            {
                "id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )  # fmt: skip

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app


async def slots_server(aiohttp_server: Any, delay_s: float = 0.15) -> tuple[Slots, str]:
    slots = Slots(delay_s)
    server = await aiohttp_server(slots.app())
    return slots, f"http://127.0.0.1:{server.port}"


@contextlib.asynccontextmanager
async def client(base: str, **headers: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=base, api_key="k", max_retries=0, default_headers=headers
    ) as c:
        yield c


async def ask(c: openai.AsyncOpenAI, tag: str, **headers: str) -> Any:
    return await c.chat.completions.create(
        model="m", messages=[{"role": "user", "content": tag}], extra_headers=headers
    )


async def until(check: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def queued(edge: Any) -> int:
    return int(edge.forwarder.queueing.length("m"))


async def test_a_host_at_capacity_takes_nothing_while_another_has_room(aiohttp_server, start_edge):
    (a, url_a), (b, url_b) = [await slots_server(aiohttp_server) for _ in range(2)]
    edge = await start_edge(
        {"m": [url_a, url_b]}, admission__servers={url_a: 1, url_b: 2}, routing__policy="random"
    )
    async with client(f"{edge.url}/v1") as c:
        answers = await asyncio.gather(*(ask(c, f"r{i}") for i in range(12)))
    assert all(r.choices[0].message.content == "ok" for r in answers)
    assert a.most == 1 and b.most == 2  # never more than each host's capacity
    assert len(a.arrivals) + len(b.arrivals) == 12
    async with aiohttp.ClientSession() as session:
        text = await scrape(session, edge.url)
    assert total(text, "edge_admission_total", model="m", outcome="queued") >= 9
    assert total(text, "edge_queue_length", model="m") == 0


async def test_higher_priority_is_served_first(aiohttp_server, start_edge):
    slots, url = await slots_server(aiohttp_server)
    edge = await start_edge({"m": [url]}, admission__servers={"*": 1}, admission__max_priority=9)
    async with client(f"{edge.url}/v1") as c:
        first = asyncio.create_task(ask(c, "first", **{"X-Hold-S": "0.3"}))
        await until(lambda: slots.running == 1)
        tasks = []
        for tag, priority in (("low", "low"), ("p3", "3"), ("high", "high"), ("normal", "5")):
            tasks.append(asyncio.create_task(ask(c, tag, **{"X-Edge-Priority": priority})))
            await until(lambda: queued(edge) == len(tasks))  # noqa: B023 (awaited at once)
        await asyncio.gather(first, *tasks)
    assert slots.arrivals == ["first", "high", "normal", "p3", "low"]


async def test_a_priority_above_the_cap_is_capped(aiohttp_server, start_edge):
    slots, url = await slots_server(aiohttp_server)
    edge = await start_edge({"m": [url]}, admission__servers={"*": 1})  # max_priority 5
    async with client(f"{edge.url}/v1") as c:
        first = asyncio.create_task(ask(c, "first", **{"X-Hold-S": "0.3"}))
        await until(lambda: slots.running == 1)
        normal = asyncio.create_task(ask(c, "normal"))
        await until(lambda: queued(edge) == 1)
        greedy = asyncio.create_task(ask(c, "greedy", **{"X-Edge-Priority": "high"}))
        await until(lambda: queued(edge) == 2)
        await asyncio.gather(first, normal, greedy)
        with pytest.raises(openai.BadRequestError) as bad:
            await ask(c, "x", **{"X-Edge-Priority": "urgent"})
    assert slots.arrivals == ["first", "normal", "greedy"]  # "high" counted as 5: arrival order
    assert "X-Edge-Priority" in bad.value.message


async def test_a_workspace_sending_ten_times_more_does_not_delay_the_other(
    aiohttp_server, start_edge
):
    slots, url = await slots_server(aiohttp_server, delay_s=0.03)
    edge = await start_edge({"m": [url]}, admission__servers={"*": 1})
    async with (
        client(f"{edge.url}/api/{WS_HEAVY}/v1") as heavy,
        client(f"{edge.url}/api/{WS_LIGHT}/v1") as light,
    ):
        first = asyncio.create_task(ask(heavy, "heavy", **{"X-Hold-S": "0.3"}))
        await until(lambda: slots.running == 1)
        tasks = [asyncio.create_task(ask(heavy, "heavy")) for _ in range(20)]
        await until(lambda: queued(edge) == 20)
        tasks += [asyncio.create_task(ask(light, "light")) for _ in range(2)]
        await until(lambda: queued(edge) == 22)
        await asyncio.gather(first, *tasks)
    # After the request running, the light workspace's two go within the next four.
    assert slots.arrivals[1:5].count("light") == 2, slots.arrivals[:6]


async def test_weights_per_workspace_share_the_fleet_by_plan(aiohttp_server, start_edge):
    slots, url = await slots_server(aiohttp_server, delay_s=0.01)
    edge = await start_edge(
        {"m": [url]}, admission__servers={"*": 1}, admission__weights={WS_LIGHT: 3}
    )
    async with (
        client(f"{edge.url}/api/{WS_HEAVY}/v1") as base,
        client(f"{edge.url}/api/{WS_LIGHT}/v1") as pro,
    ):
        first = asyncio.create_task(ask(base, "first", **{"X-Hold-S": "0.3"}))
        await until(lambda: slots.running == 1)
        tasks = [asyncio.create_task(ask(base, "base")) for _ in range(12)]
        await until(lambda: queued(edge) == 12)
        tasks += [asyncio.create_task(ask(pro, "pro")) for _ in range(12)]
        await until(lambda: queued(edge) == 24)
        await asyncio.gather(first, *tasks)
    # 3:1 while both wait (base's first request, sent at once, counts against it too).
    assert slots.arrivals[1:17].count("pro") == 12 and slots.arrivals[1:5].count("pro") == 3


# --- deadlines, in each dialect ----------------------------------------------------------------


async def busy_edge(start_mock: Any, start_edge: Any) -> Any:
    mock = await start_mock(models=("m",))
    edge = await start_edge({"m": [mock]}, admission__servers={"*": 1})
    return edge


@contextlib.asynccontextmanager
async def occupied(edge: Any) -> AsyncIterator[None]:
    """The only slot taken by a slow request (the mock's first token after 1.5 s)."""
    async with client(f"{edge.url}/v1", **{"X-Mock-TTFT-Ms": "1500"}) as c:
        task = asyncio.create_task(ask(c, "slow"))
        await until(lambda: edge.forwarder.queueing.capacity.load(edge.view.fleet.hosts("m")[0]))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


DEADLINE = {"X-Edge-Deadline-Ms": "100"}


async def test_a_deadline_passed_in_the_queue_is_a_429_with_retry_after_openai(
    start_mock, start_edge
):
    edge = await busy_edge(start_mock, start_edge)
    async with occupied(edge), client(f"{edge.url}/v1") as c:
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as raised:
            await ask(c, "late", **DEADLINE)
    assert 0.09 < time.monotonic() - started < 1.0
    assert raised.value.response.headers["Retry-After"] == "1"
    assert raised.value.code == "shed_deadline" and "deadline" in raised.value.message
    assert queued(edge) == 0


async def test_a_deadline_passed_in_the_queue_is_a_429_anthropic(start_mock, start_edge):
    edge = await busy_edge(start_mock, start_edge)
    async with (
        occupied(edge),
        anthropic.AsyncAnthropic(base_url=edge.url, api_key="k", max_retries=0) as c,
    ):
        with pytest.raises(anthropic.RateLimitError) as raised:
            await c.messages.create(
                model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}],
                extra_headers=DEADLINE,
            )  # fmt: skip
    assert raised.value.response.headers["Retry-After"] == "1"
    body: Any = raised.value.body
    assert body["error"]["type"] == "rate_limit_error"  # Anthropic's own shape


async def test_a_deadline_passed_in_the_queue_is_a_429_gemini(start_mock, start_edge):
    edge = await busy_edge(start_mock, start_edge)
    async with occupied(edge), aiohttp.ClientSession() as session:
        options = gtypes.HttpOptions(base_url=edge.url, aiohttp_client=session, headers=DEADLINE)
        gemini = genai.Client(api_key="k", http_options=options)
        with pytest.raises(gerrors.ClientError) as raised:
            await gemini.aio.models.generate_content(model="m", contents="hi")
    assert raised.value.code == 429 and raised.value.status == "RESOURCE_EXHAUSTED"
    assert raised.value.response.headers["Retry-After"] == "1"


async def test_a_request_that_would_wait_past_its_deadline_is_refused_at_once(
    aiohttp_server, start_edge
):
    slots, url = await slots_server(aiohttp_server, delay_s=0.2)
    edge = await start_edge({"m": [url]}, admission__servers={"*": 1})
    async with client(f"{edge.url}/v1") as c:
        await ask(c, "measured")  # the service time estimate: 0.2 s
        first = asyncio.create_task(ask(c, "first"))
        await until(lambda: slots.running == 1)
        waiting = [asyncio.create_task(ask(c, f"w{i}")) for i in range(3)]
        await until(lambda: queued(edge) == 3)
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as raised:
            await ask(c, "hopeless", **{"X-Edge-Deadline-Ms": "300"})  # 4 x 0.2 s ahead
        assert time.monotonic() - started < 0.1  # not after waiting in vain
        await asyncio.gather(first, *waiting)
    assert raised.value.code == "shed_deadline"
    assert int(raised.value.response.headers["Retry-After"]) >= 1
    assert "hopeless" not in slots.arrivals


async def test_a_full_queue_sheds_with_429(aiohttp_server, start_edge):
    slots, url = await slots_server(aiohttp_server)
    edge = await start_edge({"m": [url]}, admission__servers={"*": 1}, admission__queue_length=1)
    async with client(f"{edge.url}/v1") as c:
        first = asyncio.create_task(ask(c, "first", **{"X-Hold-S": "0.3"}))
        await until(lambda: slots.running == 1)
        second = asyncio.create_task(ask(c, "second"))
        await until(lambda: queued(edge) == 1)
        with pytest.raises(openai.RateLimitError) as raised:
            await ask(c, "third")
        await asyncio.gather(first, second)
    assert raised.value.code == "shed_full"
    async with aiohttp.ClientSession() as session:
        text = await scrape(session, edge.url)
    assert total(text, "edge_admission_total", model="m", outcome="shed_full") == 1


async def test_a_client_that_leaves_while_queued_leaves_the_queue_at_once(
    aiohttp_server, start_edge
):
    slots, url = await slots_server(aiohttp_server)
    edge = await start_edge({"m": [url]}, admission__servers={"*": 1})
    async with client(f"{edge.url}/v1") as c:
        first = asyncio.create_task(ask(c, "first", **{"X-Hold-S": "0.4"}))
        await until(lambda: slots.running == 1)
        gone = asyncio.create_task(ask(c, "gone"))
        await until(lambda: queued(edge) == 1)
        gone.cancel()  # the SDK closes its connection
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        await until(lambda: queued(edge) == 0, timeout_s=0.2)
        async with aiohttp.ClientSession() as session:
            text = await scrape(session, edge.url)
        assert total(text, "edge_queue_length", model="m") == 0
        nxt = await ask(c, "next")  # queued behind the first only, then served
        await first
    assert nxt.choices[0].message.content == "ok"
    assert slots.arrivals == ["first", "next"]


# --- the glue, without a server -----------------------------------------------------------------


async def test_a_waiter_whose_hosts_all_went_down_gets_a_503_with_retry_after() -> None:
    host = Host("http://a")
    host.inflight = 1
    fleet = Fleet({"m": (host,)})
    queueing = Queueing(AdmissionSettings(servers={"*": 1}), lambda: fleet)
    task = asyncio.create_task(queueing.wait("m", (host,), Ticket("t", 1.0, 5, 0.05)))
    await until(lambda: queueing.length("m") == 1)
    host.state, host.until = EJECTED, time.monotonic() + 60
    with pytest.raises(Unavailable) as raised:
        await task
    assert raised.value.headers["Retry-After"] == "1"
    assert queueing.outcomes.values[("m", "shed_down")] == 1


async def test_a_grant_not_used_goes_to_the_next_waiter() -> None:
    host = Host("http://a")
    host.inflight = 1
    queueing = Queueing(AdmissionSettings(servers={"*": 1}), lambda: Fleet({"m": (host,)}))
    one = asyncio.create_task(queueing.wait("m", (host,), Ticket("t", 1.0, 5, 5.0)))
    two = asyncio.create_task(queueing.wait("m", (host,), Ticket("u", 1.0, 5, 5.0)))
    await until(lambda: queueing.length("m") == 2)
    host.inflight = 0
    queueing._pump("m")  # what an attempt's end does: `one` is granted...
    one.cancel()  # ...and its client leaves before it resumes
    with contextlib.suppress(asyncio.CancelledError):
        await one
    await asyncio.wait_for(two, 1.0)  # the slot went to `two`
    assert queueing.length("m") == 0 and queueing.admission.queues["m"].granted == 0


async def test_an_eviction_by_priority_answers_the_evicted_with_429() -> None:
    host = Host("http://a")
    host.inflight = 1
    settings = AdmissionSettings(servers={"*": 1}, queue_length=1)
    queueing = Queueing(settings, lambda: Fleet({"m": (host,)}))
    low = asyncio.create_task(queueing.wait("m", (host,), Ticket("t", 1.0, 1, 5.0)))
    await until(lambda: queueing.length("m") == 1)
    high = asyncio.create_task(queueing.wait("m", (host,), Ticket("u", 1.0, 9, 5.0)))
    with pytest.raises(TooManyRequests) as raised:
        await low
    assert raised.value.code == "shed_priority" and raised.value.headers["Retry-After"]
    host.inflight = 0
    queueing._tick()  # the recheck timer's work
    await asyncio.wait_for(high, 1.0)


async def test_a_keys_priority_cap_and_default(aiohttp_server, start_edge, tmp_path):
    """Keys mode: the key's --max-priority lets it ask for high, its --priority is its default;
    a key without either is capped at [admission] max_priority (5)."""
    slots, url = await slots_server(aiohttp_server)
    store = FileBackend(str(tmp_path / "keys.json"))
    _, basic = create_key(store, "basic", workspace=WS_HEAVY)
    _, urgent = create_key(store, "urgent", workspace=WS_LIGHT, max_priority=9)
    _, default_high = create_key(store, "batch", priority=8, weight=2.0)
    edge = await start_edge(
        {"m": [url]}, admission__servers={"*": 1}, auth__mode="keys",
        auth__key_store=str(tmp_path / "keys.json"),
    )  # fmt: skip
    high = {"X-Edge-Priority": "high"}
    async with (
        openai.AsyncOpenAI(base_url=f"{edge.url}/v1", api_key=basic, max_retries=0) as b,
        openai.AsyncOpenAI(base_url=f"{edge.url}/v1", api_key=urgent, max_retries=0) as u,
        openai.AsyncOpenAI(base_url=f"{edge.url}/v1", api_key=default_high, max_retries=0) as d,
    ):
        first = asyncio.create_task(ask(b, "first", **{"X-Hold-S": "0.3"}))
        await until(lambda: slots.running == 1)
        tasks = []
        for c, tag in ((b, "basic-high"), (u, "urgent-high"), (d, "batch-default")):
            tasks.append(asyncio.create_task(ask(c, tag, **(high if c is not d else {}))))
            await until(lambda: queued(edge) == len(tasks))  # noqa: B023 (awaited at once)
        await asyncio.gather(first, *tasks)
    # urgent: 9; batch: its own default 8; basic asked for high but is capped at 5.
    assert slots.arrivals == ["first", "urgent-high", "batch-default", "basic-high"]
