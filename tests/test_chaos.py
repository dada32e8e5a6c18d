"""The short chaos run (loadtests/chaos, `make chaos` for the long one): `edge serve --workers 2`
under load while hosts die, hang, slow down, fail and cut streams, the registry flaps, Redis
restarts and the edge reloads; then SIGTERM. Failures are expected during faults; every one must
be a clean answer. And the run's own detector: a stream cut with no error event is seen."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from loadtests.chaos.load import CUT, HUNG, MIX, OK, Load, stream_verdict, verdict
from loadtests.chaos.report import table
from loadtests.chaos.run import Options, run

DONE = b'data: {"choices": []}\n\ndata: [DONE]\n\n'
ERROR = b'data: {"choices": []}\n\ndata: {"error": {"message": "x", "type": "server_error"}}\n\n'
ANTHROPIC_ERROR = b'event: ping\ndata: {}\n\nevent: error\ndata: {"type": "error", "error": {}}\n\n'


def test_verdicts_tell_a_clean_end_an_error_event_and_a_cut_apart() -> None:
    assert stream_verdict(DONE, anthropic=False) == OK
    assert stream_verdict(ERROR, anthropic=False) == "stream error event"
    assert stream_verdict(ANTHROPIC_ERROR, anthropic=True) == "stream error event"
    assert stream_verdict(b"event: message_stop\ndata: {}\n\n", anthropic=True) == OK
    assert stream_verdict(DONE[:-1], anthropic=False) == CUT  # mid-event
    assert stream_verdict(b'data: {"choices": []}\n\n', anthropic=False) == CUT  # just stopped
    assert stream_verdict(b"", anthropic=False) == CUT
    chat = next(k for k in MIX if not k.stream)
    assert verdict(chat, 503, "application/json", b'{"error": {"message": "no"}}') == "status 503"
    assert verdict(chat, 502, "text/html", b"<html>bad gateway</html>") == "malformed"
    assert verdict(chat, 200, "application/json", b'{"choices": [') == "malformed"


async def test_the_load_sees_streams_cut_without_an_error_event(start_mock) -> None:
    """Straight from a host that drops streams (no edge to add an error event): every stream is
    counted as cut, every whole answer as ok, and every request is accounted for."""
    host = await start_mock(models=("chat-a", "chat-b", "solo"))
    async with aiohttp.ClientSession() as control:
        async with control.post(f"{host}/_mock/fault", json={"cut_after": 2}) as resp:
            assert resp.status == 200
    load = Load(host, "none", users=2, deadline_s=5.0, seed=3)
    load.phase = "cut"
    load.start()
    await asyncio.sleep(1.0)
    await load.stop()
    tally = load.tally("cut")
    assert tally.outcomes[CUT] > 0 and tally.ok > 0 and tally.outcomes[HUNG] == 0
    assert set(tally.outcomes) == {OK, CUT} and tally.sent == tally.ok + tally.failed


@pytest.mark.timeout(150)
async def test_short_chaos_run_every_answer_clean_no_leak_clean_drain(tmp_path: Path) -> None:
    report = await run(Options.short(workdir=tmp_path))
    shown = table(report)
    print(shown)  # the figures, with the failure or with -s
    missed = [goal for goal, met in report["goals"].items() if not met]
    assert not missed, f"missed: {missed}\n{shown}"
    t, e, d = report["totals"], report["edge"], report["drain"]
    assert t["streams_cut_without_error_event"] == 0, shown
    assert t["hung"] == 0, shown
    assert t["sent"] == t["ok"] + t["failed"] and not t["load_errors"], shown
    assert t["failed_by_cause"].get("malformed", 0) == 0, shown
    assert e["sockets_end"] <= e["sockets_start"] + e["socket_slack"], shown
    assert e["half_closed_end"] == 0, shown  # none left to a Redis that was restarted
    assert d["exit_code"] == 0 and d["streams"] == ["ok"] * len(d["streams"]), shown
    assert e["workers_start"] == e["workers_end"], shown  # no worker died and was replaced
    # The faults did happen: streams cut mid-answer were continued on another host, whole (no
    # failure in those phases), and h1's 500s left solo a 503.
    phases = {p["phase"]: p for p in report["phases"]}
    assert report["continuations"]["ok"] > 0, (report["continuations"], shown)
    assert not phases["cut"]["failed"] and not phases["cut-chunk"]["failed"], shown
    assert any(k.startswith("status 5") for k in phases["5xx"]["failed"]), shown
    assert all(p["sent"] > 0 for p in phases.values()), shown
