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
from typing import Final

import aiohttp

from edge.config import ModelTimeouts, UpstreamSettings
from edge.dialects.paths import GEMINI, OPENAI
from edge.errors import EdgeError, UpstreamFailure
from edge.http.client import (
    FirstByteLate,
    PoolFull,
    TimedOut,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)
from edge.http.heads import render, retry_after_s
from edge.observe.metrics import Metrics
from edge.observe.tracing import CURRENT
from edge.proxy.queueing import Queueing
from edge.proxy.route import ProxyRequest
from edge.proxy.translate import TARGET, Translation
from edge.routing.attempt import (
    CONNECT_ERROR,
    HTTP_5XX,
    HTTP_429,
    MALFORMED,
    STREAM_ERROR,
    TIMEOUT,
    Attempt,
    Attempts,
)
from edge.routing.balance import Balancer, Decision
from edge.routing.fleet import Host
from edge.routing.health import RetryBudget
from edge.routing.plan import Plan
from edge.routing.speaks import Speaks
from edge.routing.stats import first_byte_deadline

# Routes whose streams can be continued on another host (and so stall sooner): OpenAI's chat and
# legacy completions as sent; Anthropic's and Gemini's, sent translated to chat or natively.
_CONTINUABLE: Final = frozenset({"chat", "completions"})
_NATIVE: Final = frozenset({"messages", "gemini"})  # Anthropic's and Gemini's, from native hosts


def _sse(preq: ProxyRequest) -> bool:
    """Anthropic's streams are SSE; Gemini's only with ?alt=sse (else one JSON array)."""
    return preq.dialect != GEMINI or "alt=sse" in preq.target.partition("?")[2]


class Upstream:
    """An open attempt: the upstream response with its first body chunk already read."""

    __slots__ = ("attempt", "response", "first", "tries", "translation", "resume")

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
        # A stream that can be continued on another host if it breaks (set by `open`).
        self.resume: Resume | None = None

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


class Resume:
    """What a stream needs to go on from another host when it breaks after its first byte: the
    request in OpenAI's API (chat or completions, translated or not), its hosts, and the
    continuations made so far (edge/proxy/continuation.py runs them). A stream in Anthropic's or
    Gemini's API from a host that speaks it natively is continued through OpenAI's API too: its
    translation is made only when it breaks (`sent`)."""

    __slots__ = (
        "forwarder", "preq", "hosts", "headers", "chat", "keep", "limit", "count", "tried",
        "foreign",
    )  # fmt: skip

    def __init__(
        self, forwarder: Forwarder, preq: ProxyRequest, hosts: Sequence[Host], headers: bytes,
        chat: bool, keep: int, limit: int, foreign: _Foreign | None = None,
    ) -> None:  # fmt: skip
        self.forwarder = forwarder
        # OpenAI's request as sent; a native stream's: the client's, until `sent` translates it.
        self.preq = preq
        self.hosts = hosts
        self.headers = headers
        self.chat = chat
        self.keep = keep  # bytes of the relayed stream kept to continue from
        self.limit = limit  # continuations allowed
        self.count = 0
        self.tried: list[Host] = []  # hosts whose stream broke, not asked again
        self.foreign = foreign  # set for a native stream only

    def sent(self) -> ProxyRequest | None:
        """The request the continuations go from, in OpenAI's API; None: not translatable."""
        foreign = self.foreign
        if foreign is None:
            return self.preq
        try:
            translation = foreign.translation()
        except EdgeError:
            return None
        model, body = self.preq.model, translation.body
        self.preq = ProxyRequest(OPENAI, "chat", model, True, body, TARGET, {})
        self.headers = foreign.translated_headers()
        self.foreign = None
        return self.preq

    def __repr__(self) -> str:
        return f"<Resume {self.preq.route} {self.count}/{self.limit}>"


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
        # [admission]: capacity per host and the queue at the edge; None (off) costs one check.
        self.queueing: Queueing | None = None

    async def open(
        self,
        preq: ProxyRequest,
        hosts: Sequence[Host],
        headers: bytes,
        decision: Decision | None = None,
        avoid: Sequence[Host] = (),
    ) -> Upstream:
        """The first attempt that opens; Unavailable when none does. The caller hands the
        result to `done` in a `finally` (a plain call: a context manager per request costs
        more than everything this method does on the happy path). `avoid`: hosts not to try
        (a continuation's: their streams broke); the first attempt is then a retry. With
        [admission] on, the caller waited for a slot first (`queueing.wait`), and the plan
        skips hosts at capacity while another has room."""
        if self.settings is not self._tuned:
            self._tune()
        plan = Plan(preq.model, hosts, decision, self.balancer, self.budget)
        if self.queueing is not None:  # off: this one check
            plan.capacity = self.queueing.capacity
        if avoid:
            plan.tried.extend(avoid)
        foreign = None
        if preq.dialect != OPENAI:
            foreign = _Foreign(preq, headers, passthrough=self.credentials is None)
        left = self.settings.max_attempts
        while left > 0:
            host = plan.next()
            if host is None:
                if plan.denied:
                    self.metrics.retry_denied(preq.model)
                    break
                # Every host left is held for a Retry-After it sent: wait for the first free.
                wait = plan.wait(time.monotonic(), self.settings.retry_after_wait_s)
                if wait is None:
                    break
                await asyncio.sleep(wait)
                continue
            left -= 1
            hedge = None if decision is None else self.balancer.hedge_delay(host, hosts, decision)
            try:
                if hedge is None:
                    up = await self._open(host, preq, headers, foreign, plan, left > 0)
                else:
                    up = await self._race(host, preq, headers, foreign, plan, hedge, left > 0)
            except UpstreamFailure as failure:
                # A full pool sent nothing: moving on costs no retry budget.
                plan.failed(host, failure.reason, isinstance(failure.__cause__, PoolFull))
                continue
            up.tries = len(plan.tried) - len(avoid)
            # A pinned request never leaves its host (nor one of a model with one host); a
            # continuation's own attempt (`avoid`) is resumed by the continuation that opened it.
            if preq.stream and len(hosts) > 1 and not (decision and decision.pinned):
                if avoid:  # a continuation's stream: a stall is a break here too
                    up.response.read_timeout = self._stall_s(preq.model)
                elif self.continuing(preq.model):
                    self._resumable(up, preq, hosts, headers, foreign)
            return up
        raise plan.unavailable()

    def continuing(self, model: str) -> bool:
        """Whether `model`'s streams are continued when they break ([routing] continuation)."""
        routing = self.balancer.settings
        if not routing.continuation or routing.max_continuations == 0:
            return False
        rules = routing.models.get(model)
        return rules is None or rules.continuation

    def _resumable(
        self, up: Upstream, preq: ProxyRequest, hosts: Sequence[Host], headers: bytes,
        foreign: _Foreign | None,
    ) -> None:  # fmt: skip
        """Give a stream that can be continued (chat or completions in OpenAI's API, one choice,
        as sent to the host) what continuing it takes."""
        translation = up.translation
        native: _Foreign | None = None
        if translation is not None and foreign is not None:
            # The host got OpenAI's chat request, translated: continued the same way.
            sent = ProxyRequest(
                OPENAI, "chat", preq.model, True, translation.body, TARGET, {}
            )  # the doc is parsed from the body only if the stream breaks
            headers = foreign.translated_headers()
        elif preq.dialect == OPENAI and preq.route in _CONTINUABLE:
            sent = preq
        elif foreign is not None and preq.route in _NATIVE and _sse(preq):
            sent, native = preq, foreign  # a native stream: translated only if it breaks
        else:
            return
        n = preq.doc.get("n")
        if n is not None and n != 1:
            return
        routing = self.balancer.settings
        up.response.read_timeout = self._stall_s(preq.model)  # silent this long: a dead host
        up.resume = Resume(
            self, sent, hosts, headers, sent.route != "completions",
            routing.continuation_keep_bytes, routing.max_continuations, native,
        )  # fmt: skip

    @staticmethod
    def done(up: Upstream) -> None:
        """The exchange is over: the connection goes back to the pool (or closes); an attempt
        the relay did not finish (the client left) ends without a verdict."""
        up.response.close()
        up.attempt.cancel()

    async def _race(
        self, host: Host, preq: ProxyRequest, headers: bytes, foreign: _Foreign | None,
        plan: Plan, delay: float, more: bool,
    ) -> Upstream:  # fmt: skip
        """Open `host`, hedged (balance.hedge_delay: off by default): when no first byte came
        within `delay` (the host's recent p95), open a second host too: the first to send a
        byte wins and the other is cancelled at once. A failure of `host` itself is raised; a
        failed hedge only adds its reason to the primary's."""
        racing = {asyncio.create_task(self._open(host, preq, headers, foreign, plan, more)): host}
        winner: Upstream | None = None
        try:
            done, _ = await asyncio.wait(racing, timeout=delay)
            second = None if done else plan.hedge()
            if second is not None:
                opening = self._open(second, preq, headers, foreign, plan, more)
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
        self, host: Host, preq: ProxyRequest, headers: bytes, foreign: _Foreign | None,
        plan: Plan, more: bool,
    ) -> Upstream:  # fmt: skip
        """One attempt on `host`, up to its first body byte (a non-streamed body: up to its end,
        within max_buffered_body_bytes); UpstreamFailure when it fails. `more`: the request
        has attempts left after this one."""
        t = self._timeouts.get(preq.model) or self._timeouts[""]
        # A first byte later than the host's recent form moves the request on while another
        # host can take it; the last chance waits the whole first_byte_timeout_s.
        first_byte_s = t.first_byte_s
        if more and plan.others_left():
            s = self.settings
            first_byte_s = first_byte_deadline(
                host.stats, s.first_token_factor, s.first_token_floor_s, first_byte_s
            )
        translation: Translation | None = None
        target, body = preq.target, preq.body
        if foreign is not None and not self.speaks.native(host.url, preq.dialect):
            translation = foreign.translation()
            target, body, headers = TARGET, translation.body, foreign.translated_headers()
        keys = self._keys(OPENAI if translation is not None else preq.dialect, host)
        attempt = self.attempts.start(host, preq.model)
        # A traced request (edge/observe/tracing.py): the host gets a traceparent whose parent
        # is this attempt's span. Untraced: one context-variable read.
        trace = CURRENT.get()
        span = trace.attempt(attempt) if trace is not None else None
        traced = span.header if span is not None else b""
        keys += traced
        response: UpstreamResponse | None = None
        try:
            response = await self.pool.post(
                host.url, target, headers + keys, body, first_byte_s, t.connect_s
            )
            if foreign is not None and translation is None and response.status in (404, 405):
                if self.speaks.learnable(host.url):
                    # No such path: the host does not speak the dialect. The same attempt goes
                    # on translated, and the next ones go translated at once.
                    self.speaks.refused(host.url, preq.dialect)
                    response.close()
                    response = None
                    translation = foreign.translation()
                    keys = self._keys(OPENAI, host) + traced
                    response = await self.pool.post(
                        host.url, TARGET, foreign.translated_headers() + keys, translation.body,
                        first_byte_s, t.connect_s,
                    )  # fmt: skip
            if t.total_s:
                response.set_deadline(max(0.0, t.total_s - (time.monotonic() - attempt.started)))
            status = response.status
            if span is not None:
                span.status = status
            if status >= 500 or status == 429:
                # 502/503/504 say the host is broken; 429 (busy) and 500 (maybe this request)
                # move the request on without counting against the host.
                outcome = HTTP_429 if status == 429 else HTTP_5XX
                now = time.monotonic()
                if status in (429, 503):
                    self._hold(plan, host, response, now)
                attempt.fail(outcome, now, blame=status in (502, 503, 504))
                raise UpstreamFailure(f"HTTP {status}", counts=attempt.blame)
            if response.buffered:
                first = response.take()  # the body came with the head: no wait
            else:
                response.read_timeout = first_byte_s
                try:
                    first = await response.readany()
                except TimedOut:
                    raise FirstByteLate("timed out before the first byte") from None
            # Past the first byte, a stall is judged by the idle timeout instead (a stream that
            # can be continued elsewhere: the stall timeout, set by `_resumable`).
            response.read_timeout = t.idle_s
            attempt.answered(time.monotonic())
            if not preq.stream and not response.complete:
                first = await self._whole(attempt, response, first)
        except UpstreamFailure:
            if response is not None:
                response.close()
            raise
        except (UpstreamError, TimeoutError, OSError) as exc:
            if response is not None:
                response.close()
            outcome, reason, blame = _outcome(exc)
            if isinstance(exc, FirstByteLate) and first_byte_s < t.first_byte_s:
                # Slower than its own recent form, not broken: a long prompt's prefill may be
                # just that. The request moves on; the host's score takes the penalty, its
                # health nothing.
                blame = False
                reason = f"no first byte within {first_byte_s:.1f} s (its recent form); moved on"
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
        return Upstream(attempt, response, first, translation)

    async def _whole(self, attempt: Attempt, response: UpstreamResponse, first: bytes) -> bytes:
        """The rest of a non-streamed body, up to max_buffered_body_bytes, before anything goes
        to the client: a host that dies mid-body fails the attempt (STREAM_ERROR, blamed) and
        the request moves on whole. Past the bound the rest is relayed as it comes."""
        bound = self.settings.max_buffered_body_bytes
        parts, size = [first], len(first)
        try:
            while size <= bound and not response.complete:
                piece = await response.readany()
                if not piece:
                    break
                parts.append(piece)
                size += len(piece)
        except UpstreamError as exc:
            attempt.finish(STREAM_ERROR, time.monotonic())
            raise UpstreamFailure(f"the answer broke off: {exc.reason}") from None
        return b"".join(parts) if len(parts) > 1 else first

    def _hold(self, plan: Plan, host: Host, response: UpstreamResponse, now: float) -> None:
        """A 429 or 503 with Retry-After: `host` takes no request for that long (bounded)."""
        value = response.headers.get("Retry-After")
        if value is None:
            return
        seconds = retry_after_s(value, time.time())
        if seconds:
            plan.hold(host, min(seconds, self.settings.retry_after_max_s), now)
            self.metrics.held(host)

    def _stall_s(self, model: str) -> float:
        return (self._timeouts.get(model) or self._timeouts[""]).stall_s

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
    __slots__ = ("connect_s", "first_byte_s", "idle_s", "stall_s", "total_s")

    def __init__(self, s: UpstreamSettings, m: ModelTimeouts) -> None:
        """0 in the model's settings inherits [upstream]'s."""
        self.connect_s = m.connect_timeout_s or s.connect_timeout_s
        self.first_byte_s = m.first_byte_timeout_s or s.first_byte_timeout_s
        self.idle_s = m.idle_timeout_s or s.idle_timeout_s
        self.stall_s = m.stall_timeout_s or s.stall_timeout_s
        self.total_s = m.total_timeout_s or s.total_timeout_s
        if self.total_s:
            self.first_byte_s = min(self.first_byte_s, self.total_s)

    def __repr__(self) -> str:
        return f"<Timeouts first_byte={self.first_byte_s} idle={self.idle_s}>"
