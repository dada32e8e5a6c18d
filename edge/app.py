"""Composition root: builds every object of a worker, serves, reloads and drains.

`run()` is the process entry. One worker serves in this process; N workers are N spawned
processes, each with its own SO_REUSEPORT listening socket on the same port, so the kernel
spreads connections across them and a slow worker never holds an accept lock.

Shutdown order (as uvicorn does it): mark draining (/ready answers 503), close the listening
socket, let in-flight requests finish within the drain timeout, cancel what is left, then close
the upstream session.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
from dataclasses import replace
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

import uvloop

from edge import config as config_mod
from edge.access.auth import build_gate
from edge.config import Config, ServerSettings
from edge.http.server import Limits, Server
from edge.observe import tracing
from edge.observe.accesslog import AccessLog
from edge.observe.metrics import Metrics
from edge.observe.metricshare import remove_shared
from edge.proxy.connections import make_pool, make_session
from edge.proxy.exchange import Proxy
from edge.proxy.forward import Forwarder
from edge.proxy.handler import EdgeHandler, Lifecycle
from edge.proxy.queueing import Queueing
from edge.routing.attempt import Attempts
from edge.routing.balance import Balancer
from edge.routing.discovery import Discovery
from edge.routing.engines import Scraper
from edge.routing.fleet import FleetView, HostTable
from edge.routing.health import Health, Prober
from edge.routing.speaks import Speaks
from edge.routing.stats import SharedLoad, table_path

log = logging.getLogger("edge.app")


class Worker:
    """Every object one worker needs, built once and passed in."""

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.life = Lifecycle()
        self.view = FleetView()
        self.table = HostTable()
        self.session = make_session(config.upstream)
        self.pool = make_pool(config.upstream)  # proxied traffic only
        self.metrics = Metrics(lambda: self.view.fleet, config.metrics)
        self.access = AccessLog(config.log)
        self.discovery = Discovery(
            config.discovery, config.static, self.table, self.view, self.session,
            on_result=self.metrics.discovery_refreshed,
        )  # fmt: skip
        self.health = Health(config.health, config.outlier, on_eject=self.metrics.ejected)
        self.prober = Prober(config.health, self.health, self.view, self.session)
        self.balancer = Balancer(config.routing)
        # Every attempt's end is read once, into the host, health, statistics and metrics.
        self.attempts = Attempts(self.health, listener=self.metrics.attempted)
        self.speaks = Speaks(config.dialects, config.routing.dialect_memory_s)
        self.forwarder = Forwarder(
            self.pool, self.balancer, self.attempts, self.metrics, config.upstream, self.speaks
        )
        # Routing's helpers: engines' own /metrics (if configured), in-flight shared by workers.
        self.scraper = Scraper(config.routing, self.view, self.session)
        self.shared: SharedLoad | None = None
        if config.admission.enabled:  # capacity per host, the queue at the edge
            self._admission(config)
        self.gate = build_gate(config.auth, self.metrics.registry)  # None: passthrough
        if self.gate is not None and self.gate.upstream:
            self.forwarder.credentials = self.gate.upstream.for_host
        self.proxy = Proxy(
            self.view, self.forwarder, self.metrics, config.server, self.gate, self.access
        )
        # [tracing]: this worker's span exporter (its own batch thread); None when off.
        self.tracing = tracing.build(config.tracing)
        self.proxy.tracer = self.tracing
        self.handler = EdgeHandler(self.proxy, self.life)
        self.web = Server(self.handler, limits(config.server))
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def _admission(self, config: Config) -> None:
        """[admission]: the queue waits on attempts' ends and learns from engines' readings."""
        queueing = self.forwarder.queueing = Queueing(config.admission, lambda: self.view.fleet)
        self.attempts.released = queueing.released
        if config.admission.engine_metrics:
            self.scraper.on_reading = queueing.engine
        self.metrics.registry.register(queueing)

    async def start(self, sock: socket.socket) -> None:
        await self.discovery.refresh()
        if self.gate is not None:
            await self.gate.start()  # keys loaded before the first request is accepted
        if self.config.server.tcp_keepalive:
            keepalive(sock)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self.web, sock=sock, backlog=2048)
        self._tasks.append(asyncio.create_task(self.discovery.run(), name="discovery"))
        self._tasks.append(asyncio.create_task(self.prober.run(), name="health"))
        self._tasks.append(asyncio.create_task(self.access.run(), name="access-log"))
        if self.config.metrics.shared_dir:
            self._tasks.append(asyncio.create_task(self.metrics.share_forever(), name="metrics"))
        if self.config.routing.scrape:
            self._tasks.append(asyncio.create_task(self.scraper.run(), name="engines"))
        if self.config.server.workers > 1:
            port = sock.getsockname()[1]
            self.shared = SharedLoad.for_workers(port, self.config.server.workers)
        if self.shared is not None:
            hosts = lambda: (h for hs in self.view.fleet.models.values() for h in hs)  # noqa: E731
            self._tasks.append(asyncio.create_task(self.shared.run(hosts), name="shared-load"))
            if self.forwarder.queueing is not None:  # [admission]: capacity on live counts
                self.attempts.shared = self.forwarder.queueing.capacity.shared = self.shared

    async def reload(self) -> None:
        """SIGHUP: re-read the config file and every source, reopen the access log;
        connections are untouched."""
        try:
            fresh = config_mod.load(self.config_path) if self.config_path else self.config
        except config_mod.ConfigError as exc:
            log.error("reload refused: %s", exc)
            return
        fresh = replace(fresh, discovery=replace(fresh.discovery, sources=self._sources(fresh)))
        self.discovery.reconfigure(fresh.discovery, fresh.static)
        self.balancer.reconfigure(fresh.routing)
        self.speaks.reconfigure(fresh.dialects, fresh.routing.dialect_memory_s)
        self.scraper.settings = fresh.routing
        self.forwarder.settings = fresh.upstream
        if self.forwarder.queueing is not None:  # turned on or off only by a restart
            self.forwarder.queueing.configure(fresh.admission)
        self.health.reconfigure(fresh.health, fresh.outlier)
        self.prober.reconfigure(fresh.health)
        try:
            self.access.reopen(fresh.log)  # also what logrotate's postrotate SIGHUP is for
        except OSError as exc:
            log.error("access log not reopened (%s); still writing to the old one", exc)
        await self.discovery.refresh()
        log.info("reloaded: %r", self.view.fleet)

    def _sources(self, fresh: Config) -> tuple[str, ...]:
        # Sources given as flags win over the file, on reload as at start.
        return self.config.discovery.sources or fresh.discovery.sources

    async def drain(self) -> None:
        self.life.draining = True
        if self._server is not None:
            self._server.close()
        await self._finish_requests(self.config.server.drain_timeout_s)
        if self.gate is not None:
            await self.gate.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.shared is not None:
            self.attempts.shared = None  # a straggler's end must not write to a closed map
            if self.forwarder.queueing is not None:
                self.forwarder.queueing.capacity.shared = None
            self.shared.close()
        self.metrics.share()  # this worker's last counts, for the sum the others report
        self.access.close()
        if self.tracing is not None:  # the last spans exported (bounded by the export timeout)
            await asyncio.to_thread(self.tracing.close)
        await self.pool.close()
        await self.session.close()

    async def _finish_requests(self, limit_s: float) -> None:
        """Requests in flight finish until the drain deadline; then the rest are cut (their
        handlers are cancelled, so each is still observed, as a 499)."""
        await self.web.shutdown(limit_s)

    def __repr__(self) -> str:
        return f"<Worker {self.view!r} draining={self.life.draining}>"


def limits(s: ServerSettings) -> Limits:
    """The front door's bounds, from [server] (edge/http/server.py does not read the config)."""
    return Limits(
        max_body=s.max_body_bytes, max_head_bytes=s.max_head_bytes,
        max_header_fields=s.max_header_fields, header_timeout_s=s.header_timeout_s,
        body_grace_s=s.body_grace_s, body_min_rate=s.body_min_rate,
        keepalive_timeout_s=s.keepalive_timeout_s, max_connections=s.max_connections,
        linger_s=s.linger_s, max_discard_bytes=s.max_discard_bytes,
    )  # fmt: skip


# TCP keepalive on client sockets: the first probe after a minute of silence, then one every 10
# s; six unanswered and the kernel ends the connection (Linux's own default waits two hours).
_KEEPALIVE = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6))


def keepalive(sock: socket.socket) -> None:
    """SO_KEEPALIVE (and its timing) on the listening socket: every accepted socket inherits
    them (Linux, the BSDs), so no client connection costs a system call for it. A client that
    vanished (a laptop closed, a NAT entry dropped) is found while its handler still runs."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in _KEEPALIVE:
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


async def serve_worker(config: Config, config_path: str | None, sock: socket.socket) -> int:
    worker = Worker(config, config_path)
    await worker.start(sock)
    # What startup built (modules, config, the fleet) lives as long as the worker: kept out of
    # every collection, so a full one walks only what requests made (no 10 ms pause at p99).
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = asyncio.create_task(worker.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    await stop.wait()
    log.info("draining (up to %.0f s)", config.server.drain_timeout_s)
    await worker.drain()
    return 0


def _worker_main(config: Config, config_path: str | None, port: int) -> None:
    configure_logging()
    sock = bind(config.server.host, port, reuse_port=True)
    sys.exit(uvloop.run(serve_worker(config, config_path, sock)))


def run(config: Config, config_path: str | None = None) -> int:
    s = config.server
    if s.workers == 1:
        sock = bind(s.host, s.port, reuse_port=False)
        _announce(s.host, sock.getsockname()[1], 1)
        return uvloop.run(serve_worker(config, config_path, sock))
    return supervise(config, config_path)


def supervise(config: Config, config_path: str | None) -> int:
    """Run `workers` processes on one port; restart one that dies; forward TERM/INT/HUP."""
    s = config.server
    own_dir = config.metrics.enabled and not config.metrics.shared_dir
    if own_dir:  # where workers share their counts, so that /metrics on any reports the sum
        shared = tempfile.mkdtemp(prefix="edge-metrics-")
        config = replace(config, metrics=replace(config.metrics, shared_dir=shared))
    # Holding a bound (not listening) socket reserves the port, so port 0 resolves once.
    holder = bind(s.host, s.port, reuse_port=True)
    port = holder.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def spawn() -> BaseProcess:
        proc = ctx.Process(target=_worker_main, args=(config, config_path, port), daemon=False)
        proc.start()
        return proc

    procs = [spawn() for _ in range(s.workers)]

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = stopping or signum != signal.SIGHUP
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    _announce(s.host, port, s.workers)
    code = 0
    while procs:
        wait([p.sentinel for p in procs])
        for i, proc in enumerate(list(procs)):
            if proc.is_alive():
                continue
            code = max(code, proc.exitcode or 0)
            procs.remove(proc)
            if not stopping:
                log.error("worker %s exited with %s; restarting it", proc.pid, proc.exitcode)
                procs.insert(i, spawn())
    holder.close()
    # The last worker out removes the in-flight table, but a worker stopped before it could
    # (TERM during its startup) leaves it; every worker is gone now, so the file can go.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(table_path(os.getpid(), port))
    if own_dir:
        remove_shared(config.metrics.shared_dir)
    return code


def _announce(host: str, port: int, workers: int) -> None:
    shown = f"[{host}]" if ":" in host else host
    print(f"edge serving on http://{shown}:{port} ({workers} worker(s))", flush=True)


def configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr
    )
