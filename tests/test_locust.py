"""A short, bounded locust run against a real edge and three mock servers, all subprocesses.

Locust patches the interpreter with gevent, so it runs as its own process; its CSV stats are
what the test reads. Any failed request fails the test, and every user class must have run.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.procs import Procs, free_port

ROOT = Path(__file__).resolve().parent.parent
LOCUST = Path(sys.executable).with_name("locust")
MOCK_SPEED = ("--ttft-ms", "5", "--chunk-ms", "2", "--tokens", "8")

# The stats rows each user class writes: (type, name prefix). The mix has a row per model.
EXPECTED_ROWS = {
    "StreamingChatUser": ("POST", "/v1/chat/completions [stream]"),
    "streamed TTFT": ("TTFT", "/v1/chat/completions [stream]"),
    "ChatUser": ("POST", "/v1/chat/completions"),
    "ConversationUser": ("POST", "/v1/chat/completions [conversation]"),
    "whole conversations": ("CONV", "conversation"),
    "EmbeddingsUser": ("POST", "/v1/embeddings"),
    "MixedModelUser, chat-a": ("POST", "/v1/chat/completions [mix chat-a"),
    "MixedModelUser, chat-b": ("POST", "/v1/chat/completions [mix chat-b"),
    "MixedModelUser, embeddings": ("POST", "/v1/embeddings [mix embed-a]"),
}


def requests_made(stats: dict[tuple[str, str], dict[str, str]], kind: str, name: str) -> int:
    """Requests of the exact row, or of every row starting with a `[mix` prefix."""
    exact = name.endswith("]") or "[" not in name
    return sum(
        int(row["Request Count"])
        for (k, n), row in stats.items()
        if k == kind and (n == name if exact else n.startswith(name))
    )


def start_fleet(procs: Procs, tmp_path: Path) -> str:
    """chat-a on two servers (so conversations can lose theirs), chat-b and embed-a beside."""
    ports = [free_port() for _ in range(3)]
    one = procs.mock(ports[0], "chat-a", name="m1", extra=MOCK_SPEED)
    two = procs.mock(ports[1], "chat-a", "chat-b", "embed-a", name="m2", extra=MOCK_SPEED)
    three = procs.mock(ports[2], "embed-a", name="m3", extra=MOCK_SPEED)
    fleet = {"chat-a": [one, two], "chat-b": [two], "embed-a": [two, three]}
    models = "".join(f'[models."{m}"]\nservers = {json.dumps(urls)}\n' for m, urls in fleet.items())
    # Bounded loads may move a conversation off a busy server by design; lifted here so that
    # any conversation that changes server is a bug in affinity, not a load decision.
    config = tmp_path / "edge.toml"
    config.write_text(f"[routing]\nload_factor = 1000.0\n{models}")
    port = free_port()
    procs.edge(port, "--config", str(config))
    return f"http://127.0.0.1:{port}"


def run_locust(host: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    prefix = tmp_path / "run"
    env = dict(
        os.environ, EDGE_CHAT_MODELS="chat-a,chat-b", EDGE_EMBED_MODELS="embed-a", EDGE_TURNS="3"
    )
    cmd = [
        str(LOCUST), "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
        "-u", "20", "-r", "20", "-t", "6s", "--stop-timeout", "5", "--host", host,
        "--csv", str(prefix), "--exit-code-on-error", "1", "--only-summary",
        "--loglevel", "WARNING",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=45, cwd=ROOT)
    return done, prefix


def read_stats(prefix: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


def test_locust_run_through_the_edge_has_no_failure(procs: Procs, tmp_path: Path) -> None:
    host = start_fleet(procs, tmp_path)
    done, prefix = run_locust(host, tmp_path)
    report = f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    with open(f"{prefix}_failures.csv", newline="") as f:
        failures = list(csv.DictReader(f))
    assert failures == [], report
    assert done.returncode == 0, report
    stats = read_stats(prefix)
    total = stats[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0, report
    assert int(total["Request Count"]) >= 100, report
    for what, (kind, name) in EXPECTED_ROWS.items():
        assert requests_made(stats, kind, name) > 0, f"{what} made no request\n{report}"
    ttft = stats[EXPECTED_ROWS["streamed TTFT"]]
    assert 0 < float(ttft["Median Response Time"]) < 10_000, "time to first token is measured"
