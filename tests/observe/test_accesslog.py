"""The access log: one JSON line per request, no secrets, sampling, stdout and file modes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from edge.config import ConfigError, LogSettings, from_mapping
from edge.observe.accesslog import AccessLog
from edge.observe.record import RequestRecord, Usage
from tests.procs import Procs, free_port

SECRET_KEY = "sk-live-SECRETKEY-7f3a9c"
SECRET_PROMPT = "the vault combination is PROMPT-SECRET-4410"
FIELDS = {
    "time", "request_id", "trace_id", "client", "model", "known_model", "server", "route",
    "status", "outcome", "attempts", "ttfb_ms", "duration_ms", "prompt_tokens", "completion_tokens",
    "bytes_in", "bytes_out", "affinity", "key_id", "workspace", "cost",
}  # fmt: skip


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_one_line_per_request_and_no_secret_reaches_the_log(start_mock, start_edge, tmp_path):
    log = tmp_path / "access.log"
    a = await start_mock(models=("m1",), name="A", tokens=5)
    dead = f"http://127.0.0.1:{free_port()}"
    edge = await start_edge({"m1": [a], "m2": [dead]}, log__mode="file", log__path=str(log))
    client = openai.AsyncOpenAI(base_url=f"{edge.url}/v1", api_key=SECRET_KEY, max_retries=0)
    messages: Any = [{"role": "user", "content": SECRET_PROMPT}]
    reply = await client.chat.completions.create(
        model="m1", messages=messages, extra_headers={"X-Request-ID": "req-plain-1"}
    )
    stream = await client.chat.completions.create(
        model="m1", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    streamed = [chunk async for chunk in stream]
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="m2", messages=messages)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=messages)
    await client.close()
    edge.access.flush()
    text = log.read_text()
    lines = _lines(log)
    assert len(lines) == 4 and all(set(line) == FIELDS for line in lines)
    plain, streaming, unavailable, unknown = lines
    assert plain["request_id"] == "req-plain-1" and plain["client"] == "127.0.0.1"
    assert (plain["model"], plain["server"], plain["route"], plain["status"]) == (
        "m1",
        a,
        "chat",
        200,
    )
    assert plain["attempts"] == 1 and plain["outcome"] == "ok"
    assert plain["affinity"] in {"cookie_hit", "key_hit", "moved", "none"}
    assert plain["completion_tokens"] == 5 and plain["prompt_tokens"] > 0
    assert plain["bytes_in"] > 0 and plain["bytes_out"] > 0
    assert 0 < plain["ttfb_ms"] <= plain["duration_ms"]
    assert plain["time"].endswith("Z")
    assert streaming["completion_tokens"] == 5 and streaming["bytes_out"] > plain["bytes_out"] / 2
    assert (unavailable["status"], unavailable["server"], unavailable["outcome"]) == (
        503, None, "edge_error"
    )  # fmt: skip
    assert (unknown["status"], unknown["model"], unknown["known_model"]) == (404, "nope", False)
    # Nothing the client sent or the model said is in the log: no key, no prompt, no answer.
    assert reply.choices[0].message.content and streamed
    for secret in (SECRET_KEY, "SECRETKEY", "PROMPT-SECRET", "vault", "Bearer", "tok1"):
        assert secret not in text


async def test_sampling_keeps_every_error(start_mock, start_edge, tmp_path):
    log = tmp_path / "access.log"
    a = await start_mock(models=("m1",))
    edge = await start_edge({"m1": [a]}, log__mode="file", log__path=str(log), log__sample_rate=0.0)
    body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as client:
        for headers in ({}, {}, {"X-Mock-Status": "500"}, {"X-Mock-Status": "400"}):
            url = f"{edge.url}/v1/chat/completions"
            async with client.post(url, json=body, headers=headers) as resp:
                await resp.read()
    edge.access.flush()
    statuses = [line["status"] for line in _lines(log)]
    assert statuses == [503, 400]  # the 500 moved on, found no other server: 503
    assert repr(edge.access) == "<AccessLog file written=2 sampled_out=2 buffered=0 dropped=0>"


def test_batches_are_whole_lines_within_pipe_buf():
    read, write = os.pipe()
    log = AccessLog(LogSettings(mode="stdout"))
    log._fd = write  # a pipe standing in for stdout
    obs = RequestRecord("m", None, "chat", 200, "ok", 0.01, usage=Usage(1, 2))
    try:
        for i in range(100):
            log.write(obs, f"id-{i}", "127.0.0.1", "m")
        log.flush()
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            data = pipe.read()
    finally:
        log.enabled = False
    lines = data.splitlines()
    assert len(lines) == 100 and [json.loads(x)["request_id"] for x in lines][-1] == "id-99"


def test_a_log_that_went_away_drops_lines_and_fails_nothing():
    read, write = os.pipe()
    os.close(read)  # nobody reads: writes fail with EPIPE
    log = AccessLog(LogSettings(mode="stdout"))
    log._fd = write
    try:
        log.write(RequestRecord("m", None, "chat", 500, "edge_error", 0.01), "id", None, "m")
        log.flush()
    finally:
        log.enabled = False
        os.close(write)
    assert log.dropped == 1 and log.written == 1


def test_log_settings_are_validated():
    for bad in (
        {"log": {"mode": "syslog"}},
        {"log": {"mode": "file"}},
        {"log": {"sample_rate": 1.5}},
        {"metrics": {"share_interval_s": 0}},
    ):
        with pytest.raises(ConfigError):
            from_mapping(bad)
    assert from_mapping({}).log.mode == "off"


async def test_stdout_mode_from_a_config_file(procs: Procs, tmp_path: Path):
    upstream = procs.mock(free_port(), "m", name="A")
    config = tmp_path / "edge.toml"
    config.write_text(
        f'[log]\nmode = "stdout"\n\n[models."m"]\nservers = ["{upstream}"]\n', encoding="utf-8"
    )
    port = free_port()
    edge = procs.edge(port, "--config", str(config))
    body = {"model": "m", "messages": [{"role": "user", "content": SECRET_PROMPT}]}
    headers = {"Authorization": f"Bearer {SECRET_KEY}", "X-Request-ID": "from-stdout"}
    async with aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with client.post(url, json=body, headers=headers) as resp:
            assert resp.status == 200
            await resp.read()
    edge.send_signal(signal.SIGTERM)  # the drain flushes the buffer
    assert await asyncio.to_thread(edge.wait, 20) == 0
    assert edge.stdout is not None
    out = edge.stdout.read().decode()
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(x["request_id"], x["status"], x["model"]) for x in lines] == [
        ("from-stdout", 200, "m")
    ]
    assert SECRET_KEY not in out and "PROMPT-SECRET" not in out


async def test_reload_reopens_the_log_after_a_rotation(start_mock, start_edge, tmp_path):
    log, rotated = tmp_path / "access.log", tmp_path / "access.log.1"
    a = await start_mock(models=("m1",), name="A", tokens=2)
    edge = await start_edge({"m1": [a]}, log__mode="file", log__path=str(log))
    client = openai.AsyncOpenAI(base_url=f"{edge.url}/v1", api_key="k", max_retries=0)
    messages: Any = [{"role": "user", "content": "hi"}]
    await client.chat.completions.create(
        model="m1", messages=messages, extra_headers={"X-Request-ID": "before"}
    )
    log.rename(rotated)  # logrotate's move; the edge still holds the moved file open
    await client.chat.completions.create(
        model="m1", messages=messages, extra_headers={"X-Request-ID": "buffered"}
    )
    await edge.reload()  # SIGHUP (its postrotate step)
    await client.chat.completions.create(
        model="m1", messages=messages, extra_headers={"X-Request-ID": "after"}
    )
    await client.close()
    edge.access.flush()
    assert [line["request_id"] for line in _lines(rotated)] == ["before", "buffered"]
    assert [line["request_id"] for line in _lines(log)] == ["after"]


async def test_a_reload_to_an_unwritable_log_keeps_the_old_one(start_edge, tmp_path):
    log = tmp_path / "access.log"
    edge = await start_edge({}, log__mode="file", log__path=str(log))
    before = edge.access.settings
    with pytest.raises(OSError):
        edge.access.reopen(replace(before, path=str(tmp_path / "no-such-dir" / "access.log")))
    assert edge.access.enabled and edge.access.settings == before
