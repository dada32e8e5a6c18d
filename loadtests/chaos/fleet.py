"""What a chaos run starts and breaks: mock hosts (`edge mock` processes, so that they can be
killed and stopped), the registry the edge reads (in this process, so that it can flap), Redis,
and the edge itself (`edge serve --workers N`), with what /proc says about its workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from loadtests.bench.quota import workers as worker_pids
from tests.procs import REPO, free_port

PAGE = os.sysconf("SC_PAGE_SIZE")


class Process:
    """A subprocess of `python -m edge ...` in its own session, its output in `log`."""

    def __init__(self, name: str, args: list[str], log: Path, env: Mapping[str, str]) -> None:
        self.name, self.args, self.log, self.env = name, args, log, env
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} is not running"
        return self.popen.pid

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "edge", *self.args], stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **self.env, "PYTHONPATH": str(REPO)}, start_new_session=True,
            )  # fmt: skip

    async def ready(self, url: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as session:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                        if resp.status == 200:
                            return
                if self.popen is not None and self.popen.poll() is not None:
                    raise RuntimeError(f"{self.name} exited ({self.popen.returncode}): {self.log}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready at {url}: {self.log}")
                await asyncio.sleep(0.05)

    def signal(self, signum: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.kill(self.popen.pid, signum)

    async def wait(self, timeout_s: float) -> int | None:
        """The exit status, or None if it is still running after `timeout_s`."""
        assert self.popen is not None
        try:
            return await asyncio.to_thread(self.popen.wait, timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL to the whole group (a stopped process dies too), and reap it. Once reaped,
        its pid may be another's: only a process not reaped yet is signalled."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
        self.popen = None


class Mock(Process):
    """One model host; `fault()` sets its test control (edge/dev/mock.py, POST /_mock/fault)."""

    def __init__(self, name: str, models: tuple[str, ...], extra: tuple[str, ...], logs: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.models = models
        args = ["mock", "--port", str(self.port), "--name", name, *extra]
        super().__init__(name, args + [a for m in models for a in ("--model", m)], logs, {})

    async def restart(self) -> None:
        self.kill()
        self.start()
        await self.ready(f"{self.url}/health")

    async def fault(self, session: aiohttp.ClientSession, **fields: Any) -> None:
        async with session.post(f"{self.url}/_mock/fault", json=fields) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{self.name}: fault {fields} refused: {await resp.text()}")


class Registry:
    """`GET /libertai/models` for the edge: every host, or a flap (`mode`): one host left out,
    503, or a list with no server at all (which discovery refuses, keeping its last view)."""

    def __init__(self, hosts: list[Mock]) -> None:
        self.hosts = hosts
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/libertai/models"
        self.mode = "ok"  # ok | drop:<host name> | down | empty
        self.hits = 0
        self._runner: web.AppRunner | None = None

    def listing(self) -> dict[str, dict[str, list[str]]]:
        dropped = self.mode.removeprefix("drop:") if self.mode.startswith("drop:") else None
        models: dict[str, dict[str, list[str]]] = {}
        for host in self.hosts:
            for model in host.models:
                servers = models.setdefault(model, {"servers": []})["servers"]
                if host.name != dropped and self.mode != "empty":
                    servers.append(host.url)
        return models

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.mode == "down":
            return web.Response(status=503, text="registry down (chaos)")
        return web.Response(body=orjson.dumps(self.listing()), content_type="application/json")

    async def open(self) -> None:
        app = web.Application()
        app.router.add_get("/libertai/models", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class Edge(Process):
    """`edge serve --workers N`; what its workers hold, read from /proc."""

    def __init__(self, config: Path, workers: int, logs: Path, env: Mapping[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        args = ["serve", "--config", str(config), "--port", str(self.port)]
        super().__init__("edge", args + ["--workers", str(workers)], logs, env)

    async def up(self, timeout_s: float = 60.0) -> None:
        """Every worker started and the port answering."""
        await self.ready(f"{self.url}/health", timeout_s)
        deadline = time.monotonic() + timeout_s
        while len(self.worker_pids()) < self.workers or not all(
            self.listening(pid) for pid in self.worker_pids()
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"edge workers did not all start: {self.log}")
            await asyncio.sleep(0.05)

    def worker_pids(self) -> list[int]:
        try:
            return worker_pids(self.pid)
        except OSError:
            return []

    def listening(self, pid: int) -> bool:
        """Whether the worker listens yet: it binds at once, but listens only once it is ready."""
        return not socket_inodes(pid).isdisjoint(listening_inodes(self.port))

    def sockets(self) -> int:
        return sum(sockets(pid) for pid in self.worker_pids())

    def fds(self) -> int:
        return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in self.worker_pids())

    def rss(self) -> int:
        return sum(rss_bytes(pid) for pid in self.worker_pids())


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets `pid` holds open."""
    found = set()
    with contextlib.suppress(FileNotFoundError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    found.add(target[8:-1])
    return found


def sockets(pid: int) -> int:
    return len(socket_inodes(pid))


def listening_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets in LISTEN state on `port`."""
    return {i for i, (local, _, state) in tcp_table().items() if local == port and state == "0A"}


def tcp_table() -> dict[str, tuple[int, int, str]]:
    """Socket inode -> (local port, remote port, state) of every TCP socket of the machine."""
    table = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(path).read_text().splitlines()[1:]:
                f = line.split()
                local, remote = (int(a.rsplit(":", 1)[1], 16) for a in (f[1], f[2]))
                table[f[9]] = (local, remote, f[3])
    return table


_STATES = {"06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0B": "CLOSING"}
_STATES |= {"02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2"}


def peers(pids: list[int], names: Mapping[int, str], own_port: int) -> dict[str, int]:
    """The sockets of `pids` by whom they connect to (`names`: port -> name), so that a leak
    says where it leaks: "client" (to the edge's port), "listen", "other" (UDP, unix)."""
    table = tcp_table()
    counts: dict[str, int] = {}
    for pid in pids:
        for inode in socket_inodes(pid):
            local, remote, state = table.get(inode, (0, 0, ""))
            if state == "0A":
                name = "listen"
            elif local == own_port:
                name = "client"
            else:
                name = names.get(remote, "other")
            if state in _STATES:  # not ESTABLISHED: a socket the edge has yet to close
                name += f" ({_STATES[state]})"
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0
