"""The figures of a chaos run (a JSON-ready dict) and the table printed from them."""

from __future__ import annotations

from collections import Counter
from typing import Any

from loadtests.chaos.load import CUT, HUNG, OK, Load, Tally

SOCKET_SLACK_PER_WORKER = 2  # a probe or registry connection being replaced when sampled
MIB = 1024 * 1024


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def _phase(entry: dict[str, Any], tally: Tally, quiet: Tally | None) -> dict[str, Any]:
    p50, p99 = percentile(tally.head_s, 50), percentile(tally.head_s, 99)
    q50 = percentile(quiet.head_s, 50) if quiet else None
    q99 = percentile(quiet.head_s, 99) if quiet else None
    added = {
        "p50": _ms(p50 - q50) if p50 is not None and q50 is not None else None,
        "p99": _ms(p99 - q99) if p99 is not None and q99 is not None else None,
    }
    failed = {k: n for k, n in sorted(tally.outcomes.items()) if k != OK}
    return {
        **entry, "sent": tally.sent, "ok": tally.ok, "failed": failed,
        "head_ms": {"p50": _ms(p50), "p99": _ms(p99)}, "added_ms": added,
    }  # fmt: skip


def figures(
    load: Load, timeline: list[dict[str, Any]], start: dict[str, Any], end: dict[str, Any],
    drained: dict[str, Any], log: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    quiet = load.tallies.get("quiet")
    phases = [_phase(e, load.tally(e["phase"]), quiet) for e in timeline]
    outcomes: Counter[str] = Counter()
    for tally in load.tallies.values():  # the warm-up's requests too: every one is accounted
        outcomes.update(tally.outcomes)
    sent = sum(t.sent for t in load.tallies.values())
    ok = outcomes[OK]
    failed = {k: n for k, n in sorted(outcomes.items()) if k != OK}
    slack = SOCKET_SLACK_PER_WORKER * len(start["workers"])
    finished = sum(s == OK for s in drained["streams"])
    totals = {
        "sent": sent, "ok": ok, "failed": sum(failed.values()), "failed_by_cause": failed,
        "streams_cut_without_error_event": outcomes[CUT], "hung": outcomes[HUNG],
        "unaccounted": sent - ok - sum(failed.values()), "load_errors": load.errors,
    }  # fmt: skip
    goals = {
        "no stream cut without an error event": outcomes[CUT] == 0,
        f"no request hung past its {load.deadline_s:g} s deadline": outcomes[HUNG] == 0,
        "every request accounted for": totals["unaccounted"] == 0 and not load.errors,
        "no malformed answer": outcomes["malformed"] == 0,
        "sockets back to the start level": end["sockets"] <= start["sockets"] + slack,
        "drained: every stream finished, exit 0": (
            drained["exit_code"] == 0 and finished == len(drained["streams"])
        ),
        "no worker restarted": start["workers"] == end["workers"],
    }
    edge = {
        "sockets_start": start["sockets"], "sockets_end": end["sockets"], "socket_slack": slack,
        "peers_start": start["peers"], "peers_end": end["peers"],
        "fds_start": start["fds"], "fds_end": end["fds"],
        # Closed by the peer seconds ago, still held: idle pooled connections to a dead server.
        "half_closed_end": half_closed(end["peers"]),
        "rss_start_mib": round(start["rss"] / MIB, 1), "rss_end_mib": round(end["rss"] / MIB, 1),
        "workers_start": start["workers"], "workers_end": end["workers"], "log": log,
    }  # fmt: skip
    return {
        "phases": phases, "totals": totals, "edge": edge, "drain": drained,
        "goals": goals, "goals_met": all(goals.values()),
    }  # fmt: skip


def half_closed(peers: dict[str, int]) -> int:
    return sum(n for name, n in peers.items() if name.endswith("(CLOSE_WAIT)"))


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"


def _peers(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items())


def table(report: dict[str, Any]) -> str:
    s, t, e, d = report["settings"], report["totals"], report["edge"], report["drain"]
    mode = "keys mode, Redis" if s["keys_mode_redis"] else "passthrough, no Redis"
    lines = [
        f"edge chaos: {s['workers']} workers, {s['users']} users, {s['duration_s']:g} s of "
        f"phases, {mode}; latency = time to the response head of answers that succeeded",
        "",
        f"{'phase':<9} {'at s':>6} {'sent':>6} {'ok':>6} {'failed':>6} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'+p50':>7} {'+p99':>7}  failures",
    ]
    for p in report["phases"]:
        causes = ", ".join(f"{k} x{n}" for k, n in p["failed"].items()) or "-"
        lines.append(
            f"{p['phase']:<9} {p['at_s']:>6.1f} {p['sent']:>6} {p['ok']:>6} "
            f"{sum(p['failed'].values()):>6} {_num(p['head_ms']['p50']):>7} "
            f"{_num(p['head_ms']['p99']):>7} {_signed(p['added_ms']['p50']):>7} "
            f"{_signed(p['added_ms']['p99']):>7}  {causes}"
        )
    lines.append(f"{'all':<9} {'':>6} {t['sent']:>6} {t['ok']:>6} {t['failed']:>6}  (warm-up too)")
    lines += ["", "faults:"] + [f"  {p['phase']:<9} {p['fault']}" for p in report["phases"]]
    streams = d["streams"]
    lines += [
        "",
        f"edge workers: sockets {e['sockets_start']} at the start, {e['sockets_end']} at the "
        f"end (slack {e['socket_slack']}), {e['half_closed_end']} of them half-closed "
        f"(CLOSE_WAIT); descriptors {e['fds_start']} -> {e['fds_end']}; "
        f"RSS {e['rss_start_mib']} MiB -> {e['rss_end_mib']} MiB",
        f"  by peer at the start: {_peers(e['peers_start'])}",
        f"  by peer at the end:   {_peers(e['peers_end'])}",
        "streams continued on another host after a break (edge_continuations_total): "
        + ", ".join(f"{k} {v}" for k, v in report.get("continuations", {}).items()),
        f"drain: {sum(x == 'ok' for x in streams)}/{len(streams)} streams finished, exit "
        f"{d['exit_code']} {d['seconds']} s after SIGTERM",
        f"edge log: {e['log']['tracebacks']} tracebacks; "
        f"ERROR lines: {'; '.join(e['log']['errors']) or 'none'}",
        "",
        "goals:",
    ]
    lines += [f"  [{'ok' if met else 'FAILED'}] {goal}" for goal, met in report["goals"].items()]
    return "\n".join(lines)
