"""Subprocess servers for tests that need real processes (kill -9, signals, --workers)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"exited with {proc.returncode} before {url} was up") from None
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
        env = dict(os.environ, PYTHONUNBUFFERED="1")
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
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.started:
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
