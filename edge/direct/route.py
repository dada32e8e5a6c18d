"""`edge route MODEL --models SRC [--session KEY | --prompt TEXT]`: the hosts a request would
try, in order, as edge.direct and `edge serve` route it, for debugging placement from a shell.

The sources are read once; every host counts as up (no request has taught anything yet), so
the first host is the affinity key's home (rendezvous hashing: the same on every edge and every
library process), and the rest are the policy's order among the others (for the latency policy,
a random two-choice draw while no host has statistics)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from edge.config import ConfigError
from edge.direct.router import Router
from edge.direct.settings import settings_from
from edge.errors import EdgeError
from edge.routing.balance import Decision
from edge.routing.fleet import Host


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the model id, as requests name it")
    parser.add_argument(
        "--models", nargs="+", action="extend", metavar="SRC", required=True,
        help="registry URL (.../libertai/models) or JSON file {model: {servers: [...]}}",
    )  # fmt: skip
    parser.add_argument("--config", help="edge TOML file: its [routing] settings apply")
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--session", metavar="KEY", help="the request's X-Session-ID")
    key.add_argument("--prompt", metavar="TEXT", help="the first user message (no session)")
    parser.add_argument("--policy", help="X-Edge-Route: the policy for this request")


def run(args: argparse.Namespace) -> int:
    settings = settings_from(sources=args.models, config=args.config, first_view_timeout_s=30.0)
    router = Router(settings)
    headers = {}
    if args.session:
        headers[settings.config.routing.session_header] = args.session
    if args.policy:
        headers["X-Edge-Route"] = args.policy
    doc: dict[str, Any] = {"model": args.model}
    if args.prompt:
        doc["messages"] = [{"role": "user", "content": args.prompt}]
    try:
        decision, hosts = router.order(args.model, doc, headers)
    except EdgeError as err:
        print(f"edge route: {err.message}", file=sys.stderr)
        return 1
    except ConfigError:
        raise
    finally:
        router.close()
    for line in lines(decision, hosts):
        print(line)
    return 0


def lines(decision: Decision, hosts: list[Host]) -> list[str]:
    """One line per host: its place, its URL, why it is there."""
    out = []
    for i, host in enumerate(hosts, 1):
        out.append(f"{i}. {host.url}  ({_reason(decision, host, i)})")
    return out


def _reason(decision: Decision, host: Host, place: int) -> str:
    if host is decision.target:
        if decision.pinned:
            return "pinned"
        home = "home" if decision.affinity == "key_hit" else "next home: the home is loaded"
        return f"affinity: the {decision.key_kind} key's {home}"
    why = "first" if place == 1 else "then"
    return f"{why} by policy {decision.policy}"
