"""Grafana dashboards and Prometheus alerts against a real Prometheus scraping a real edge.

Every PromQL expression in every dashboard panel (and template variable) and in every alert rule
is evaluated through Prometheus's HTTP API after traffic with failures went through the edge,
and must return data; an expression naming a metric the edge does not export fails.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from tests.observe.test_metrics import scrape
from tests.procs import free_port

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "grafana" / "dashboards").glob("*.json"))
PROVISIONING = REPO / "grafana" / "provisioning"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
MESSAGES: Any = [{"role": "user", "content": "hello there"}]
# Grafana's variables, as the test evaluates them: every model and server, a window that holds
# the whole run (scrapes every second).
VARIABLES = {"model": ".*", "server": ".*", "__rate_interval": "1m", "__interval": "5s",
             "__range": "1m"}  # fmt: skip
# Alerts the traffic below makes true: their whole expression must return data, not only its
# left-hand side.
FIRING = {"EdgeHighErrorRatio", "EdgeServerDown", "EdgeModelNoHealthyServer"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: run `bash tests/system-deps.sh` (Debian package prometheus)"
    return path


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # rows hold their panels when collapsed


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every target of every panel and every query variable."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in _panels(board["panels"]):
            for target in panel.get("targets", []):
                out.append((f"{path.name}: {panel['title']} [{target['refId']}]", target["expr"]))
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                # label_values(selector, label): the selector is the PromQL part.
                match = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["definition"])
                assert match, var["definition"]
                out.append((f"{path.name}: variable ${var['name']}", match.group(1)))
    return out


def substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in VARIABLES, f"unknown Grafana variable ${name} in {expr}"
        return VARIABLES[name]

    out = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)
    assert "$" not in out
    return out


def signal_of(expr: str) -> str:
    """An alert's expression without its final threshold: what it compares."""
    match = re.fullmatch(r"(.*\S)\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?[-+]?[\d.]+(?:e[-+]?\d+)?\s*",
                         expr.strip(), re.S)  # fmt: skip
    return match.group(1) if match else expr


# --- static checks -------------------------------------------------------------------


def test_promtool_accepts_the_config_and_the_rules():
    promtool = _tool("promtool")
    for args in (["check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
                 ["check", "rules", str(ALERTS)]):  # fmt: skip
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr


def test_dashboards_and_provisioning_are_well_formed():
    assert [p.name for p in DASHBOARDS] == ["edge-overview.json", "edge-servers.json"]
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        panels = list(_panels(board["panels"]))
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in panels:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, f"{path.name}: {panel['title']} is too wide"
            if panel["type"] != "row":
                assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"
                assert panel["description"], f"{path.name}: {panel['title']} says nothing"
        names = [v["name"] for v in board["templating"]["list"]]
        assert names == ["datasource", "model", "server"]
    (source,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "edge.yml").read_text())[
        "providers"
    ]
    compose = REPO / "deploy" / "docker-compose.yml"
    if compose.exists():  # the deploy files mount the dashboards where the provider reads them
        mount = f"../grafana/dashboards:{provider['options']['path']}"
        assert mount in compose.read_text()


# --- the live run --------------------------------------------------------------------


class Prometheus:
    def __init__(self, base: str, client: aiohttp.ClientSession) -> None:
        self.base, self.client = base, client

    async def get(self, path: str, **params: str) -> Any:
        async with self.client.get(f"{self.base}{path}", params=params) as resp:
            doc = await resp.json()
        assert doc["status"] == "success", doc
        return doc["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def wait(self, expr: str, want: float, within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        got: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            got = await self.query(expr)
            if got and float(got[0]["value"][1]) == want:
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"{expr}: wanted {want}, got {got}")


@pytest.fixture
async def prometheus(tmp_path: Path, start_mock, start_edge) -> AsyncIterator[Any]:
    """A fleet (two mocks and a dead server), an edge, and Prometheus scraping it every second."""
    a = await start_mock(models=("m-chat",), name="A", tokens=8, chunk_ms=3)
    b = await start_mock(models=("m-chat",), name="B", tokens=8, chunk_ms=3)
    dead = f"http://127.0.0.1:{free_port()}"
    edge = await start_edge(
        {"m-chat": [a, b, dead], "m-dead": [dead]},
        health__interval_s=0.2, health__unhealthy_threshold=1,
        admission__servers={"*": 64},  # the Queueing row's series exist (nothing waits)
    )  # fmt: skip
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    config["rule_files"] = [str(ALERTS)]
    (job,) = config["scrape_configs"]
    job["static_configs"][0]["targets"] = [edge.url.removeprefix("http://")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = _start_prometheus(tmp_path, port)
    try:
        async with aiohttp.ClientSession() as client:
            prom = Prometheus(f"http://127.0.0.1:{port}", client)
            await _ready(prom, proc, tmp_path / "prometheus.log")
            await prom.wait('up{job="edge"}', 1.0)
            yield prom, edge, (a, b, dead)
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start_prometheus(tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    with (tmp_path / "prometheus.log").open("wb") as log:
        return subprocess.Popen(
            [_tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


async def _ready(prom: Prometheus, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            async with prom.client.get(f"{prom.base}/-/ready") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("Prometheus did not become ready:\n" + log.read_text())


async def _traffic(base: str) -> dict[str, int]:
    """One round of every kind of request; returns how many of each status class were sent."""
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="sk-test", max_retries=0)
    try:
        for _ in range(4):
            await client.chat.completions.create(model="m-chat", messages=MESSAGES)
        for _ in range(2):
            stream = await client.chat.completions.create(
                model="m-chat", messages=MESSAGES, stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
            assert [c async for c in stream]
        with pytest.raises(openai.BadRequestError):  # the server's own 4xx passes through
            await client.chat.completions.create(
                model="m-chat", messages=MESSAGES, extra_headers={"X-Mock-Status": "400"}
            )
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="no-such-model", messages=MESSAGES)
        for _ in range(3):
            with pytest.raises(openai.InternalServerError):
                await client.chat.completions.create(model="m-dead", messages=MESSAGES)
    finally:
        await client.close()
    await _hang_up(base)
    return {"2xx": 6, "4xx": 3, "5xx": 3}


async def _hang_up(base: str) -> None:
    """A streaming client that leaves after the first chunk (counted as 499)."""
    body = {"model": "m-chat", "messages": MESSAGES, "stream": True}
    async with aiohttp.ClientSession() as client:
        url = f"{base}/v1/chat/completions"
        async with client.post(url, json=body, headers={"X-Mock-Chunk-Ms": "200"}) as resp:
            await resp.content.readany()
            resp.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            samples = await scrape(client, base)
            if any(n == "edge_client_disconnects_total" and v for (n, _), v in samples.items()):
                return
            await asyncio.sleep(0.05)
    raise AssertionError("the edge did not count the client's disconnect")


async def test_every_dashboard_and_alert_expression_returns_data(prometheus):
    prom, edge, (a, b, dead) = prometheus
    sent = await _traffic(edge.url)
    await asyncio.sleep(1.5)  # a scrape between the rounds: every series then increases
    second = await _traffic(edge.url)
    want = {code: sent[code] + second[code] for code in sent}
    await prom.wait("sum(edge_requests_total)", float(sum(want.values())))
    await asyncio.sleep(1.2)  # one more evaluation of the rules on the final samples

    # Counters agree with the traffic, as Prometheus stored them.
    for code, count in want.items():
        await prom.wait(f'sum(edge_requests_total{{code="{code}"}})', float(count))
    async with aiohttp.ClientSession() as client:
        exported = {name for name, _ in await scrape(client, edge.url)}

    failures = []
    for where, raw in dashboard_expressions():
        expr = substitute(raw)
        failures += _unknown_metrics(where, expr, exported)
        failures += _no_data(where, expr, await prom.query(expr))
    rules = [r for g in (await prom.get("/api/v1/rules"))["groups"] for r in g["rules"]]
    names = {r["name"] for r in rules}
    written = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert names == written and len(names) >= 5
    for rule in rules:
        failures += _unknown_metrics(rule["name"], rule["query"], exported | {"up"})
        signal = signal_of(rule["query"])
        assert signal != rule["query"], f"{rule['name']}: no threshold found"
        failures += _no_data(f"alert {rule['name']} (signal)", signal, await prom.query(signal))
        if rule["name"] in FIRING:
            full = await prom.query(rule["query"])
            failures += _no_data(f"alert {rule['name']} (firing)", rule["query"], full)
    assert not failures, "\n".join(failures)
    # The alerts that fire name what they should.
    down = await prom.query("edge_server_up == 0")
    assert {r["metric"]["server"] for r in down} == {dead}
    (lonely,) = await prom.query("max by (model) (edge_server_up) == 0")
    assert lonely["metric"]["model"] == "m-dead"


def _unknown_metrics(where: str, expr: str, exported: set[str]) -> list[str]:
    names = set(re.findall(r"\b(edge_[a-z0-9_]+)\b", expr))
    if not names and "up{" not in expr:
        return [f"{where}: names no edge metric: {expr}"]
    return [f"{where}: the edge does not export {n}" for n in sorted(names - exported)]


def _no_data(where: str, expr: str, result: list[dict[str, Any]]) -> list[str]:
    values = [float(r["value"][1]) for r in result]
    if not any(math.isfinite(v) for v in values):
        return [f"{where}: no data ({values}) for {expr}"]
    return []
