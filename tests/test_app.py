"""Whole processes: `edge serve --workers 2`, SIGTERM drain, SIGHUP reload, `edge demo`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edge.cli import demo_text
from edge.config import ConfigError, from_mapping, load
from loadtests.bench import quota
from tests.procs import Procs, free_port, free_ports, wait_http, write_fleet

REPO = Path(__file__).resolve().parent.parent


async def _chat(client: aiohttp.ClientSession, base: str, **extra: str) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with client.post(f"{base}/v1/chat/completions", json=body, headers=extra) as resp:
        assert resp.status == 200, await resp.text()
        payload = await resp.read()
    assert payload.endswith(b"data: [DONE]\n\n")
    return resp.headers["X-Mock-Server"]


async def test_two_workers_share_the_port_and_serve(procs: Procs, tmp_path: Path):
    a = procs.mock(free_port(), "m", name="A")
    b = procs.mock(free_port(), "m", name="B")
    port = free_port()
    edge = procs.edge(
        port, "--workers", "2", "--models", str(write_fleet(tmp_path / "f.json", {"m": [a, b]}))
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while len(quota.workers(edge.pid)) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    workers = quota.workers(edge.pid)
    assert len(workers) == 2
    for _ in range(50):  # both workers must be listening before load
        try:
            wait_http(f"{base}/ready", timeout=1)
            break
        except TimeoutError:
            pass
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
        served = await asyncio.gather(*(_chat(client, base) for _ in range(40)))
    assert set(served) == {"A", "B"}
    edge.send_signal(signal.SIGTERM)
    assert edge.wait(timeout=20) == 0
    assert all(not Path(f"/proc/{w}").exists() or _zombie(w) for w in workers)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


async def test_sigterm_drains_streams_in_flight_and_refuses_new(procs: Procs, tmp_path: Path):
    a = procs.mock(free_port(), "m", name="A")
    port = free_port()
    edge = procs.edge(port, "--models", str(write_fleet(tmp_path / "f.json", {"m": [a]})))
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as client:
        # 16 tokens x 100 ms: the stream is still running when SIGTERM arrives.
        stream = asyncio.create_task(_chat(client, base, **{"X-Mock-Chunk-Ms": "100"}))
        await asyncio.sleep(0.5)
        edge.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as fresh:
                await fresh.get(f"{base}/health")
        assert await asyncio.wait_for(stream, timeout=10) == "A"
    assert await asyncio.to_thread(edge.wait, 15) == 0


async def test_sighup_reloads_the_fleet_file(procs: Procs, tmp_path: Path):
    a = procs.mock(free_port(), "m", name="A")
    b = procs.mock(free_port(), "m2", name="B")
    fleet = write_fleet(tmp_path / "f.json", {"m": [a]})
    config = tmp_path / "edge.toml"
    config.write_text(f'[discovery]\nsources = ["{fleet}"]\nrefresh_s = 3600\n')
    port = free_port()
    edge = procs.edge(port, "--config", str(config))
    base = f"http://127.0.0.1:{port}"
    write_fleet(fleet, {"m": [a], "m2": [b]})
    edge.send_signal(signal.SIGHUP)
    async with aiohttp.ClientSession() as client:
        for _ in range(100):
            async with client.get(f"{base}/v1/models") as resp:
                ids = {m["id"] for m in (await resp.json())["data"]}
            if "m2" in ids:
                break
            await asyncio.sleep(0.05)
        assert ids == {"m", "m2"}
    assert edge.poll() is None


def test_demo_runs_as_printed_and_stops_on_ctrl_c(procs: Procs):
    mock_port = free_ports(3)
    port = free_port()
    demo = procs.start("demo", "--port", str(port), "--mock-port", str(mock_port))
    wait_http(f"http://127.0.0.1:{port}/ready", timeout=30, proc=demo)
    os.killpg(demo.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out, _ = demo.communicate(timeout=30)
    assert demo.returncode == 0, out.decode()
    text = out.decode()
    assert "demo-chat" in text and "curl" in text and "from openai import OpenAI" in text
    for p in range(mock_port, mock_port + 3):
        with pytest.raises(OSError):
            wait_http(f"http://127.0.0.1:{p}/health", timeout=0.5)


def test_demo_snippets_work_against_a_running_demo(procs: Procs):
    mock_port = free_ports(3)
    port = free_port()
    demo = procs.start("demo", "--port", str(port), "--mock-port", str(mock_port))
    wait_http(f"http://127.0.0.1:{port}/ready", timeout=30, proc=demo)
    python = subprocess.run(
        [sys.executable, "-c", _printed_snippet(port)], capture_output=True, text=True, timeout=60
    )
    assert python.returncode == 0, python.stderr
    assert "from mock-" in python.stdout and "tok1" in python.stdout
    curl = subprocess.run(
        ["curl", "-s", f"http://127.0.0.1:{port}/v1/chat/completions", "-H",
         "Content-Type: application/json", "-d",
         '{"model": "demo-chat", "messages": [{"role": "user", "content": "Hello!"}]}'],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert json.loads(curl.stdout)["object"] == "chat.completion"


def _printed_snippet(port: int) -> str:
    match = re.search(r"<<'EOF'\n(.*?)\nEOF", demo_text(port, {}), re.S)
    assert match is not None
    return match.group(1)


def test_config_file_flags_and_validation(tmp_path: Path):
    path = tmp_path / "edge.toml"
    path.write_text(
        "[server]\nport = 9000\n[upstream]\nconnect_timeout_s = 2\n"
        '[models."a"]\nservers = ["http://127.0.0.1:1"]\n'
    )
    config = load(path, server__port=9100, discovery__sources=["x.json"])
    assert config.server.port == 9100 and config.upstream.connect_timeout_s == 2.0
    assert config.static == {"a": ("http://127.0.0.1:1",)}
    assert config.discovery.sources == ("x.json",)
    bad_configs: list[dict[str, Any]] = [
        {"server": {"port": "80"}},
        {"server": {"nope": 1}},
        {"bogus": {}},
        {"upstream": {"max_attempts": 0}},
        {"models": {"a": {"servers": "x"}}},
    ]
    for bad in bad_configs:
        with pytest.raises(ConfigError):
            from_mapping(bad)


def test_documented_example_config_loads_with_defaults():
    example = load(REPO / "config" / "edge.toml")
    assert example.server == from_mapping({}).server
    assert example.upstream == from_mapping({}).upstream


# Runs where make bench's F5 can: as root with a writable cgroup cpu controller (this machine,
# and CI on it). Elsewhere the bench reports F5 as not measured, with this same reason.
@pytest.mark.skipif(quota.unavailable() is not None, reason=f"CPU quotas: {quota.unavailable()}")
def test_bench_quota_holds_a_process_to_its_share_of_one_core():
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    held = quota.Quota("test")
    try:
        held.hold(child.pid, 0.2, core=0)
        group = held.groups[0]
        assert os.sched_getaffinity(child.pid) == {0}
        assert group.name in Path(f"/proc/{child.pid}/cgroup").read_text()
        time.sleep(0.5)
        assert held.throttled() > 0  # a busy loop runs out of a fifth of a core at once
    finally:
        child.kill()
        child.wait()
        held.close()
    assert not group.exists()
