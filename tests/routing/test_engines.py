"""Engine metrics: parsing vLLM / SGLang / llama.cpp expositions and folding queues into routing."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from edge.config import from_mapping
from edge.dev.mock import MockOptions, build_app
from edge.routing.engines import Scraper, parse_metrics
from edge.routing.fleet import FleetView, HostTable

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 4.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
vllm:num_requests_waiting{engine="1",model_name="m"} 2.0
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.83
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="m"} 0.0
"""
SGLANG = """\
sglang:num_running_reqs{model_name="m"} 3.0
sglang:num_queue_reqs{model_name="m"} 5.0
sglang:token_usage{model_name="m"} 0.41
"""
LLAMACPP = """\
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
llamacpp:requests_deferred 6 1700000000000
llamacpp:kv_cache_usage_ratio 0.25
"""


@pytest.mark.parametrize(
    ("text", "queue", "running", "kv"),
    [(VLLM, 9.0, 4.0, 0.83), (SGLANG, 5.0, 3.0, 0.41), (LLAMACPP, 6.0, 1.0, 0.25)],
)
def test_known_engines_give_queue_running_and_kv(text, queue, running, kv):
    load = parse_metrics(text)
    assert load is not None
    assert (load.queue, load.running, load.kv) == (queue, running, kv)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<html>not metrics</html>",
        "# HELP process_cpu_seconds_total\nprocess_cpu_seconds_total 12.5\n",
        'vllm:num_requests_waiting NaN\nvllm:num_requests_waiting{a="b"} -3\n',
        "vllm:num_requests_waiting{broken\n",
        "\x00\x01\x02 binary",
    ],
)
def test_unknown_or_garbled_formats_are_ignored(text):
    assert parse_metrics(text) is None


def metrics_handler(text: str, status: int = 200):
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=text, status=status)

    return metrics


def metrics_app(text: str, status: int = 200) -> web.Application:
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(text, status))
    return app


async def test_scraper_reads_only_the_servers_it_is_told_to(aiohttp_server):
    servers = [
        await aiohttp_server(metrics_app(VLLM)),
        await aiohttp_server(metrics_app("hello")),
        await aiohttp_server(metrics_app(VLLM, status=500)),
        await aiohttp_server(metrics_app(SGLANG)),
    ]
    urls = [f"http://127.0.0.1:{s.port}" for s in servers]
    view = FleetView(HostTable().build({"m": urls}))
    settings = from_mapping({}, routing__scrape=urls[:3], routing__scrape_interval_s=1.0).routing
    async with aiohttp.ClientSession() as session:
        scraper = Scraper(settings, view, session, clock=lambda: 100.0)
        assert await scraper.scrape_once() == 1
    hosts = view.fleet.models["m"]
    assert hosts[0].stats.engine_queue == 9.0 and hosts[0].stats.engine_kv == 0.83
    assert hosts[0].stats.queue(102.9) == 9.0 and hosts[0].stats.queue(103.1) == 0.0  # expires
    assert all(h.stats.engine_queue == 0.0 for h in hosts[1:])  # unknown, failed, not listed
    assert "scrapes=1 readings=1" in repr(scraper)


async def test_engine_queue_steers_traffic_through_the_edge(aiohttp_server, start_edge):
    busy_metrics = "vllm:num_requests_waiting 50\nvllm:num_requests_running 8\n"
    idle_metrics = "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\n"
    urls = []
    for name, text in (("busy", busy_metrics), ("idle", idle_metrics)):
        app = build_app(MockOptions(name=name, models=("m",)))
        app.router.add_get("/metrics", metrics_handler(text))
        urls.append(f"http://127.0.0.1:{(await aiohttp_server(app)).port}")
    edge = await start_edge(
        {"m": urls}, routing__scrape=["*"], routing__scrape_interval_s=0.05,
        routing__affinity=False,
    )  # fmt: skip
    for _ in range(100):
        if edge.scraper.readings >= 2:
            break
        await asyncio.sleep(0.02)
    served = []
    async with aiohttp.ClientSession() as client:
        for i in range(12):
            body = {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}
            async with client.post(f"{edge.url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                served.append(resp.headers["X-Mock-Server"])
    assert served == ["idle"] * 12
