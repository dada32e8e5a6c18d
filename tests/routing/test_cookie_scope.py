"""The affinity cookie is scoped to conversations (issue 18), through a real in-process edge, two
mock servers on 127.0.0.1 and the official `openai` SDK whose one HTTP client keeps cookies
across requests, as an application's does: its second conversation is placed by key, not sent
after its first; a conversation that failed over stays on its fallback while new ones go to
their home again once it recovered. X-Edge-Server names the host that answered."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import httpx2
import openai

from edge.routing.affinity import (
    affinity_key,
    conversation_tag,
    host_id,
    ranked,
    split_entries,
)

COOKIE = "edge_affinity"
RECOVERY_S = 10.0  # how long the recovered host may take to be routable and affine again


class Conversation:
    """One conversation of the client: its history, and the host that answered each turn."""

    def __init__(self, sdk: openai.AsyncOpenAI, opening: str) -> None:
        self.sdk = sdk
        self.messages: list[dict[str, str]] = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": opening},
        ]
        self.turns = 0

    @property
    def doc(self) -> dict[str, Any]:
        return {"model": "m", "messages": self.messages}

    async def turn(self) -> tuple[str, bool]:
        """(the host that answered, whether the answer set the cookie)."""
        if self.turns:
            self.messages.append({"role": "user", "content": f"and then {self.turns}?"})
        raw = await self.sdk.chat.completions.with_raw_response.create(
            model="m",
            messages=self.messages,  # type: ignore[arg-type]
            max_tokens=4,
        )
        answer = raw.parse().choices[0].message.content or ""
        self.messages.append({"role": "assistant", "content": answer})
        self.turns += 1
        return raw.headers["x-edge-server"], COOKIE in raw.headers.get("set-cookie", "")


def home_of(edge: Any, doc: dict[str, Any]) -> str:
    """The rendezvous home of a conversation among the edge's hosts (the edge's own hashing)."""
    found = affinity_key(doc, None, edge.config.routing.prefix_bytes)
    assert found is not None
    return ranked(found[1], edge.view.fleet.hosts("m"), edge.balancer.ids)[0].url


def tag_of(edge: Any, doc: dict[str, Any]) -> bytes | None:
    limit = edge.config.routing.prefix_bytes
    kind, key = affinity_key(doc, None, limit)  # type: ignore[misc]
    return conversation_tag(kind, key, doc, limit)


async def fault(url: str, body: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as control:
        async with control.post(f"{url}/_mock/fault", json=body) as resp:
            assert resp.status == 200, await resp.text()


async def wait_until_home_takes(edge: Any, doc: dict[str, Any], home: str) -> None:
    """A cookie-less request of `doc` reaches `home` again (it answers, passive health no longer
    holds its failure against it): polled, bounded."""
    deadline = time.monotonic() + RECOVERY_S
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as probe:
        while True:
            async with probe.post(f"{edge.url}/v1/chat/completions", json=doc) as resp:
                assert resp.status == 200
                if resp.headers["X-Edge-Server"] == home:
                    return
            assert time.monotonic() < deadline, f"{home} did not take its conversations again"
            await asyncio.sleep(0.1)


async def test_cookie_scoped_to_conversations_through_a_failover(start_mock, start_edge):
    urls = [await start_mock(name=name, models=("m",)) for name in "AB"]
    # A failed attempt keeps a host out of affinity for decay_s: short here, to see it return.
    edge = await start_edge({"m": urls}, routing__decay_s=0.3)
    async with httpx2.AsyncClient(cookies=httpx2.Cookies()) as http:
        sdk = openai.AsyncOpenAI(
            base_url=f"{edge.url}/v1", api_key="k", max_retries=0, http_client=http
        )
        by_home: dict[str, list[Conversation]] = {url: [] for url in urls}
        for i in range(200):  # openings whose homes are known: two on one host, one on the other
            conversation = Conversation(sdk, f"Conversation {i} opens.")
            by_home[home_of(edge, conversation.doc)].append(conversation)
        first, other = (url for url in urls)
        failed_over, new = by_home[first][:2]
        elsewhere = by_home[other][0]

        # (1) Two conversations of one client (one cookie jar) go to their own homes.
        assert await failed_over.turn() == (first, False)  # at home: nothing to remember
        assert await elsewhere.turn() == (other, False)
        assert not http.cookies

        # The first host fails: the conversation's turn is answered by the other one, and the
        # cookie now names that host for this conversation (its KV cache is there now).
        await fault(first, {"status": 503})
        assert await failed_over.turn() == (other, True)
        assert http.cookies.get(COOKIE)
        await fault(first, {})
        await wait_until_home_takes(edge, new.doc, first)

        # (2) and (3): the failed-over conversation keeps its host across turns, by the
        # cookie, though its home is back ...
        hits = edge.balancer.outcomes["cookie_hit"]
        for _ in range(3):
            assert await failed_over.turn() == (other, True)  # refreshed
        assert edge.balancer.outcomes["cookie_hit"] == hits + 3
        # ... while a new conversation of the same client, with the same cookie jar, goes to
        # its home, the recovered host, not where the cookie sent the other one.
        for _ in range(3):
            assert await new.turn() == (first, False)
        assert await elsewhere.turn() == (other, False)

    value = http.cookies[COOKIE]
    entries = split_entries(edge.balancer.codec.decode(value, time.time()))
    opening = {"model": "m", "messages": failed_over.messages[:2]}
    assert entries == [(host_id(other), tag_of(edge, opening))]  # one entry: the moved one
    assert all(h.inflight == 0 for h in edge.view.fleet.models["m"])
