"""Discovery against a registry the test controls: servers added and removed (streams on a removed
one finish), ETag, the registry down or answering garbage, an edge restarted from the cache file
(a named one, and the default "auto" one per set of sources, as a killed `edge serve` process),
and https upstreams verified by default."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import ssl
import stat
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from edge.config import DiscoverySettings
from edge.routing.discovery import Discovery, Source, cache_path, read_cache, write_cache
from edge.routing.fleet import REMOVED, UP, FleetView, HostTable
from tests.procs import Procs, free_port
from tests.routing.test_health import until

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class Registry:
    """GET /libertai/models with an ETag; can answer garbage, fail, or close its port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/libertai/models"
        self.body = b"{}"
        self.status = 200
        self.not_modified = 0
        self.hits = 0
        self.runner: web.AppRunner | None = None

    def serve(self, models: dict[str, list[str]]) -> None:
        self.status = 200
        self.body = orjson.dumps({m: {"servers": s} for m, s in models.items()})

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        etag = '"' + hashlib.sha1(self.body).hexdigest() + '"'
        if self.status == 200 and request.headers.get("If-None-Match") == etag:
            self.not_modified += 1
            return web.Response(status=304, headers={"ETag": etag})
        headers = {"ETag": etag} if self.status == 200 else {}
        return web.Response(status=self.status, body=self.body, headers=headers)

    async def open(self) -> None:
        app = web.Application()
        app.router.add_get("/libertai/models", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


async def chat(client: aiohttp.ClientSession, base: str, **headers: str) -> str:
    async with client.post(f"{base}/v1/chat/completions", json=CHAT, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["X-Mock-Server"]


def urls(edge: Any) -> set[str]:
    return {h.url for h in edge.view.fleet.models.get("m", ())}


async def test_registry_adds_removes_fails_and_an_edge_restarts_from_the_cache(
    start_mock, start_edge, tmp_path: Path
):
    a = await start_mock(models=("m",), name="A", tokens=3)
    b = await start_mock(models=("m",), name="B", tokens=3)
    registry = Registry()
    registry.serve({"m": [a]})
    await registry.open()
    cache = tmp_path / "fleet.json"
    settings = {
        "discovery__sources": [registry.url], "discovery__refresh_s": 0.05,
        "discovery__cache_file": str(cache), "routing__affinity": False,
        "routing__policy": "round_robin",
    }  # fmt: skip
    edge = await start_edge(**settings)
    d = edge.discovery
    try:
        async with aiohttp.ClientSession() as client:
            assert {await chat(client, edge.url) for _ in range(3)} == {"A"}

            # Added, under a URL spelled differently each time: one server, one Host.
            registry.serve({"m": [a, b.upper() + "/"]})
            await until(lambda: urls(edge) == {a, b})
            host_b = edge.view.fleet.models["m"][1]
            served = {await chat(client, edge.url) for _ in range(12)}
            assert served == {"A", "B"} and host_b.requests > 0
            registry.serve({"m": [a, b]})
            await until(lambda: registry.hits >= 3 and registry.not_modified >= 2)
            assert edge.view.fleet.models["m"][1] is host_b  # its statistics survive

            # Removed while a stream runs on it: the stream finishes, nothing new goes there.
            slow = {**CHAT, "stream": True}
            pin = {"X-Edge-Server": a, "X-Mock-Chunk-Ms": "150", "X-Mock-Tokens": "5"}
            async with client.post(
                f"{edge.url}/v1/chat/completions", json=slow, headers=pin
            ) as stream:
                assert stream.status == 200
                host_a = next(h for h in edge.view.fleet.models["m"] if h.url == a)
                registry.serve({"m": [b]})
                await until(lambda: urls(edge) == {b})
                assert host_a.state == REMOVED and host_a.inflight == 1
                assert {await chat(client, edge.url) for _ in range(6)} == {"B"}
                assert (await stream.read()).endswith(b"data: [DONE]\n\n")

            # Down, then garbage of three kinds: the last good view stays, and routing works.
            errors = d.outcomes["error"]
            await registry.close()
            await until(lambda: d.outcomes["error"] >= errors + 3)
            await registry.open()
            for status, body in ((200, b"<html>oops"), (200, b"[1, 2]"), (200, b"{}"), (502, b"")):
                registry.status, registry.body = status, body
                errors = d.outcomes["error"]
                await until(lambda e=errors: d.outcomes["error"] >= e + 2)
                assert urls(edge) == {b} and await chat(client, edge.url) == "B"
            assert "error=" in repr(d) and d.sources[0].failures >= 2

            # Restarted while the registry is down: it routes from the cache file.
            await registry.close()
            restarted = await start_edge(**settings)
            assert urls(restarted) == {b} and await chat(client, restarted.url) == "B"
            assert restarted.discovery.sources[0].cached
            no_cache = {**settings, "discovery__cache_file": ""}
            forgetful = await start_edge(**no_cache)
            assert urls(forgetful) == set()

            # The registry comes back: the restarted edge follows it, and the file is updated.
            registry.serve({"m": [a, b]})
            await registry.open()
            await until(lambda: urls(restarted) == {a, b})
            assert not restarted.discovery.sources[0].cached
            await until(lambda: read_cache(str(cache)) == {registry.url: {"m": (a, b)}})
        for worker in (edge, restarted, forgetful):
            await worker.drain()
        await until(lambda: not list(tmp_path.glob("*.tmp")))  # a write may still be ending
    finally:
        await registry.close()


def test_cache_file_is_replaced_atomically_and_a_bad_one_is_ignored(tmp_path: Path):
    path = str(tmp_path / "cache.json")
    assert read_cache(path) == {}
    write_cache(path, {"http://r/libertai/models": {"m": ("http://127.0.0.1:1",)}})
    assert read_cache(path) == {"http://r/libertai/models": {"m": ("http://127.0.0.1:1",)}}
    Path(path).write_text('{"sources": [1]')
    assert read_cache(path) == {}
    Path(path).write_text('{"sources": {"x": {"m": {"servers": "nope"}}}}')
    assert read_cache(path) == {}
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]


async def test_file_sources_and_static_servers_merge(tmp_path: Path):
    fleet_file = tmp_path / "f.json"
    fleet_file.write_text(orjson.dumps({"m": {"servers": ["http://127.0.0.1:2"]}}).decode())
    view = FleetView()
    async with aiohttp.ClientSession() as session:
        d = Discovery(
            DiscoverySettings(sources=(str(fleet_file),)),
            {"m": ("http://127.0.0.1:1/",), "n": ("http://127.0.0.1:1",)},
            HostTable(), view, session,
        )  # fmt: skip
        await d.refresh()
        assert {h.url for h in view.fleet.models["m"]} == {
            "http://127.0.0.1:1", "http://127.0.0.1:2"
        }  # fmt: skip
        assert view.fleet.models["n"][0] is view.fleet.models["m"][0]  # one Host per server
        fleet_file.write_text("not json")
        await d.refresh()
        assert len(view.fleet.models["m"]) == 2 and d.outcomes == {
            "ok": 1, "not_modified": 0, "error": 1
        }  # fmt: skip
    assert "models=1" in repr(d.sources[0]) and isinstance(d.sources[0], Source)


def _certificates(tmp: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for 127.0.0.1 it signed (openssl, EC keys: fast)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca, ca_key = tmp / "ca.pem", tmp / "ca.key"
    cert, key, csr = tmp / "srv.pem", tmp / "srv.key", tmp / "srv.csr"
    ext = tmp / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run = [
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=test-ca"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "1", "-extfile", ext],
    ]  # fmt: skip
    for args in run:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
    return ca, cert, key


async def test_https_upstreams_are_verified_and_a_ca_bundle_is_trusted(start_edge, tmp_path: Path):
    from edge.dev.mock import MockOptions, build_app

    ca, cert, key = _certificates(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner = web.AppRunner(build_app(MockOptions(models=("m",), name="TLS", tokens=2)))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    url = f"https://127.0.0.1:{port}"
    try:
        strict = await start_edge({"m": [url]}, health__enabled=False)
        trusting = await start_edge(
            {"m": [url]}, upstream__ca_bundle=str(ca), health__enabled=False
        )
        async with aiohttp.ClientSession() as client:
            async with client.post(f"{strict.url}/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 503
                assert "TLS certificate not trusted" in (await resp.json())["detail"]
            assert await chat(client, trusting.url) == "TLS"
        assert trusting.view.fleet.models["m"][0].state == UP
    finally:
        await runner.cleanup()


async def test_an_edge_restarted_while_its_registry_is_down_routes_from_the_auto_cache(
    procs: Procs, start_mock, cache_home: Path
):
    """`edge serve` with no config at all: killed, registry gone, started again: it routes."""
    a = await start_mock(models=("m",), name="A")
    registry = Registry()
    registry.serve({"m": [a]})
    await registry.open()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        # In a thread: the edge reads the registry (served by this loop) before it listens.
        first = await asyncio.to_thread(procs.edge, port, "--models", registry.url)
        files = cache_home / "edge"
        await until(lambda: len(list(files.glob("discovery-*.json"))) == 1)
        async with aiohttp.ClientSession() as client:
            assert await chat(client, base) == "A"
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, 10)
            await registry.close()
            await asyncio.to_thread(procs.edge, port, "--models", registry.url)
            assert await chat(client, base) == "A"
        assert stat.S_IMODE(files.stat().st_mode) == 0o700
        assert [p.name for p in files.iterdir()] == [cache_path("auto", [registry.url], {
            "XDG_CACHE_HOME": str(cache_home)
        }).rsplit("/", 1)[1]]  # fmt: skip
    finally:
        await registry.close()


def _discovery(sources: list[str], **settings: Any) -> Discovery:
    d = DiscoverySettings(sources=tuple(sources), **settings)
    return Discovery(d, {}, HostTable(), FleetView(), session=None)  # type: ignore[arg-type]


def _fleet(path: Path, *urls: str) -> str:
    path.write_bytes(orjson.dumps({"m": {"servers": list(urls)}}))
    return str(path)


@pytest.mark.parametrize(
    ("env", "where"),
    [
        ({"CACHE_DIRECTORY": "{t}/cache:{t}/other"}, "{t}/cache"),
        ({"STATE_DIRECTORY": "{t}/state"}, "{t}/state"),
        ({"CACHE_DIRECTORY": "{t}/c", "STATE_DIRECTORY": "{t}/s"}, "{t}/c"),
        ({"XDG_CACHE_HOME": "{t}/xdg"}, "{t}/xdg/edge"),
        ({"XDG_CACHE_HOME": "relative/ignored", "HOME": "{t}/home"}, "{t}/home/.cache/edge"),
        ({"HOME": "{t}/home"}, "{t}/home/.cache/edge"),
        ({"HOME": "relative"}, ""),  # nowhere to put it: no file (and one warning)
    ],
)
async def test_the_auto_cache_file_lands_where_the_environment_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    env: dict[str, str], where: str,
):  # fmt: skip
    for name in ("XDG_CACHE_HOME", "CACHE_DIRECTORY", "STATE_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(t=tmp_path))
    source = _fleet(tmp_path / "fleet.json", "http://127.0.0.1:1")
    d = _discovery([source])
    await d.refresh()
    if not where:
        assert d.cache_file == "" and "no HOME, XDG_CACHE_HOME" in caplog.text
        assert not list(tmp_path.glob("**/discovery-*.json")) and not Path("relative").exists()
        return
    directory = Path(where.format(t=tmp_path))
    written = list(directory.glob("discovery-*.json"))
    assert [str(p) for p in written] == [d.cache_file]
    assert read_cache(d.cache_file) == {source: {"m": ("http://127.0.0.1:1",)}}
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert not Path("auto").exists()  # the old reading of "auto": a file in the working dir


async def test_each_set_of_sources_has_its_own_file_and_static_servers_none(
    tmp_path: Path, cache_home: Path
):
    one = _fleet(tmp_path / "one.json", "http://127.0.0.1:1")
    two = _fleet(tmp_path / "two.json", "http://127.0.0.1:2")
    first, both, swapped = _discovery([one]), _discovery([one, two]), _discovery([two, one, two])
    for d in (first, both, swapped):
        await d.refresh()
    assert both.cache_file == swapped.cache_file != first.cache_file
    assert read_cache(first.cache_file) == {one: {"m": ("http://127.0.0.1:1",)}}
    assert set(read_cache(both.cache_file)) == {one, two}
    assert len(list((cache_home / "edge").iterdir())) == 2

    # A restart of the one-source edge with that file gone from under it: nothing to read back.
    Path(tmp_path / "one.json").unlink()
    restarted = _discovery([one])
    await restarted.refresh()
    assert {h.url for h in restarted.view.fleet.models["m"]} == {"http://127.0.0.1:1"}
    assert restarted.sources[0].cached

    # SIGHUP to another set of sources: the other file is read, then written.
    restarted.reconfigure(DiscoverySettings(sources=(two, one)), {})
    await restarted.refresh()
    assert restarted.cache_file == both.cache_file
    assert {h.url for h in restarted.view.fleet.models["m"]} == {
        "http://127.0.0.1:1", "http://127.0.0.1:2"
    }  # fmt: skip

    static = _discovery([])
    static.static = {"m": ("http://127.0.0.1:3",)}
    await static.refresh()
    assert static.cache_file == "" and len(list((cache_home / "edge").iterdir())) == 2


async def test_an_unwritable_cache_is_one_warning_and_serving_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # a file where the directory should be: unwritable even for root
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    fleet = tmp_path / "fleet.json"
    d = _discovery([_fleet(fleet, "http://127.0.0.1:1")])
    caplog.set_level(logging.WARNING, "edge.discovery")
    for port in range(1, 6):  # a new view each time, so each refresh tries to write
        _fleet(fleet, f"http://127.0.0.1:{port}")
        await d.refresh()
        assert [h.url for h in d.view.fleet.models["m"]] == [f"http://127.0.0.1:{port}"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "cannot write the cache file" in warnings[0]
    assert "CacheDirectory=" in warnings[0]
    assert not list(tmp_path.glob("**/*.tmp"))
