"""The access log: one JSON line per proxied request, off by default.

A line holds what the final observation already measured (model, server, route, status, outcome,
attempts, time to first byte, duration, tokens, bytes, affinity) plus the request id, the
client's address and the W3C trace id (the client's `traceparent`'s, or the one the edge started
for a traced request; null without either). Never a header, a query string, a body or an
answer: an API key, a prompt or an output cannot reach the log because nothing that could carry
one is handed to it.

Lines are buffered and written with one `os.write` per batch of whole lines, each at most
PIPE_BUF bytes, so workers appending to one file or one stdout pipe never interleave half lines.
A periodic flush keeps the log at most `FLUSH_S` behind; the drain flushes the rest.
"""

from __future__ import annotations

import asyncio
import os
import random
import select
from datetime import UTC, datetime
from typing import Any

import orjson

from edge.config import LogSettings
from edge.observe.record import RequestRecord

KeyUse = tuple[str, str, float | None]  # short key id, workspace, cost

FLUSH_S = 0.5
_BATCH = select.PIPE_BUF  # writes up to this size are atomic on pipes (4096 on Linux)
_MODEL_MAX = 128  # a model name the edge does not serve is still logged, cut to this


class AccessLog:
    """Writes one line per request to stdout or a file; a no-op when `mode` is off."""

    def __init__(self, settings: LogSettings) -> None:
        self._open(settings)
        self._lines: list[bytes] = []
        self._size = 0
        self.written = 0
        self.sampled_out = 0
        self.dropped = 0  # batches the log could not take

    def write(
        self, obs: RequestRecord, request_id: str, client: str | None, asked: str,
        key: KeyUse | None = None, trace_id: str | None = None,
    ) -> None:  # fmt: skip
        """One line for a request just answered. `asked` is the model name the client sent;
        `key` is the (short key id, workspace, cost) of a request the edge checked a key for;
        `trace_id` the request's W3C trace id, when it has one."""
        if not self.enabled:
            return
        if obs.status < 400 and self.sample_rate < 1.0 and random.random() >= self.sample_rate:
            self.sampled_out += 1
            return
        fields = _record(obs, request_id, client, asked, key, trace_id)
        line = orjson.dumps(fields, option=_OPTIONS)
        self._lines.append(line)
        self._size += len(line)
        self.written += 1
        if self._size >= _BATCH:
            self.flush()

    def flush(self) -> None:
        lines, self._lines, self._size = self._lines, [], 0
        batch: list[bytes] = []
        size = 0
        for line in lines:
            if batch and size + len(line) > _BATCH:
                self._write(b"".join(batch))
                batch, size = [], 0
            batch.append(line)
            size += len(line)
        if batch:
            self._write(b"".join(batch))

    def _write(self, data: bytes) -> None:
        view, at, end = memoryview(data), 0, len(data)
        while at < end:
            try:
                at += os.write(self._fd, view[at:])
            except OSError:
                # A full non-blocking pipe, a closed one, a full disk: drop the batch rather
                # than stall or fail requests.
                self.dropped += 1
                return

    def _open(self, settings: LogSettings) -> None:
        self.settings = settings
        self.sample_rate = settings.sample_rate
        self._own_fd = settings.mode == "file"
        self._fd = -1
        if settings.mode == "file":
            self._fd = os.open(settings.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        elif settings.mode == "stdout":
            self._fd = 1
        self.enabled = self._fd >= 0

    def reopen(self, settings: LogSettings) -> None:
        """SIGHUP: what is buffered goes to the old file, then the log opens again with
        `settings`: the same path after logrotate moved the file, or another mode or path.
        Raises OSError (and keeps the old file) when the new one cannot be opened."""
        if settings.mode == "file":  # try the new file before letting go of the old one
            os.close(os.open(settings.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640))
        self.close()
        self._open(settings)

    async def run(self) -> None:
        """Flush every FLUSH_S so that a quiet edge's lines do not wait in the buffer (a log
        turned on by a reload is flushed too)."""
        while True:
            await asyncio.sleep(FLUSH_S)
            if self._lines:
                self.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush()
        if self._own_fd:
            os.close(self._fd)
        self.enabled = False

    def __repr__(self) -> str:
        return (
            f"<AccessLog {self.settings.mode} written={self.written} "
            f"sampled_out={self.sampled_out} buffered={len(self._lines)} dropped={self.dropped}>"
        )


_OPTIONS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_UTC_Z


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _record(
    obs: RequestRecord, request_id: str, client: str | None, asked: str, key: KeyUse | None,
    trace_id: str | None,
) -> dict[str, Any]:  # fmt: skip
    usage = obs.usage
    key_id, workspace, cost = key if key is not None else (None, None, None)
    line = {
        "time": datetime.now(UTC),
        "request_id": request_id,
        "trace_id": trace_id,
        "client": client,
        "model": obs.model or asked[:_MODEL_MAX],
        "known_model": bool(obs.model),
        "server": obs.host.url if obs.host is not None else None,
        "route": obs.route,
        "status": obs.status,
        "outcome": obs.outcome,
        "attempts": obs.attempts,
        "ttfb_ms": _ms(obs.first_byte_s),
        "duration_ms": _ms(obs.duration_s),
        "prompt_tokens": usage.prompt_tokens if usage is not None else None,
        "completion_tokens": usage.completion_tokens if usage is not None else None,
        "bytes_in": obs.bytes_in,
        "bytes_out": obs.bytes_out,
        "affinity": obs.affinity,
        "key_id": key_id,  # the short id only, never the key
        "workspace": workspace,
        "cost": cost,
    }
    if obs.model and obs.model != asked:  # a fallback model answered (edge/proxy/fallback.py)
        line["asked_model"] = asked[:_MODEL_MAX]
    return line
