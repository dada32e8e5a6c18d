"""One Redis client per worker, behind a circuit breaker so the edge never hangs on Redis.

Theory of operation: every call runs under a hard deadline (`timeout_s`, connect included). A
failure opens the circuit: calls fail at once with `RedisDown`, costing nothing, until a backoff
(doubling from 50 ms to 5 s) has passed; then the next call is let through as a probe (the
others keep failing fast while it runs). A probe that succeeds closes the circuit; one that fails
doubles the backoff. redis-py reconnects by itself on the call after a dropped connection; its
own retries are switched off because they would multiply the deadline.

`ScriptBatch` sends every call of one Lua script made in the same event-loop turn as one
pipeline: one write and one read for all of them. A lone request still costs one round trip and
waits for nothing (the batch is flushed by `call_soon`); under load, many requests share one, which
saves the system calls that dominate a Redis round trip's CPU cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("edge.redis")

T = TypeVar("T")

_MIN_BACKOFF_S, _MAX_BACKOFF_S = 0.05, 5.0
# Connections per worker: a burst waits for one (within the deadline) rather than opening
# hundreds of sockets to Redis.
POOL_SIZE = 64


class RedisDown(Exception):
    """Redis did not answer in time, or the circuit is open. Carries no details: callers decide
    between their fail_open and fail_closed behaviour."""


class RedisLink:
    def __init__(self, url: str, timeout_s: float, clock: Callable[[], float] = time.monotonic):
        # Imported here: redis-py takes ~0.3 s to import, which an edge without Redis never pays.
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry  # the asyncio one: redis-py 8.2 warns on the other
        from redis.backoff import NoBackoff
        from redis.exceptions import NoScriptError, RedisError

        self._errors = (RedisError, OSError, TimeoutError)
        self.no_script: type[Exception] = NoScriptError
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_SIZE,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._pool = pool
        self.client: Redis = Redis.from_pool(pool)  # closing the client closes the pool
        self.timeout_s = timeout_s
        self.clock = clock
        self.up = True
        self.failures = 0  # calls that failed or timed out (not those refused by the circuit)
        self._backoff = _MIN_BACKOFF_S
        self._retry_at = 0.0

    async def call(self, fn: Callable[[], Awaitable[T]], op: str = "call") -> T:
        if not self.up:
            now = self.clock()
            if now < self._retry_at:
                raise RedisDown()
            self._retry_at = now + self._backoff  # one probe at a time
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await fn()
        except self._errors as exc:
            opened = self.up
            self._failed(op, exc)
            if opened:
                # The connections idle in the pool point at a Redis that went away: close them now
                # rather than leave them half-closed (CLOSE_WAIT) until each is next taken.
                with contextlib.suppress(*self._errors):
                    await self._pool.disconnect(inuse_connections=False)
            raise RedisDown() from None
        if not self.up:
            self.up, self._backoff = True, _MIN_BACKOFF_S
            log.warning("redis is reachable again")
        return result

    def _failed(self, op: str, exc: BaseException) -> None:
        self.failures += 1
        if self.up:
            self.up = False
            log.error("redis unreachable during %s (%s); backing off", op, type(exc).__name__)
        else:
            self._backoff = min(self._backoff * 2, _MAX_BACKOFF_S)
        self._retry_at = self.clock() + self._backoff

    async def close(self) -> None:
        await self.client.aclose()

    def __repr__(self) -> str:
        state = "up" if self.up else f"down backoff={self._backoff:.2f}s"
        return f"<RedisLink {state} failures={self.failures}>"


Call = tuple[list[str], list[int | str], "asyncio.Future[Any]"]


class ScriptBatch:
    """Calls of one Lua script, sent together per loop turn; each caller awaits its own reply.

    `abandoned(args, reply)` is told about replies whose caller was cancelled meanwhile, so that
    what the script took (a lease, a request) can be given back.
    """

    def __init__(
        self, link: RedisLink, source: str, op: str,
        abandoned: Callable[[list[str], list[int | str], Any], None] | None = None,
    ) -> None:  # fmt: skip
        self.link = link
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self.op = op
        self.abandoned = abandoned
        self._queue: list[Call] = []
        self._sending: set[asyncio.Task[None]] = set()
        self.calls = self.batches = 0

    def __call__(self, keys: list[str], args: list[int | str]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((keys, args, future))
        if len(self._queue) == 1:
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        self.calls += len(batch)
        self.batches += 1
        task = asyncio.create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[Call]) -> None:
        replies: list[Any] = [RedisDown()] * len(batch)
        try:
            replies = await self.link.call(lambda: self._execute(batch), op=self.op)
        except RedisDown:
            pass
        finally:
            # On every path, every caller gets an answer: a future left pending is a hung request.
            self._deliver(batch, replies)

    def _deliver(self, batch: list[Call], replies: list[Any]) -> None:
        for (keys, args, future), reply in zip(batch, replies, strict=True):
            failed = isinstance(reply, Exception)
            if future.done():
                if not failed and self.abandoned is not None:
                    self.abandoned(keys, args, reply)
            elif failed:
                future.set_exception(RedisDown())
            else:
                future.set_result(reply)

    async def _execute(self, batch: list[Call]) -> list[Any]:
        replies = await self._pipeline(batch)
        missing = [i for i, r in enumerate(replies) if isinstance(r, self.link.no_script)]
        if missing:  # a Redis restarted (or flushed) forgot the script: load it, run those again
            await self.link.client.script_load(self.source)
            again = await self._pipeline([batch[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _pipeline(self, batch: list[Call]) -> list[Any]:
        pipe = self.link.client.pipeline(transaction=False)
        for keys, args, _ in batch:
            pipe.evalsha(self.sha, len(keys), *keys, *args)
        return await pipe.execute(raise_on_error=False)

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) for batches in flight."""
        if self._sending:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*self._sending, return_exceptions=True)

    def __repr__(self) -> str:
        return f"<ScriptBatch {self.op} calls={self.calls} batches={self.batches}>"
