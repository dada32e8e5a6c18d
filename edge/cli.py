"""`edge serve | mock | demo | keys | route`: the command line, turned into a Config for app.run."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import uvloop

from edge import app
from edge.access import keys
from edge.config import Config, ConfigError, load
from edge.dev import mock
from edge.direct import route as direct_route


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    app.configure_logging()
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        print(f"edge: {exc}", file=sys.stderr)
        return 2
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy")
    _serve_arguments(serve)
    serve.set_defaults(run=_serve)

    mock_cmd = commands.add_parser("mock", help="run a fake OpenAI-compatible model server")
    mock.add_arguments(mock_cmd)
    mock_cmd.set_defaults(run=_mock)

    demo = commands.add_parser("demo", help="the edge in front of three mock servers")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--mock-port", type=int, default=9101, help="first of three mock ports")
    demo.set_defaults(run=_demo)

    keys_cmd = commands.add_parser("keys", help="create, list and revoke API keys")
    keys.add_arguments(keys_cmd)
    keys_cmd.set_defaults(run=keys.run)

    # edge.direct's placement, from a shell (edge/direct/route.py): needs no httpx2.
    route_cmd = commands.add_parser("route", help="the hosts a request would try, in order")
    direct_route.add_arguments(route_cmd)
    route_cmd.set_defaults(run=direct_route.run)
    return parser


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config file (see config/edge.toml)")
    parser.add_argument("--host", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default 8080)")
    parser.add_argument("--workers", type=int, help="processes sharing the port (default 1)")
    parser.add_argument(
        "--models",
        nargs="+",
        action="extend",
        metavar="SRC",
        help="registry URL (.../libertai/models) or JSON file {model: {servers: [...]}}",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    return load(
        args.config,
        server__host=args.host,
        server__port=args.port,
        server__workers=args.workers,
        discovery__sources=args.models,
    )


def _serve(args: argparse.Namespace) -> int:
    return app.run(config_from_args(args), args.config)


def _mock(args: argparse.Namespace) -> int:
    opts = mock.options_from_args(args)

    async def run() -> None:
        task = asyncio.create_task(mock.serve(opts))
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    uvloop.run(run())
    return 0


DEMO_FLEET = (
    ("mock-1", ("demo-chat",)),
    ("mock-2", ("demo-chat", "demo-embed")),
    ("mock-3", ("demo-embed",)),
)


def _demo(args: argparse.Namespace) -> int:
    procs: list[subprocess.Popen[bytes]] = []
    registry: dict[str, dict[str, list[str]]] = {}
    try:
        for i, (name, models) in enumerate(DEMO_FLEET):
            port = args.mock_port + i
            cmd = [sys.executable, "-m", "edge", "mock", "--port", str(port), "--name", name]
            cmd += [a for m in models for a in ("--model", m)] + ["--ttft-ms", "50"]
            # Same process group as the demo: Ctrl-C reaches the mocks too, and a test
            # harness that kills the demo's group leaves no mock behind.
            procs.append(subprocess.Popen(cmd + ["--chunk-ms", "20"]))
            for model in models:
                registry.setdefault(model, {"servers": []})["servers"].append(
                    f"http://127.0.0.1:{port}"
                )
            _wait_healthy(f"http://127.0.0.1:{port}/health")
        fleet = Path(tempfile.mkdtemp(prefix="edge-demo-")) / "fleet.json"
        fleet.write_text(json.dumps(registry, indent=2))
        print(demo_text(args.port, registry), flush=True)
        config = load(None, server__port=args.port, discovery__sources=[str(fleet)])
        return app.run(config)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


def _wait_healthy(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"edge demo: {url} did not come up") from None
            time.sleep(0.1)


def demo_text(port: int, registry: dict[str, dict[str, list[str]]]) -> str:
    """What `edge demo` prints: the fleet, and commands that work as printed."""
    base = f"http://127.0.0.1:{port}"
    fleet = "\n".join(f"  {m}: {', '.join(e['servers'])}" for m, e in registry.items())
    return f"""
edge demo: three mock model servers, two models
{fleet}

Try it (Ctrl-C stops everything):

  curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "demo-chat", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

  curl -sN {base}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "demo-chat", "stream": true, "messages": [{{"role": "user", "content": "Hi"}}]}}'

  .venv/bin/python - <<'EOF'
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="demo")
reply = client.chat.completions.create(
    model="demo-chat", messages=[{{"role": "user", "content": "Hello!"}}])
print(reply.choices[0].message.content, "from", reply.system_fingerprint)
for chunk in client.chat.completions.create(
        model="demo-chat", stream=True, messages=[{{"role": "user", "content": "Hi"}}]):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
EOF

  curl -s {base}/v1/models ; curl -s {base}/metrics | grep ^edge_requests
"""


if __name__ == "__main__":
    sys.exit(main())
