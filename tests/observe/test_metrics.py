"""The metrics catalogue: units on Metrics, counters against real traffic, `--workers 2` sums."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge.config import HealthSettings, MetricsSettings, OutlierSettings
from edge.observe.families import Histogram
from edge.observe.metrics import Metrics
from edge.observe.record import RequestRecord, Usage
from edge.routing.attempt import CONNECT_ERROR, OK, TIMEOUT, Attempts
from edge.routing.fleet import Fleet, FleetView, Host, HostTable
from edge.routing.health import Health
from tests.procs import Procs, free_port, wait_http, write_fleet

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
MESSAGES: Any = [{"role": "user", "content": "hello there"}]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over every series whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


async def scrape(client: aiohttp.ClientSession, base: str) -> Samples:
    async with client.get(f"{base}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(await resp.text())


def _fleet(models: dict[str, list[str]]) -> tuple[FleetView, Fleet]:
    view = FleetView()
    view.fleet = HostTable().build(models)
    return view, view.fleet


# --- units ---------------------------------------------------------------------------


def test_histogram_buckets_are_cumulative_and_bounds_inclusive():
    hist = Histogram("h", "doc", ("model",), (0.1, 1.0))
    for value in (0.1, 0.5, 2.0):
        hist.observe(("m",), value)
    got = {(s.name, s.labels.get("le")): s.value for s in hist.family().samples}
    assert got[("h_bucket", "0.1")] == 1  # a value equal to a bound falls in that bucket
    assert got[("h_bucket", "1.0")] == 2
    assert got[("h_bucket", "+Inf")] == 3
    assert got[("h_count", None)] == 3 and got[("h_sum", None)] == pytest.approx(2.6)


def _worker(view: FleetView, settings: MetricsSettings | None = None) -> tuple[Metrics, Attempts]:
    """Metrics and the attempts' report wired as app.py wires them."""
    metrics = Metrics(lambda: view.fleet, settings)
    health = Health(HealthSettings(), OutlierSettings(), on_eject=metrics.ejected)
    return metrics, Attempts(health, listener=metrics.attempted)


def _served(attempts: Attempts, host: Host, ttfb_s: float = 0.05, body_s: float = 0.0) -> None:
    attempt = attempts.start(host, "m")
    attempt.answered(attempt.started + ttfb_s)
    attempt.finish(OK, attempt.started + ttfb_s + body_s)


def test_one_attempt_report_feeds_health_routing_and_every_family():
    view, fleet = _fleet({"m": ["http://a", "http://b"]})
    a, b = fleet.models["m"]
    metrics, attempts = _worker(view)
    failed = attempts.start(b, "m")
    failed.fail(CONNECT_ERROR, failed.started + 0.002, blame=True)
    served = attempts.start(a, "m")
    served.answered(served.started + 0.2)
    served.finish(OK, served.started + 0.8, completion_tokens=30)
    metrics.finished(
        RequestRecord(
            "m", a, "chat", 200, "ok", 1.0, 500, Usage(7, 30), attempts=2, bytes_in=90,
            stream=True, first_byte_s=0.25, stream_s=0.6, upstream_s=0.98,
        )
    )  # fmt: skip
    s = parse(metrics.render().decode())
    assert total(s, "edge_requests_total", code="2xx", model="m", server="http://a") == 1
    assert total(s, "edge_requests_total") == 1  # the failed attempt is not a request
    assert total(s, "edge_upstream_attempts_total", outcome="connect_error", server="http://b") == 1
    assert total(s, "edge_upstream_attempts_total", outcome="ok", server="http://a") == 1
    assert total(s, "edge_retries_total", model="m") == 1
    assert total(s, "edge_failovers_total", model="m") == 1
    assert total(s, "edge_tokens_total", type="prompt") == 7
    assert total(s, "edge_tokens_total", type="completion") == 30
    assert (
        total(s, "edge_request_bytes_total") == 90 and total(s, "edge_response_bytes_total") == 500
    )
    assert total(s, "edge_time_to_first_byte_seconds_sum") == pytest.approx(0.25)
    assert total(s, "edge_stream_duration_seconds_sum") == pytest.approx(0.6)
    assert total(s, "edge_decode_rate_tokens_per_second_sum") == pytest.approx(50.0)
    assert total(s, "edge_overhead_seconds_sum") == pytest.approx(0.02)
    assert total(s, "edge_affinity_total", result="none", model="m") == 1
    # Routing and health read the same two reports: one failure counted once, in one place; the
    # decode rate from the first byte on; nothing left in flight.
    assert a.stats.samples == 1 and b.stats.samples == 1
    assert b.fails_in_row == 1 and b.stats.failing(failed.ended_at, 10.0)
    assert a.fails_in_row == 0 and not a.stats.failing(served.ended_at, 10.0)
    assert a.stats.rate_ewma == pytest.approx(50.0)
    assert a.inflight == 0 and b.inflight == 0 and a.requests == 1 and b.requests == 1
    assert repr(metrics).startswith("<Metrics observations=1 series=")


def test_an_attempt_ends_once_and_a_cancelled_one_reports_nothing():
    view, fleet = _fleet({"m": ["http://a"]})
    (a,) = fleet.models["m"]
    metrics, attempts = _worker(view)
    attempt = attempts.start(a, "m")
    assert a.inflight == 1 and a.stats.waited(attempt.started + 1.0) == pytest.approx(1.0)
    attempt.cancel()
    attempt.cancel()  # Forwarder.done cancels whatever the relay did not finish: a no-op
    attempt.fail(TIMEOUT, attempt.started + 1.0, blame=True)  # too late: it ended
    assert a.inflight == 0 and a.stats.waited(attempt.started + 2.0) == 0.0
    assert a.stats.samples == 0 and a.fails_in_row == 0 and attempt.outcome == "cancelled"
    s = parse(metrics.render().decode())
    assert total(s, "edge_upstream_attempts_total") == 0


def test_unknown_models_and_foreign_affinity_values_are_not_labels():
    view, fleet = _fleet({"m": ["http://a"]})
    metrics = Metrics(lambda: view.fleet)
    metrics.finished(RequestRecord("", None, "chat", 404, "edge_error", 0.001))
    (a,) = fleet.models["m"]
    metrics.finished(
        RequestRecord("m", a, "chat", 200, "ok", 0.1, first_byte_s=0.05, affinity="x" * 50)
    )
    s = parse(metrics.render().decode())
    assert total(s, "edge_requests_total", model="(unknown)", server="(none)", code="4xx") == 1
    assert total(s, "edge_affinity_total", result="none") == 1
    values = {v for (_, labels) in s for _, v in labels}
    assert "x" * 50 not in values


def test_live_gauges_zero_series_and_health():
    view, fleet = _fleet({"m": ["http://a", "http://b"], "n": ["http://b"]})
    a, b = fleet.models["m"]
    metrics, attempts = _worker(view)
    held = attempts.start(a, "m")
    s = parse(metrics.render().decode())
    held.cancel()
    assert total(s, "edge_inflight_requests", server="http://a") == 1
    assert total(s, "edge_servers_known", model="m") == 2
    assert total(s, "edge_server_up", model="n", server="http://b") == 1
    # Zero series from the start, so rate() sees the first increase; one per server, not per
    # (model, server): b serves two models.
    assert ("edge_retries_total", frozenset({("model", "n")})) in s
    assert ("edge_ejections_total", frozenset({("server", "http://b")})) in s
    assert len([k for k in s if k[0] == "edge_ejections_total"]) == 2
    for _ in range(OutlierSettings().consecutive_failures + 1):
        attempt = attempts.start(b, "n")
        attempt.fail(TIMEOUT, attempt.started + 1.0, blame=True)
    s = parse(metrics.render().decode())
    assert total(s, "edge_server_up", model="n", server="http://b") == 0
    assert total(s, "edge_server_up", model="m", server="http://b") == 0
    assert total(s, "edge_ejections_total", server="http://b") == 1  # once, not per failure
    trial = attempts.start(b, "n")  # the half-open trial: it answers, b is back
    trial.answered(trial.started + 0.05)
    trial.finish(OK, trial.started + 0.1)
    s = parse(metrics.render().decode())
    assert total(s, "edge_server_up", server="http://b") == 2  # up again for both models


def test_disabled_metrics_still_feed_routing():
    view, fleet = _fleet({"m": ["http://a"]})
    (a,) = fleet.models["m"]
    metrics, attempts = _worker(view, MetricsSettings(enabled=False))
    _served(attempts, a)
    metrics.finished(RequestRecord("m", a, "chat", 200, "ok", 0.1, first_byte_s=0.05))
    assert a.stats.samples == 1
    s = parse(metrics.render().decode())
    assert {name for name, _ in s} == {"edge_build_info"}


def _sibling(directory: Path, source: Metrics, pid: int) -> None:
    """Rewrite `source`'s shared file as if another worker (`pid`) had written it."""
    source.share()
    own = directory / f"worker-{os.getpid()}.json"
    data = orjson.loads(own.read_bytes())
    data["pid"] = pid
    (directory / f"worker-{pid}.json").write_bytes(orjson.dumps(data))
    own.unlink()


def test_shared_samples_sum_counters_and_merge_gauges(tmp_path: Path):
    settings = MetricsSettings(shared_dir=str(tmp_path))
    view, fleet = _fleet({"m": ["http://a"]})
    (a,) = fleet.models["m"]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for pid, count in ((live.pid, 2), (dead.pid, 3)):
            other = Metrics(lambda: view.fleet, settings)
            for _ in range(count):
                other.finished(RequestRecord("m", a, "chat", 200, "ok", 0.1, first_byte_s=0.05))
            _sibling(tmp_path, other, pid)
        me, attempts = _worker(view, settings)
        me.finished(RequestRecord("m", a, "chat", 200, "ok", 0.1, first_byte_s=0.05))
        held = attempts.start(a, "m")
        s = parse(me.render().decode())
        held.cancel()
    finally:
        live.kill()
        live.wait()
    assert total(s, "edge_requests_total") == 6  # 1 + 2 + 3: a dead worker's counts stay
    assert total(s, "edge_time_to_first_byte_seconds_count") == 6
    assert total(s, "edge_time_to_first_byte_seconds_bucket", le="+Inf") == 6
    # Gauges: the live sibling's in-flight (0) plus mine (1); the dead worker's are gone.
    assert total(s, "edge_inflight_requests") == 1
    assert total(s, "edge_server_up") == 1 and total(s, "edge_servers_known") == 1
    assert total(s, "edge_build_info") == 1
    assert (tmp_path / f"worker-{os.getpid()}.json").exists()  # written before answering


# --- real traffic through an in-process edge -----------------------------------------


async def _post(client: aiohttp.ClientSession, base: str, body: Any, **headers: str) -> Any:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    async with client.post(f"{base}/v1/chat/completions", data=raw, headers=headers) as resp:
        return resp.status, await resp.read(), len(raw)


async def test_counters_agree_with_the_traffic_sent(start_mock, start_edge):
    a = await start_mock(models=("m1", "m2"), name="A", tokens=5, chunk_ms=2)
    dead = f"http://127.0.0.1:{free_port()}"
    edge = await start_edge({"m1": [a, dead], "m2": [dead]})
    plain = {"model": "m1", "messages": MESSAGES}
    stream = {**plain, "stream": True, "stream_options": {"include_usage": True}}
    sent: list[tuple[str, Any, dict[str, str]]] = [("m1", plain, {})] * 6
    sent += [("m1", stream, {})] * 3 + [("m1", plain, {"X-Mock-Status": "400"})] * 2
    sent += [("m2", {"model": "m2", "messages": MESSAGES}, {})] * 2
    sent += [("", {"model": "no-such-model-xyz", "messages": MESSAGES}, {}), ("", b"{nope", {})]
    async with aiohttp.ClientSession() as client:
        results = [await _post(client, edge.url, body, **h) for _, body, h in sent]
        s = await scrape(client, edge.url)
    statuses = [status for status, _, _ in results]
    assert statuses == [200] * 9 + [400] * 2 + [503] * 2 + [404, 400]
    assert total(s, "edge_requests_total") == len(sent)
    assert total(s, "edge_requests_total", code="2xx") == 9
    assert total(s, "edge_requests_total", code="4xx") == 4
    assert total(s, "edge_requests_total", code="5xx", model="m2", server="(none)") == 2
    assert total(s, "edge_requests_total", code="4xx", model="m1", server=a) == 2
    assert total(s, "edge_requests_total", model="(unknown)") == 2
    assert total(s, "edge_request_duration_seconds_count") == len(sent)
    assert total(s, "edge_overhead_seconds_count") == len(sent)
    assert total(s, "edge_time_to_first_byte_seconds_count", model="m1", server=a) == 11
    assert total(s, "edge_upstream_attempts_total", outcome="ok", server=a) == 11
    # Every attempt on the dead server moved to A: retries = failovers = its failed attempts.
    failed = total(s, "edge_upstream_attempts_total", model="m1", server=dead)
    assert total(s, "edge_retries_total", model="m1") == failed
    assert total(s, "edge_failovers_total", model="m1") == failed
    assert total(s, "edge_upstream_attempts_total", model="m2", server=dead) >= 1
    m1_in = sum(n for (model, _, _), (_, _, n) in zip(sent, results, strict=True) if model == "m1")
    m1_out = sum(len(body) for (model, _, _), (_, body, _) in zip(sent, results, strict=True)
                 if model == "m1")  # fmt: skip
    assert total(s, "edge_request_bytes_total", model="m1") == m1_in
    assert total(s, "edge_response_bytes_total", model="m1") == m1_out
    # Tokens: 6 plain answers and 3 streams with include_usage, 5 completion tokens each.
    assert total(s, "edge_tokens_total", model="m1", type="completion") == 45
    assert total(s, "edge_decode_rate_tokens_per_second_count", model="m1") == 3
    assert all("no-such-model-xyz" not in str(labels) for _, labels in s)


async def test_client_disconnect_is_counted(start_mock, start_edge):
    a = await start_mock(models=("m1",), tokens=50, chunk_ms=50)
    edge = await start_edge({"m1": [a]})
    body = {"model": "m1", "messages": MESSAGES, "stream": True}
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{edge.url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            await resp.content.readany()
            resp.close()  # hang up mid-stream
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            s = await scrape(client, edge.url)
            if total(s, "edge_client_disconnects_total", model="m1") == 1:
                break
            await asyncio.sleep(0.05)
    assert total(s, "edge_client_disconnects_total", model="m1") == 1
    assert total(s, "edge_requests_total", code="4xx", model="m1") == 1  # answered as 499


async def test_two_workers_report_the_sum_on_every_scrape(procs: Procs, tmp_path: Path):
    a = procs.mock(free_port(), "m", name="A")
    port = free_port()
    fleet = write_fleet(tmp_path / "f.json", {"m": [a]})
    edge = procs.edge(port, "--workers", "2", "--models", str(fleet))
    base = f"http://127.0.0.1:{port}"
    body = {"model": "m", "messages": MESSAGES}
    # Fresh connections, so the kernel spreads them over both workers (SO_REUSEPORT).
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
        for _ in range(50):  # both workers listening before the load
            await asyncio.to_thread(wait_http, f"{base}/ready", 5)
        statuses = await asyncio.gather(*(_post(client, base, body) for _ in range(40)))
        assert [s for s, _, _ in statuses] == [200] * 40
        await asyncio.sleep(1.5)  # > metrics.share_interval_s: every worker has shared
        scrapes = [await scrape(client, base) for _ in range(8)]
    for s in scrapes:
        assert total(s, "edge_requests_total", code="2xx", model="m") == 40
        assert total(s, "edge_upstream_attempts_total", outcome="ok") == 40
        assert total(s, "edge_servers_known", model="m") == 1  # a gauge: max, not a sum
        assert total(s, "edge_server_up", model="m") == 1  # the share of workers: all
        assert total(s, "edge_build_info") == 1
    temp = Path(tempfile.gettempdir())
    shared = [p for p in temp.glob("edge-metrics-*") if _owned_by(p, edge.pid)]
    assert len(shared) == 1
    edge.terminate()
    assert await asyncio.to_thread(edge.wait, 20) == 0
    assert all(not p.exists() for p in shared)  # the supervisor removed its directory


def _owned_by(directory: Path, supervisor: int) -> bool:
    """Whether a shared directory holds a file of a child of `supervisor`."""
    for path in directory.glob("worker-*.json"):
        try:
            pid = json.loads(path.read_text())["pid"]
            stat = Path(f"/proc/{pid}/stat").read_text().split()
        except (OSError, ValueError, KeyError):
            continue
        if int(stat[3]) == supervisor:
            return True
    return False
