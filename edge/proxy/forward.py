"""The upstream call: attempts on the hosts a request's plan names, until one answers with a first
body byte.

Theory of operation: an attempt is "open" once the upstream sent a non-retryable status and the
first body byte (an SSE stream's first event). Only then is anything sent to the client, so every
failure before that point (refused, reset, timeout, 5xx, 429, a host that sends headers and then
hangs during prefill) can still move to another host. After it, the status is committed and the
relay owns the outcome. Which host comes next is routing's (edge/routing/plan.py); what an
attempt's end means for the host is routing's too (edge/routing/attempt.py): this module does
the I/O and says how each attempt ended.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import aiohttp

from edge.config import ModelTimeouts, UpstreamSettings
from edge.dialects import OPENAI
from edge.errors import UpstreamFailure
from edge.http.client import (
    PoolFull,
    TimedOut,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)
from edge.http.heads import render
from edge.observe.metrics import Metrics
from edge.proxy.route import ProxyRequest
from edge.proxy.translate import TARGET, Translation
from edge.routing.attempt import (
    CONNECT_ERROR,
    HTTP_5XX,
    HTTP_429,
    MALFORMED,
    TIMEOUT,
    Attempt,
    Attempts,
)
from edge.routing.balance import Balancer, Decision
from edge.routing.fleet import Host
from edge.routing.health import RetryBudget
from edge.routing.plan import Plan
from edge.routing.speaks import Speaks


class Upstream:
    """An open attempt: the upstream response with its first body chunk already read."""

    __slots__ = ("attempt", "response", "first", "tries", "translation")

    def __init__(
        self, attempt: Attempt, response: UpstreamResponse, first: bytes,
        translation: Translation | None = None,
    ) -> None:  # fmt: skip
        self.attempt = attempt
        self.response = response
        self.first = first
        self.tries = 1  # attempts the request made, this one included (set by `open`)
        # The host does not speak the client's dialect: the answer is OpenAI's, to translate.
        self.translation = translation

    @property
    def host(self) -> Host:
        return self.attempt.host

    def __repr__(self) -> str:
        return f"<Upstream {self.attempt!r} status={self.response.status}>"


def _outcome(exc: BaseException) -> tuple[str, str, bool]:
    """(outcome, client-safe reason, blame on the host) for an upstream error."""
    if isinstance(exc, UpstreamError):
        return exc.outcome, exc.reason, exc.counts
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return CONNECT_ERROR, "connection closed before a response", True
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return CONNECT_ERROR, "TLS certificate not trusted (upstream.ca_bundle?)", True
    if isinstance(exc, aiohttp.ClientSSLError):
        return CONNECT_ERROR, "TLS handshake failed", True
    if isinstance(exc, aiohttp.ClientConnectorError):
        return CONNECT_ERROR, f"connect failed ({exc.os_error.strerror or 'error'})", True
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return TIMEOUT, "connect timed out", True
    if isinstance(exc, asyncio.TimeoutError):
        return TIMEOUT, "timed out before the first byte", True
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return MALFORMED, "malformed response", True
    return CONNECT_ERROR, "connection error", True


class _Foreign:
    """A request in another dialect than OpenAI's: its translation, made once, the first time
    an attempt goes to a host that does not speak the dialect (edge/proxy/translate.py)."""

    __slots__ = ("preq", "headers", "passthrough", "_translation", "_headers")

    def __init__(self, preq: ProxyRequest, headers: bytes, passthrough: bool) -> None:
        self.preq = preq
        self.headers = headers
        self.passthrough = passthrough  # the client's own key goes on (no keys of the edge's)
        self._translation: Translation | None = None
        self._headers = b""

    def translation(self) -> Translation:
        """Raises EdgeError (400, 501) for a request that cannot be translated."""
        if self._translation is None:
            found = self._translation = Translation(self.preq)
            query = self.preq.target.partition("?")[2]
            self._headers = found.headers(self.headers, query, self.passthrough)
            return found
        return self._translation

    def translated_headers(self) -> bytes:
        self.translation()
        return self._headers

    def __repr__(self) -> str:
        return f"<Foreign {self.preq.dialect} translated={self._translation is not None}>"


class Forwarder:
    """Runs the attempts of one worker's requests: open the host the plan names, move on when it
    fails, race a hedge when the balancer asks for one."""

    def __init__(
        self,
        pool: UpstreamPool,
        balancer: Balancer,
        attempts: Attempts,
        metrics: Metrics,
        settings: UpstreamSettings,
        speaks: Speaks | None = None,
    ) -> None:
        self.pool = pool
        # Which hosts speak the client's dialect; the others get the request translated.
        self.speaks = speaks or Speaks({}, 600.0)
        # keys/none auth modes: the key each server gets, added per attempt (edge/access/auth.py).
        # Called with the dialect the request is sent in (OpenAI's, when translated).
        self.credentials: Callable[[str, Host], list[tuple[str, str]]] | None = None
        self.balancer = balancer
        self.attempts = attempts
        self.metrics = metrics
        self.settings = settings
        s = settings
        self.budget = RetryBudget(s.retry_ratio, s.retry_window_s, s.retry_min_per_s)
        self._tuned: UpstreamSettings | None = None
        self._timeouts: dict[str, _Timeouts] = {}

    async def open(
        self,
        preq: ProxyRequest,
        hosts: Sequence[Host],
        headers: bytes,
        decision: Decision | None = None,
    ) -> Upstream:
        """The first attempt that opens; Unavailable when none does. The caller hands the
        result to `done` in a `finally` (a plain call: a context manager per request costs
        more than everything this method does on the happy path)."""
        if self.settings is not self._tuned:
            self._tune()
        plan = Plan(preq.model, hosts, decision, self.balancer, self.budget)
        foreign = None
        if preq.dialect != OPENAI:
            foreign = _Foreign(preq, headers, passthrough=self.credentials is None)
        for _ in range(self.settings.max_attempts):
            host = plan.next()
            if host is None:
                if plan.denied:
                    self.metrics.retry_denied(preq.model)
                break
            hedge = None if decision is None else self.balancer.hedge_delay(host, hosts, decision)
            try:
                if hedge is None:
                    up = await self._open(host, preq, headers, foreign)
                else:
                    up = await self._race(host, preq, headers, foreign, plan, hedge)
            except UpstreamFailure as failure:
                # A full pool sent nothing: moving on costs no retry budget.
                plan.failed(host, failure.reason, isinstance(failure.__cause__, PoolFull))
                continue
            up.tries = len(plan.tried)
            return up
        raise plan.unavailable()

    @staticmethod
    def done(up: Upstream) -> None:
        """The exchange is over: the connection goes back to the pool (or closes); an attempt
        the relay did not finish (the client left) ends without a verdict."""
        up.response.close()
        up.attempt.cancel()

    async def _race(
        self, host: Host, preq: ProxyRequest, headers: bytes, foreign: _Foreign | None,
        plan: Plan, delay: float,
    ) -> Upstream:  # fmt: skip
        """Open `host`, hedged (balance.hedge_delay: off by default): when no first byte came
        within `delay` (the host's recent p95), open a second host too: the first to send a
        byte wins and the other is cancelled at once. A failure of `host` itself is raised; a
        failed hedge only adds its reason to the primary's."""
        racing = {asyncio.create_task(self._open(host, preq, headers, foreign)): host}
        winner: Upstream | None = None
        try:
            done, _ = await asyncio.wait(racing, timeout=delay)
            second = None if done else plan.hedge()
            if second is not None:
                opening = self._open(second, preq, headers, foreign)
                racing[asyncio.create_task(opening)] = second
            winner = await _first_open(racing, host)
            return winner
        finally:
            for task in racing:
                if not task.done():
                    task.cancel()  # its _open ends its attempt, cancelled
                elif not task.cancelled() and not task.exception() and task.result() is not winner:
                    self.done(task.result())  # opened too, but lost by a hair
                task.add_done_callback(_retrieve)

    async def _open(
        self, host: Host, preq: ProxyRequest, headers: bytes, foreign: _Foreign | None
    ) -> Upstream:
        """One attempt on `host`, up to its first body byte; UpstreamFailure when it fails."""
        t = self._timeouts.get(preq.model) or self._timeouts[""]
        translation: Translation | None = None
        target, body = preq.target, preq.body
        if foreign is not None and not self.speaks.native(host.url, preq.dialect):
            translation = foreign.translation()
            target, body, headers = TARGET, translation.body, foreign.translated_headers()
        keys = self._keys(OPENAI if translation is not None else preq.dialect, host)
        attempt = self.attempts.start(host, preq.model)
        response: UpstreamResponse | None = None
        try:
            response = await self.pool.post(
                host.url, target, headers + keys, body, t.first_byte_s, t.connect_s
            )
            if foreign is not None and translation is None and response.status in (404, 405):
                if self.speaks.learnable(host.url):
                    # No such path: the host does not speak the dialect. The same attempt goes
                    # on translated, and the next ones go translated at once.
                    self.speaks.refused(host.url, preq.dialect)
                    response.close()
                    response = None
                    translation = foreign.translation()
                    keys = self._keys(OPENAI, host)
                    response = await self.pool.post(
                        host.url, TARGET, foreign.translated_headers() + keys, translation.body,
                        t.first_byte_s, t.connect_s,
                    )  # fmt: skip
            if t.total_s:
                response.set_deadline(max(0.0, t.total_s - (time.monotonic() - attempt.started)))
            status = response.status
            if status >= 500 or status == 429:
                # 502/503/504 say the host is broken; 429 (busy) and 500 (maybe this request)
                # move the request on without counting against the host.
                outcome = HTTP_429 if status == 429 else HTTP_5XX
                attempt.fail(outcome, time.monotonic(), blame=status in (502, 503, 504))
                raise UpstreamFailure(f"HTTP {status}", counts=attempt.blame)
            if response.buffered:
                first = response.take()  # the body came with the head: no wait
            else:
                response.read_timeout = t.first_byte_s
                try:
                    first = await response.readany()
                except TimedOut:
                    raise TimedOut("timed out before the first byte") from None
            # Past the first byte, a stall is judged by the idle timeout instead.
            response.read_timeout = t.idle_s
        except UpstreamFailure:
            if response is not None:
                response.close()
            raise
        except (UpstreamError, TimeoutError, OSError) as exc:
            if response is not None:
                response.close()
            outcome, reason, blame = _outcome(exc)
            attempt.fail(outcome, time.monotonic(), blame)
            failed = UpstreamFailure(reason, counts=blame)
            if isinstance(exc, PoolFull):
                # Read by `open` (a move off a full pool is no retry). Set by hand as well:
                # mypyc compiles `raise ... from` without its cause.
                failed.__cause__ = exc
                raise failed from exc
            raise failed from None
        except BaseException:
            if response is not None:
                response.close()
            attempt.cancel()  # cancelled (client gone, hedge lost): no verdict
            raise
        attempt.answered(time.monotonic())
        return Upstream(attempt, response, first, translation)

    def _keys(self, dialect: str, host: Host) -> bytes:
        """keys/none auth modes: `host`'s own key, in the field of the dialect sent."""
        return b"" if self.credentials is None else render(self.credentials(dialect, host))

    @property
    def stale_retries(self) -> int:
        """Sends on a pooled connection the host had closed, redone on a fresh one."""
        return self.pool.stale_retries

    def _tune(self) -> None:
        """Per-model timeouts and the budget follow `settings`, which SIGHUP replaces whole."""
        s = self.settings
        if s is self._tuned:
            return
        self.budget.configure(s.retry_ratio, s.retry_window_s, s.retry_min_per_s)
        self.pool.pool_timeout_s = s.pool_timeout_s
        self.pool.max_head_bytes = s.max_head_bytes
        self._timeouts = {"": _Timeouts(s, ModelTimeouts())}
        self._timeouts.update((m, _Timeouts(s, t)) for m, t in s.models.items())
        self._tuned = s

    def __repr__(self) -> str:
        return (
            f"<Forwarder attempts<={self.settings.max_attempts} stale_retries={self.stale_retries}"
            f" {self.budget!r} {self.balancer!r}>"
        )


async def _first_open(racing: dict[asyncio.Task[Upstream], Host], primary: Host) -> Upstream:
    """The first of racing attempts to open. When all fail, the primary's failure is raised,
    naming the hedge's too."""
    pending = set(racing)
    reasons: dict[Host, str] = {}
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            failure = task.exception()
            if failure is None:
                return task.result()
            if not isinstance(failure, UpstreamFailure):
                raise failure
            reasons[racing[task]] = failure.reason
    hedges = "".join(f"; hedge {h.url}: {r}" for h, r in reasons.items() if h is not primary)
    raise UpstreamFailure(reasons.get(primary, "no answer") + hedges)


def _retrieve(task: asyncio.Task[Upstream]) -> None:
    """Mark a racing attempt's outcome as seen (a loser's failure is not worth a log line)."""
    if not task.cancelled():
        task.exception()


class _Timeouts:
    __slots__ = ("connect_s", "first_byte_s", "idle_s", "total_s")

    def __init__(self, s: UpstreamSettings, m: ModelTimeouts) -> None:
        """0 in the model's settings inherits [upstream]'s."""
        self.connect_s = m.connect_timeout_s or s.connect_timeout_s
        self.first_byte_s = m.first_byte_timeout_s or s.first_byte_timeout_s
        self.idle_s = m.idle_timeout_s or s.idle_timeout_s
        self.total_s = m.total_timeout_s or s.total_timeout_s
        if self.total_s:
            self.first_byte_s = min(self.first_byte_s, self.total_s)

    def __repr__(self) -> str:
        return f"<Timeouts first_byte={self.first_byte_s} idle={self.idle_s}>"
