"""edge.direct against two real llama.cpp servers (`make test-real`): a 4-turn conversation sent
from the OpenAI SDK straight to the hosts stays on one host, and that host's KV cache serves
each later turn's prompt prefix (llama.cpp's `timings.cache_n`), as through `edge serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

import edge.direct
from loadtests import llama
from tests.procs import Procs, free_port, write_fleet

pytestmark = [pytest.mark.real, pytest.mark.timeout(300)]

MODEL = llama.MODEL_ID
QUESTIONS = [
    "Name three colours of the rainbow.",
    "Which of them is the warmest?",
    "Name a fruit of that colour.",
    "Say it again in one word.",
]


def converse(client: openai.OpenAI, system: str) -> list[tuple[str, dict[str, Any]]]:
    """Four turns, each with the whole conversation so far: (host, llama.cpp timings) each."""
    messages: list[Any] = [{"role": "system", "content": system}]
    turns = []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=24, temperature=0
        )
        doc = raw.http_response.json()
        turns.append((raw.headers["x-edge-server"], doc["timings"]))
        messages.append({"role": "assistant", "content": doc["choices"][0]["message"]["content"]})
    return turns


def check(turns: list[tuple[str, dict[str, Any]]]) -> list[int]:
    """One host for all turns; turns 2-4 read most of their prompt from its cache."""
    assert len({host for host, _ in turns}) == 1, turns
    cached = [int(t["cache_n"]) for _, t in turns]
    for (_, before), (_, timings) in zip(turns, turns[1:], strict=False):
        # Most of the previous turn's prompt came from the cache (the last answer's tokens may
        # be re-tokenised differently from how they were generated, so not all of it).
        previous = before["cache_n"] + before["prompt_n"]
        assert timings["cache_n"] >= 0.75 * previous, (before, timings)
    return cached


def test_a_conversation_reuses_one_hosts_kv_cache_direct_and_through_the_edge(
    procs: Procs, tmp_path: Path
) -> None:
    with llama.fleet([free_port(), free_port()]) as urls:
        fleet = write_fleet(tmp_path / "fleet.json", {MODEL: urls})
        transport = edge.direct.transport(sources=[str(fleet)])
        direct = openai.OpenAI(
            base_url="http://direct/v1", api_key="none",
            http_client=httpx2.Client(transport=transport, timeout=120),
        )  # fmt: skip
        library = check(converse(direct, "You are a terse assistant. Conversation one."))
        port = free_port()
        procs.edge(port, "--models", str(fleet))
        through = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        edge_cached = check(converse(through, "You are a terse assistant. Conversation two."))
        # The control: without affinity, the turns alternate hosts and lose the cache.
        spread = edge.direct.transport(sources=[str(fleet)], affinity=False, policy="round_robin")
        control = openai.OpenAI(
            base_url="http://direct/v1", api_key="none",
            http_client=httpx2.Client(transport=spread, timeout=120),
        )  # fmt: skip
        moved = converse(control, "You are a terse assistant. Conversation three.")
        for client in (direct, through, control):
            client.close()
        transport.close()
        spread.close()
    assert len({host for host, _ in moved}) == 2
    assert moved[1][1]["cache_n"] < 0.75 * (moved[0][1]["cache_n"] + moved[0][1]["prompt_n"])
    lost = [t["cache_n"] for _, t in moved]
    print(f"\ncache_n per turn: edge.direct {library}; edge serve {edge_cached}; none {lost}")
