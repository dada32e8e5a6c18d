"""The library and `edge serve`, given the same sources, place every conversation on the same
host (so both share its KV cache); `edge route` prints that host first."""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from pathlib import Path

import httpx2

import edge.direct
from edge.cli import main
from tests.procs import Procs, free_port, write_fleet

MODEL = "m"


def _conversations() -> list[tuple[dict[str, str], dict[str, object]]]:
    """200 conversations: 100 by X-Session-ID, 100 by their prompt's prefix."""
    found: list[tuple[dict[str, str], dict[str, object]]] = []
    hi = [{"role": "user", "content": "Hello"}]
    for i in range(100):
        found.append(({"X-Session-ID": f"session-{i}"}, {"model": MODEL, "messages": hi}))
    for i in range(100):
        messages = [
            {"role": "system", "content": f"You are assistant number {i}."},
            {"role": "user", "content": "Hello"},
        ]
        found.append(({}, {"model": MODEL, "messages": messages}))
    return found


def test_library_and_edge_serve_agree_on_200_conversations(procs: Procs, tmp_path: Path) -> None:
    urls = [procs.mock(free_port(), MODEL, name=f"a{i}") for i in range(4)]
    fleet = write_fleet(tmp_path / "fleet.json", {MODEL: urls})
    port = free_port()
    procs.edge(port, "--models", str(fleet))
    transport = edge.direct.transport(sources=[str(fleet)])
    library = httpx2.Client(transport=transport, base_url="http://direct")
    through = httpx2.Client(base_url=f"http://127.0.0.1:{port}")
    agree, homes = 0, Counter[str]()
    with library, through:
        for headers, body in _conversations():
            mine = library.post("/v1/chat/completions", json=body, headers=headers)
            theirs = through.post("/v1/chat/completions", json=body, headers=headers)
            assert mine.status_code == theirs.status_code == 200, (mine.text, theirs.text)
            host = mine.headers["x-edge-server"]
            agree += host == theirs.headers["x-edge-server"]
            homes[host] += 1
    transport.close()
    assert agree == 200
    assert len(homes) == 4  # spread: every host is the home of some conversations


def test_the_library_reads_a_registry_url(procs: Procs, tmp_path: Path) -> None:
    """A /libertai/models source (here the edge's own registry endpoint), as in production."""
    urls = [procs.mock(free_port(), MODEL, name=f"r{i}") for i in range(2)]
    port = free_port()
    procs.edge(port, "--models", str(write_fleet(tmp_path / "fleet.json", {MODEL: urls})))
    registry = f"http://127.0.0.1:{port}/libertai/models"
    transport = edge.direct.transport(sources=[registry], refresh_s=60.0)
    with httpx2.Client(transport=transport, base_url="http://direct") as client:
        reply = client.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
    transport.close()
    assert reply.status_code == 200
    assert reply.headers["x-edge-server"] in urls


def route(*argv: str) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["route", *argv]) == 0
    return out.getvalue().splitlines()


def test_edge_route_prints_the_home_first_then_the_rest(tmp_path: Path) -> None:
    urls = [f"http://127.0.0.1:{9000 + i}" for i in range(3)]
    fleet = str(write_fleet(tmp_path / "fleet.json", {MODEL: urls}))
    printed = route(MODEL, "--models", fleet, "--session", "abc")
    assert len(printed) == 3
    assert "affinity: the session key's home" in printed[0]
    assert {line.split()[1] for line in printed} == set(urls)
    # The library's own decision for that session names the same home.
    router = edge.direct.Router(edge.direct.settings_from(sources=[fleet]))
    decision, _ = router.order(MODEL, {"model": MODEL}, {"X-Session-ID": "abc"})
    router.close()
    assert decision.target is not None and printed[0].split()[1] == decision.target.url
    by_prompt = route(MODEL, "--models", fleet, "--prompt", "Hello there")
    assert "affinity: the prefix key's home" in by_prompt[0]
    plain = route(MODEL, "--models", fleet, "--policy", "round_robin")
    assert all("by policy round_robin" in line for line in plain)


def test_edge_route_says_when_the_model_is_unknown(tmp_path: Path) -> None:
    fleet = str(write_fleet(tmp_path / "fleet.json", {MODEL: ["http://127.0.0.1:9"]}))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["route", "other", "--models", fleet]) == 1
    assert "'other' is not listed" in err.getvalue()
