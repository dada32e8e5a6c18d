"""The event loop, the settings and the fake transport of the fuzz tests (see __init__)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from hypothesis import HealthCheck, Phase, settings

EXAMPLES_ENV = "EDGE_FUZZ_EXAMPLES"
T = TypeVar("T")


def fuzz(examples: int) -> settings:
    """Settings of a fuzz target: `examples` of them in the normal suite, or as many as
    EDGE_FUZZ_EXAMPLES says, at random, for the long run (which also skips the explicit
    @examples with EDGE_FUZZ_SKIP_EXPLICIT: the suite checks those)."""
    wanted = int(os.environ.get(EXAMPLES_ENV, "0") or 0)
    skip = os.environ.get("EDGE_FUZZ_SKIP_EXPLICIT") and wanted
    return settings(
        phases=[p for p in Phase if p != Phase.explicit] if skip else list(Phase),
        max_examples=wanted or examples,
        deadline=None,  # a loaded two-core machine makes any per-example deadline flaky
        derandomize=not wanted,
        database=None,  # nothing written into the checkout; a failure prints its reproducer
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


class Harness:
    """An event loop shared by a test's examples, and what went wrong on it behind the test's
    back: `errors` (exceptions handed to the loop's exception handler, ERROR records of the
    edge's loggers). `run` fails the example when there are any."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or new_loop()
        self.errors: list[str] = []
        self.loop.set_exception_handler(self._on_exception)
        # Every task, so that one that died of an exception nobody awaited is caught at the end
        # of its example (asyncio reports it only when the task is collected: later, if ever).
        self._tasks: list[asyncio.Future[Any]] = []
        self.loop.set_task_factory(self._task)
        self._log = _Recorder(self.errors)
        logging.getLogger("edge").addHandler(self._log)

    def _on_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.errors.append(f"{context.get('message')}: {context.get('exception')!r}")

    def _task(self, loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Future[Any]:
        task = asyncio.Task(coro, loop=loop, **kw)
        self._tasks.append(task)
        return task

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """`coro` to its end (a hang fails after `timeout`), then no error may be recorded."""
        self.errors.clear()
        try:
            result = self.loop.run_until_complete(asyncio.wait_for(coro, timeout))
        finally:
            self._check_tasks()
        assert not self.errors, list(self.errors)  # a copy: the next run clears it
        return result

    def _check_tasks(self) -> None:
        pending = []
        for task in self._tasks:
            if not task.done():
                pending.append(task)
            # (an exception someone retrieved, the example's own among them, is not this one's)
            elif not task.cancelled() and getattr(task, "_log_traceback", False):
                self.errors.append(f"a task died of {task.exception()!r}: {task!r}"[:500])
        self._tasks = pending

    def close(self) -> None:
        self.errors.clear()  # the last example's are its own (it failed with them)
        logging.getLogger("edge").removeHandler(self._log)
        loop = self.loop
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.wait(tasks, timeout=5))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        assert not self.errors, list(self.errors)  # a copy: the next run clears it


def new_loop() -> asyncio.AbstractEventLoop:
    """asyncio's event loop, or uvloop's (production's) with EDGE_FUZZ_LOOP=uvloop."""
    if os.environ.get("EDGE_FUZZ_LOOP") == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class _Recorder(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(f"{record.name}: {record.getMessage()} {record.exc_info!r}")


async def settle(done: Callable[[], bool], limit_s: float = 1.0) -> bool:
    """Wait until `done()` (first a few loop turns, then short sleeps) for at most `limit_s`."""
    for _ in range(50):
        if done():
            return True
        await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while loop.time() < deadline:
        if done():
            return True
        await asyncio.sleep(0.002)
    return done()


class FakeTransport(asyncio.Transport):
    """The transport a protocol gets from a socket, for tests that deliver the bytes
    themselves: `close` and `abort` call `connection_lost` on a later loop turn (as asyncio's
    do), writes after `abort` are lost, reads stop while paused (the test must not deliver),
    `write_eof` sends a FIN (`ended`: the peer has seen the server's last byte)."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.out = bytearray()
        self.closing = False
        self.aborted = False
        self.lost = False
        self.paused = False
        self.eof_sent = False
        self.reset = False
        self.misuse: list[str] = []  # what a socket transport would have refused

    @property
    def ended(self) -> bool:
        return self.closing or self.eof_sent

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.eof_sent:
            self.misuse.append("write() after write_eof()")
        if self.aborted or self.lost or self.reset or not data:
            return
        self.out += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self.reset:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        self.eof_sent = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self._end()

    def abort(self) -> None:
        self.aborted = True
        self._end()

    def _end(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self._lost, None)

    def _lost(self, exc: Exception | None) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(exc)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_reading(self) -> bool:
        return not self.paused and not self.closing

    def peer_reset(self) -> None:
        """The peer's RST, as a socket transport meets it: until asyncio reads the error (a
        loop turn later, then `connection_lost`), writes are lost and `write_eof` raises
        ENOTCONN (the socket's shutdown() does)."""
        self.reset = True
        error = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        asyncio.get_running_loop().call_soon(self._lost, error)

    def client_closes(self) -> None:
        """The peer's FIN, as asyncio handles it: `eof_received`, then close unless it says
        to keep the transport half-open."""
        if self.closing:
            return
        if not self.protocol.eof_received():
            self.close()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0
