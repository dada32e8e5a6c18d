"""The benchmark's markdown: one row per target, then the edge against the issue's bar."""

from __future__ import annotations

import math
import operator
import statistics
from collections.abc import Callable
from typing import Any

MB = 1024 * 1024


def _num(value: Any, fmt: str = "{:,.0f}", unit: str = "") -> str:
    if not isinstance(value, int | float) or math.isnan(value):
        return "-"
    return fmt.format(value) + unit


def _get(doc: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


def _added(results: dict[str, Any], name: str, q: str) -> float | None:
    mine, direct = _get(results, name, "f2", q), _get(results, "direct", "f2", q)
    return mine - direct if isinstance(mine, float) and isinstance(direct, float) else None


def _others(r: dict[str, Any], phase: str) -> str:
    others = _get(r, phase, "core0_others_pct")
    return f" (others took {others:.0f}% of core 0)" if others and others >= 5 else ""


def _f1(r: dict[str, Any]) -> str:
    rps, errors = _get(r, "f1", "rps"), _get(r, "f1", "errors")
    return _num(rps) + (f" ({errors} errors)" if errors else "") + _others(r, "f1")


def _f3_intact(r: dict[str, Any]) -> str:
    f3 = r.get("f3") or {}
    if "streams" not in f3:
        return "-" if not f3 else f"error: {str(f3.get('error', '?'))[-80:]}"
    return "yes" if f3["intact"] == f3["streams"] else f"{f3['intact']}/{f3['streams']}"


def _f4(r: dict[str, Any], n: str) -> str:
    run = _get(r, "f4", n)
    if not run:
        return "-"
    if "rss_open" not in run:
        return "error"
    done = (
        "" if run["completed"] == run["streams"] else f" ({run['completed']}/{run['streams']} done)"
    )
    return _num(run["rss_open"] / MB, "{:,.0f}", " MB") + done


def rows(results: dict[str, Any], big: int) -> list[str]:
    head = (
        "| target | F1 req/s (median) | F1 CPU/req | F2 p50 | F2 p99 | F2 p99 added "
        "| F3 CPU/chunk | F3 first chunk p50 | F3 bytes intact "
        f"| F4 RSS idle | F4 RSS 1,000 | F4 RSS {big:,} |"
    )
    out = [head, "| " + " | ".join(["---"] * (head.count("|") - 1)) + " |"]
    for name, r in results.items():
        if "f2" not in r and ("f1" in r or "f5" in r):
            continue  # F5's rows are reported below
        if "error" in r and "f1" not in r:
            out.append(f"| {name} | not measured: {r['error'][:120]} |" + " |" * 10)
            continue
        ms = "{:.2f}"
        added = _added(results, name, "p99_ms")
        cells = [
            name, _f1(r), _num(_get(r, "f1", "cpu_us_per_req"), unit=" us"),
            _num(_get(r, "f2", "p50_ms"), ms, " ms"),
            _num(_get(r, "f2", "p99_ms"), ms, " ms") + _others(r, "f2"),
            _num(added, "{:+.2f}", " ms") if name != "direct" else "(baseline)",
            _num(_get(r, "f3", "cpu_us_per_chunk"), "{:,.1f}", " us"),
            _num(_get(r, "f3", "ttfc_p50_ms"), "{:.1f}", " ms"), _f3_intact(r),
            _num((_get(r, "f4", "rss_start") or math.nan) / MB, "{:,.0f}", " MB"),
            _f4(r, "1000"), _f4(r, str(big)),
        ]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return out


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("**pass**" if ok else "miss")


def _per_round(mine: Any, theirs: Any, op: Callable[[float, float], float]) -> float | None:
    """The median of `op` over the rounds, pairing each round of one target with the same round
    of another: rounds taken seconds apart share the machine's state, so this moves less with
    its drift than `op` of the two medians."""
    if not isinstance(mine, list) or not isinstance(theirs, list) or len(mine) != len(theirs):
        return None
    pairs = [(a, b) for a, b in zip(mine, theirs, strict=True) if a is not None and b]
    return statistics.median(op(a, b) for a, b in pairs) if pairs else None


def bar(results: dict[str, Any], big: int, cpus: int = 2) -> list[str]:
    e, n, v = (results.get(k, {}) for k in ("edge", "nginx", "vllm-router"))
    f1_v = _ratio(_get(e, "f1", "rps"), _get(v, "f1", "rps"))
    f1_n = _ratio(_get(e, "f1", "rps"), _get(n, "f1", "rps"))
    f1_paired = _per_round(_get(e, "f1", "runs_rps"), _get(v, "f1", "runs_rps"), operator.truediv)
    # CPU per request compares the work done, whatever share of core 0 others took meanwhile.
    cpu_v = _ratio(_get(v, "f1", "cpu_us_per_req"), _get(e, "f1", "cpu_us_per_req"))
    p99 = _added(results, "edge", "p99_ms")
    p99_paired = _per_round(
        _get(e, "f2", "runs_p99_ms"), _get(results, "direct", "f2", "runs_p99_ms"), operator.sub
    )
    f3_v = _ratio(_get(e, "f3", "cpu_us_per_chunk"), _get(v, "f3", "cpu_us_per_chunk"))
    f3_n = _ratio(_get(e, "f3", "cpu_us_per_chunk"), _get(n, "f3", "cpu_us_per_chunk"))
    small, large = _get(e, "f4", "1000"), _get(e, "f4", str(big))
    w2 = _get(results, "edge --workers 2", "f1", "rps")
    f5 = _ratio(w2, _get(e, "f1", "rps"))
    f5_cpu = _ratio(
        _get(results, "edge --workers 2", "f1", "cpu_us_per_req"), _get(e, "f1", "cpu_us_per_req")
    )
    q = _get(results, "edge, quota", "f5") or {}
    q1, q2 = q.get("--workers 1") or {}, q.get("--workers 2") or {}
    f5_q = _ratio(q2.get("rps"), q1.get("rps"))
    f5_q_paired = _per_round(q2.get("runs_rps"), q1.get("runs_rps"), operator.truediv)
    share = f"{q['share']:g} of a core" if "share" in q else "a share of a core"

    def complete(run: Any) -> bool:
        return isinstance(run, dict) and run.get("completed") == run.get("streams")

    def rss(run: Any) -> float | None:
        return run["rss_open"] / MB if isinstance(run, dict) and "rss_open" in run else None

    def le(x: float | None, limit: float) -> bool | None:
        return None if x is None else x <= limit

    def ge(x: float | None, limit: float) -> bool | None:
        return None if x is None else x >= limit

    def fits(run: Any, limit_mb: float) -> bool | None:
        size = rss(run)
        return None if size is None else size < limit_mb and complete(run)

    x, mb = "{:.2f}x", "{:,.0f} MB"
    # With fewer than 3 cores the second worker shares a core with wrk and the upstream, so
    # the ratio is bounded by the machine, not the edge: judged only where it can be measured.
    f5_ok = ge(f5, 1.8) if cpus >= 3 else None
    lines = [
        ("F1 req/s vs vllm-router", _num(f1_v, x), ">= 1.0x", ge(f1_v, 1.0)),
        (
            "F1 req/s vs vllm-router, median of round-by-round ratios",
            _num(f1_paired, x),
            "(information)",
            None,
        ),
        ("F1 req/s vs nginx (stretch)", _num(f1_n, x), ">= 0.5x", ge(f1_n, 0.5)),
        ("F1 req per CPU-second vs vllm-router", _num(cpu_v, x), ">= 1.0x", ge(cpu_v, 1.0)),
        ("F2 p99 added @300/s", _num(p99, "{:+.2f} ms"), "< 1 ms", le(p99, 0.999)),
        (
            "F2 p99 added, median of round-by-round differences",
            _num(p99_paired, "{:+.2f} ms"),
            "(information)",
            None,
        ),
        (
            "F2 p99 added by nginx / by vllm-router, same rounds",
            _num(_added(results, "nginx", "p99_ms"), "{:+.2f} ms")
            + " / "
            + _num(_added(results, "vllm-router", "p99_ms"), "{:+.2f} ms"),
            "(information: the machine's share)",
            None,
        ),
        ("F3 CPU/chunk vs vllm-router", _num(f3_v, x), "<= 1.0x", le(f3_v, 1.0)),
        ("F3 CPU/chunk vs nginx (stretch)", _num(f3_n, x), "<= 1.5x", le(f3_n, 1.5)),
        ("F4 RSS, 1,000 open streams", _num(rss(small), mb), "< 64 MB, all done", fits(small, 64)),
        (
            f"F4 RSS, {big:,} open streams",
            _num(rss(large), mb),
            "< 1 GB, all done",
            fits(large, 1024),
        ),
        (
            f"F5 --workers 2 / --workers 1, each worker held to {share}",
            _num(f5_q, x),
            ">= 1.8x",
            ge(f5_q, 1.8),
        ),
        (
            "F5 with quotas, median of round-by-round ratios",
            _num(f5_q_paired, x),
            "(information)",
            None,
        ),
        ("F5 --workers 2 / --workers 1, unbounded", _num(f5, x), ">= 1.8x (needs 3+ cores)", f5_ok),
        ("F5 CPU/req, --workers 2 / --workers 1", _num(f5_cpu, x), "~1.0x (no shared cost)", None),
    ]
    out = ["| figure | edge | bar | result |", "| --- | --- | --- | --- |"]
    out += [
        f"| {what} | {value} | {target} | {_verdict(ok)} |" for what, value, target, ok in lines
    ]
    return out


def _f5_quota(q: dict[str, Any]) -> str:
    if "error" in q or not q:
        return f"F5 with CPU quotas not measured: {q.get('error', 'not run')}."
    one, two = q.get("--workers 1") or {}, q.get("--workers 2") or {}
    return (
        f"F5 with CPU quotas (loadtests/bench/quota.py): each worker pinned to a core of its own "
        f"and held to {q['share']:g} of it, so both fit beside the load on 2 cores: `--workers 2` "
        f"{_num(two.get('rps'))} req/s at {_num(two.get('cpu_us_per_req'), unit=' us')} CPU/req, "
        f"`--workers 1` {_num(one.get('rps'))} req/s at "
        f"{_num(one.get('cpu_us_per_req'), unit=' us')} CPU/req; the quota bound in "
        f"{q.get('throttled_periods', 0):,} periods of 10 ms."
    )


def markdown(document: dict[str, Any]) -> str:
    meta, results = document["meta"], document["results"]
    big = meta["f4_big"]
    w1, w2 = _get(results, "edge", "f1"), _get(results, "edge --workers 2", "f1")
    notes = [
        f"# edge benchmark, {meta['date']}",
        "",
        f"{meta['cpus']} CPUs; proxy pinned to core 0, load and upstreams to core 1; load average "
        f"{meta['loadavg_start']:.2f} at start, {meta['loadavg_end']:.2f} at end "
        f"(other work on the machine moves the numbers; the ratios are what count). "
        f"{meta['seconds']} s in all.",
        f"Non-streaming upstream: {meta['plain_upstream']}; streams: loadtests/bench/upstream.py. "
        f"{meta['nginx']}; vllm-router {meta['vllm_router']} (one tokio worker thread, "
        f"round robin, retries, circuit breaker and health checks off); {meta['wrk']}.",
        "",
        *rows(results, big),
        "",
        f"F5: edge `--workers 2` (cores 0 and 1, sharing core 1 with wrk and the upstream): "
        f"{_num(_get(w2, 'rps'))} req/s at {_num(_get(w2, 'cpu_us_per_req'), unit=' us')} CPU/req; "
        f"`--workers 1` (core 0): {_num(_get(w1, 'rps'))} req/s at "
        f"{_num(_get(w1, 'cpu_us_per_req'), unit=' us')} CPU/req.",
        _f5_quota(_get(results, "edge, quota", "f5") or {}),
    ]
    if meta.get("quick"):
        notes.append("BENCH_QUICK=1: a smoke run with short phases; do not quote these figures.")
    elif big < 10000:
        notes.append(
            f"F4 opens {big:,} streams, not 10,000: the open-file limit here is {meta['nofile']:,} "
            "per process (and cannot be raised) and a proxy holds two sockets per relayed "
            "stream, plus its idle keep-alive pools."
        )
    for name, r in results.items():
        if "error" in r:
            notes.append(f"{name}: {r['error'][:300]}")
    for tool, why in (meta.get("missing") or {}).items():
        notes.append(f"{tool}: {why}.")
    if not str(meta["vllm_router"])[:1].isdigit():
        notes.append(f"vllm-router: {meta['vllm_router']}.")
    notes += [
        "",
        "## The bar (edge: one worker, one core; ratios from this run)",
        "",
        *bar(results, big, meta.get("cpus") or 2),
        "",
    ]
    return "\n".join(notes)
