"""The edge's routing in the user's process: one fleet, its discovery, health, balancer, attempts
and retry budget, the same objects `edge serve` builds per worker (edge/app.py), from the same
Config.

Theory of operation: discovery (and probes, when on) need I/O on a timer; deciding does not.
So discovery and probes run on one daemon thread with an asyncio loop of its own (`Background`,
started by the first request, stopped by `close`), and each request's routing runs in the
caller's own thread or event loop, synchronously, under one `threading.Lock`: `Balancer.decide`,
`Plan.next`, `Attempts.start` and an attempt's end never await, so the lock is held for
microseconds and never across I/O. The background thread takes the same lock only to swap in a
new fleet (`Discovery(guard=)`) and to move a host on a probe result (`Prober(guard=)`).

Why this shape rather than a loop that routes too (each request handed to it and back): measured
on this project's machine, one hand-off to a loop thread and back (run_coroutine_threadsafe,
then result()) costs ~30 us of CPU and wall time, and a request touches routing about five times
(decide, next, start, answered, finish); an uncontended lock costs 0.13 us. The async transport
keeps its awaits on the caller's own loop, too (loadtests/direct.py measures the whole request).

A `Call` is one request: its dialect, model and decision (pin, affinity, policy), then the
hosts its `Plan` names, at most `upstream.max_attempts`, each attempt ended once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

import aiohttp
import orjson

from edge.dialects import GEMINI, OPENAI, dialect_of, is_gemini, split_workspace
from edge.direct.resume import Resumable, continuable
from edge.direct.settings import DirectSettings
from edge.errors import BadRequest, NotFound, Unavailable, Unprocessable
from edge.http.heads import retry_after_s
from edge.routing.attempt import Attempt, Attempts
from edge.routing.balance import PIN_HEADER, ROUTE_HEADER, Balancer, Decision
from edge.routing.discovery import Discovery
from edge.routing.fleet import FleetView, Host, HostTable
from edge.routing.health import Health, Prober, RetryBudget
from edge.routing.plan import Plan
from edge.routing.stats import first_byte_deadline

log = logging.getLogger("edge.direct")

# The edge's own request fields: read here, never sent to a host.
EDGE_HEADERS: Final = frozenset({PIN_HEADER.lower(), ROUTE_HEADER.lower()})
SERVED_HEADER: Final = "X-Edge-Server"  # on each response: the host that answered (as the edge)
_GEMINI_PREFIXES: Final = ("/v1beta/models/", "/v1/models/")


class Background(threading.Thread):
    """Discovery's refreshes and the optional probes, on a loop of their own."""

    def __init__(self, router: Router) -> None:
        super().__init__(name="edge-direct", daemon=True)
        self.router = router
        self.ready = threading.Event()  # the first view is in (or failed: the fleet is empty)
        # Made here, not in the thread: a `stop` before the thread runs is queued, not lost.
        self._loop = asyncio.new_event_loop()
        self._halt = asyncio.Event()

    def run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        r, config = self.router, self.router.config
        timeout = aiohttp.ClientTimeout(total=config.discovery.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            discovery = Discovery(
                config.discovery, config.static, r.table, r.view, session, guard=r.lock
            )
            prober = Prober(config.health, r.health, r.view, session, guard=r.lock)
            try:
                await discovery.refresh()
            finally:
                self.ready.set()
            tasks = [asyncio.create_task(discovery.run())]
            if config.health.enabled:
                tasks.append(asyncio.create_task(prober.run()))
            await self._halt.wait()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed already
            self._loop.call_soon_threadsafe(self._halt.set)


class Router:
    """One process's routing state, shared by every request of one transport."""

    def __init__(self, settings: DirectSettings) -> None:
        self.settings = settings
        config = self.config = settings.config
        self.lock = threading.Lock()
        self.view = FleetView()
        self.table = HostTable()
        self.health = Health(config.health, config.outlier)
        self.balancer = Balancer(config.routing)
        self.attempts = Attempts(self.health)
        u = config.upstream
        self.budget = RetryBudget(u.retry_ratio, u.retry_window_s, u.retry_min_per_s)
        self._background: Background | None = None
        self._start_lock = threading.Lock()
        self.closed = False

    # --- the fleet ----------------------------------------------------------------------

    def ready_now(self) -> bool:
        """The first view is in (never waits)."""
        background = self._background
        return background is not None and background.ready.is_set()

    def ready(self) -> bool:
        """Start discovery on first use; wait (bounded) for its first view. False: none yet."""
        background = self._background
        if background is None:
            with self._start_lock:
                if self.closed:
                    raise RuntimeError("edge.direct: the transport is closed")
                if self._background is None:
                    self._background = Background(self)
                    self._background.start()
                background = self._background
        if background.ready.is_set():
            return True
        return background.ready.wait(self.settings.first_view_timeout_s)

    def close(self) -> None:
        with self._start_lock:
            self.closed = True
            background, self._background = self._background, None
        if background is not None:
            background.stop()
            background.join(timeout=5)

    def hosts(self, model: str) -> tuple[Host, ...]:
        """The model's hosts, restricted to its pins (`pins` setting); NotFound when none."""
        fleet = self.view.fleet
        found = fleet.hosts(model)
        if found is None:
            if not fleet.models:  # no source answered yet (and no cache file had a view)
                raise Unavailable("No server is known yet: the sources have not answered.")
            raise _unknown_model(model)
        pins = self.settings.pins.get(model)
        if pins is None:
            return found
        pinned = tuple(h for h in found if h.url in pins)
        if not pinned:
            # Never a host discovery does not list, even one the user named.
            raise Unavailable(
                f"No server pinned for model '{model[:200]}' is listed by discovery now."
            )
        return pinned

    # --- one request ----------------------------------------------------------------------

    def call(self, path: str, headers: Mapping[str, str], body: bytes) -> Call:
        """Classify a request and decide for it. Raises EdgeError (its dialect: `dialect_of`)."""
        dialect, model, doc, target = classify(path, body)
        if not self.ready():
            raise Unavailable("No view of the fleet yet: discovery has not answered.")
        with self.lock:
            hosts = self.hosts(model)
            decision = self.balancer.decide(model, hosts, doc, headers)
            plan = Plan(model, hosts, decision, self.balancer, self.budget)
        return Call(self, dialect, model, target, plan, doc)

    def order(
        self, model: str, doc: Mapping[str, Any], headers: Mapping[str, str]
    ) -> tuple[Decision, list[Host]]:
        """The decision for a request and the hosts in the order it would try them, were each
        to fail (`edge route`): the decision's target first, then by policy; no retry budget
        applies and nothing is sent."""
        if not self.ready():
            raise Unavailable("No view of the fleet yet: discovery has not answered.")
        with self.lock:
            hosts = self.hosts(model)
            decision = self.balancer.decide(model, hosts, doc, headers)
            plan = Plan(model, hosts, decision, self.balancer, RetryBudget(0.0, 10.0, 1e9))
            found: list[Host] = []
            while (host := plan.next()) is not None:
                found.append(host)
            return decision, found

    def __repr__(self) -> str:
        return f"<Router {self.view.fleet!r} {self.balancer!r} {self.budget!r}>"


class Call:
    """One request's routing: its plan, attempts left, the reasons of those that failed."""

    __slots__ = ("router", "dialect", "model", "target", "plan", "doc", "left")

    def __init__(
        self, router: Router, dialect: str, model: str, target: str, plan: Plan,
        doc: Mapping[str, Any],
    ) -> None:  # fmt: skip
        self.router = router
        self.dialect = dialect
        self.model = model
        self.target = target  # the path and query the host gets (a workspace prefix removed)
        self.plan = plan
        self.doc = doc
        self.left = router.config.upstream.max_attempts

    def resumable(self, headers: Mapping[str, str]) -> Resumable | None:
        """What continuing this request's 200 stream takes, when it can be continued
        (edge/direct/resume.py); None when not, or [routing] continuation is off for it."""
        routing = self.router.config.routing
        if self.dialect != OPENAI or not routing.continuation or not routing.max_continuations:
            return None
        rules = routing.models.get(self.model)
        if rules is not None and not rules.continuation:
            return None
        decision = self.plan.decision
        pinned = decision is not None and decision.pinned
        chat = continuable(self.target, self.doc, len(self.plan.hosts), pinned, headers)
        if chat is None:
            return None
        keep, limit = routing.continuation_keep_bytes, routing.max_continuations
        return Resumable(self.doc, chat, keep, limit)

    def again(self, tried: Sequence[Host]) -> Call:
        """A continuation of this request: by policy (no affinity: its home broke), never on
        a host in `tried`; its first attempt is a retry, paid from the budget."""
        router = self.router
        with router.lock:
            plan = Plan(self.model, self.plan.hosts, None, router.balancer, router.budget)
            plan.tried.extend(tried)
        return Call(router, self.dialect, self.model, self.target, plan, {})

    @property
    def decision(self) -> Decision | None:
        return self.plan.decision

    def next(self) -> Host | None:
        """The host of the next attempt; None: none now (see `wait`) or none left."""
        if self.left <= 0:
            return None
        with self.router.lock:
            host = self.plan.next()
        if host is not None:
            self.left -= 1
        return host

    def wait(self) -> float | None:
        """After `next` gave None: seconds to wait for a held host (Retry-After), or None."""
        if self.left <= 0:
            return None
        with self.router.lock:
            return self.plan.wait(time.monotonic(), self.router.config.upstream.retry_after_wait_s)

    def hedge_delay(self, host: Host) -> float | None:
        """How long to wait for `host`'s first byte before a hedge; None: no hedge (off for the
        model, a pin, too few samples of the host yet)."""
        with self.router.lock:
            return self.router.balancer.hedge_delay(host, self.plan.hosts, self.plan.decision)

    def hedge(self) -> Host | None:
        """A second host to race the first attempt with, if the hedge budget has one now."""
        with self.router.lock:
            return self.plan.hedge()

    def start(self, host: Host) -> tuple[Attempt, float]:
        """Start an attempt on `host`: (the attempt, its first-byte deadline in seconds). The
        deadline is the host's recent form while another host could still take the request,
        else the whole first_byte_timeout_s (as edge/proxy/forward.py's `_open`)."""
        u = self.router.config.upstream
        limit = u.first_byte_timeout_s
        with self.router.lock:
            if self.left > 0 and self.plan.others_left():
                limit = first_byte_deadline(
                    host.stats, u.first_token_factor, u.first_token_floor_s, limit
                )
            return self.router.attempts.start(host, self.model), limit

    def failed(
        self, attempt: Attempt, outcome: str, reason: str, blame: bool, retry_after: str | None
    ) -> None:
        """The attempt failed before its first byte; a Retry-After holds its host."""
        now = time.monotonic()
        with self.router.lock:
            attempt.fail(outcome, now, blame)
            self.plan.failed(attempt.host, reason)
            # The edge's one reader of the field (every HTTP-date form, bounded).
            seconds = retry_after_s(retry_after, time.time()) if retry_after else None
            if seconds:
                limit = self.router.config.upstream.retry_after_max_s
                self.plan.hold(attempt.host, min(seconds, limit), now)

    def answered(self, attempt: Attempt) -> None:
        with self.router.lock:
            attempt.answered(time.monotonic())

    def finish(self, attempt: Attempt, outcome: str) -> None:
        with self.router.lock:
            attempt.finish(outcome, time.monotonic())

    def cancel(self, attempt: Attempt) -> None:
        with self.router.lock:
            attempt.cancel()

    def unavailable(self) -> Unavailable:
        with self.router.lock:
            return self.plan.unavailable()

    def __repr__(self) -> str:
        return f"<Call {self.dialect} {self.model!r} {self.plan!r} left={self.left}>"


def classify(path: str, body: bytes) -> tuple[str, str, dict[str, Any], str]:
    """(dialect, model, the body's document, the target sent to the host) of a request, from
    its path (query included) and body, as the edge's route.py reads them: the model from
    Gemini's path, else from the JSON body's `model`. Raises EdgeError."""
    plain, sep, query = path.partition("?")
    _, plain = split_workspace(plain)  # hosts get the plain /v1/... path, as from the edge
    target = plain + sep + query
    dialect = dialect_of(plain)
    doc = _document(body) if body else {}
    if dialect == GEMINI and is_gemini(plain) and plain.startswith(_GEMINI_PREFIXES):
        prefix = next(p for p in _GEMINI_PREFIXES if plain.startswith(p))
        named = plain[len(prefix) :].rpartition(":")[0]
        if not named:
            raise NotFound(f"No model in the path {plain[:200]!r}.")
        return dialect, named, doc, target
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise Unprocessable("The request body must name a 'model' (a string).", param="model")
    return dialect, model, doc, target


def _document(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(doc, dict):
        raise Unprocessable("The request body must be a JSON object.", param="model")
    return doc


def _unknown_model(model: str) -> NotFound:
    shown = model if len(model) <= 200 else model[:200] + "..."
    return NotFound(
        f"The model '{shown}' is not listed by the transport's sources.",
        param="model",
        code="model_not_found",
    )


def forward_headers(items: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The request's fields for the host: all but Host (the host's own is set) and the edge's."""
    return [(k, v) for k, v in items if k.lower() != "host" and k.lower() not in EDGE_HEADERS]
