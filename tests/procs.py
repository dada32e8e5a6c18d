"""Subprocess servers for tests that need real processes (kill -9, signals, --workers)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (the demo puts its mocks on a block)."""
    for _ in range(100):
        first = free_port()
        if first + count > 65535:
            continue
        socks = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no block of free ports")


def wait_http(url: str, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                said = proc.stdout.read().decode(errors="replace")[-2000:] if proc.stdout else ""
                raise RuntimeError(
                    f"exited with {proc.returncode} before {url} was up:\n{said}"
                ) from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not come up within {timeout} s") from None
            time.sleep(0.05)


def write_fleet(path: Path, models: dict[str, list[str]]) -> Path:
    path.write_text(json.dumps({m: {"servers": urls} for m, urls in models.items()}))
    return path


class Procs:
    """Started processes, each stopped (TERM, then KILL) when the test ends."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, ready: str | None = None) -> subprocess.Popen[bytes]:
        # Subprocesses run the same source tree as the tests, not whatever is installed.
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.started.append(proc)
        if ready:
            wait_http(ready, proc=proc)
        return proc

    def mock(self, port: int, *models: str, name: str = "mock", extra: tuple[str, ...] = ()) -> str:
        args = ["mock", "--port", str(port), "--name", name, *extra]
        for model in models:
            args += ["--model", model]
        url = f"http://127.0.0.1:{port}"
        self.start(*args, ready=f"{url}/health")
        return url

    def edge(self, port: int, *args: str) -> subprocess.Popen[bytes]:
        return self.start(
            "serve", "--port", str(port), *args, ready=f"http://127.0.0.1:{port}/health"
        )

    def stop_all(self) -> None:
        for proc in self.started:
            # Each process leads its own group: kill the group, children included.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.started:
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
