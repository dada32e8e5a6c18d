"""Workers sharing their Prometheus samples: with `--workers N`, /metrics on any worker reports
the sum over all of them.

Each worker writes its samples to its own file in a directory the supervisor made; a scrape
merges the worker's own samples with its siblings' files: counters and histograms are summed,
gauges merged per `GAUGE_MERGE`. A dead worker's counters stay in the sum (its gauges do not), so
totals do not drop when the supervisor replaces it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

# How each gauge is merged over workers; any other gauge takes the maximum.
GAUGE_MERGE = {
    "edge_inflight_requests": "sum",
    "edge_queue_length": "sum",  # each worker queues its own requests
    "edge_server_up": "mean",  # the share of workers that consider the server up
    "edge_server_score_seconds": "mean",
}

Doc = list[Any]  # [name, type, help, [[sample name, labels, value], ...]] per family


class Shared:
    """This worker's file in the shared directory, and the merge of everyone's."""

    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)
        self.pid = os.getpid()
        self.path = self.dir / f"worker-{self.pid}.json"

    def write(self, families: Iterable[Metric]) -> list[Doc]:
        docs = [_doc(fam) for fam in families]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps({"pid": self.pid, "families": docs}))
        os.replace(tmp, self.path)  # readers see the old file or the new one, never half
        return docs

    def merged(self, families: Iterable[Metric]) -> _Frozen:
        own = self.write(families)
        docs = [own]
        for path in self.dir.glob("worker-*.json"):
            if path != self.path:
                docs.extend(_read_sibling(path))
        return _Frozen(_merge(docs))

    def __repr__(self) -> str:
        return f"<Shared {self.dir} pid={self.pid}>"


def _doc(fam: Metric) -> Doc:
    # `_created` samples are timestamps: summing them over workers means nothing.
    samples = [[s.name, s.labels, s.value] for s in fam.samples if not s.name.endswith("_created")]
    return [fam.name, fam.type, fam.documentation, samples]


def _read_sibling(path: Path) -> list[list[Doc]]:
    try:
        data = orjson.loads(path.read_bytes())
        docs: list[Doc] = data["families"]
        pid = int(data["pid"])
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return []  # a worker mid-start or a stray file: skip it this time
    if not _alive(pid):
        docs = [d for d in docs if d[1] != "gauge"]  # its counts happened; its state is gone
    return [docs]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _merge(workers: list[list[Doc]]) -> list[Metric]:
    order: dict[str, tuple[str, str]] = {}
    values: dict[str, dict[tuple[str, str], list[float]]] = {}
    for docs in workers:
        for name, typ, doc, samples in docs:
            order.setdefault(name, (typ, doc))
            series = values.setdefault(name, {})
            for sname, labels, value in samples:
                key = (sname, orjson.dumps(labels).decode())
                series.setdefault(key, []).append(value)
    out = []
    for name, (typ, doc) in order.items():
        how = GAUGE_MERGE.get(name, "max") if typ == "gauge" else "sum"
        fam = Metric(name, doc, typ)
        for (sname, labels), got in values[name].items():
            fam.add_sample(sname, orjson.loads(labels), _reduce(how, got))
        out.append(fam)
    return out


def _reduce(how: str, values: list[float]) -> float:
    if how == "sum":
        return sum(values)
    if how == "mean":
        return sum(values) / len(values)
    return max(values)


class _Frozen(Collector):
    """Families already merged, for the exposition code."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def remove_shared(directory: str) -> None:
    """Delete the shared directory the supervisor made (at exit)."""
    with contextlib.suppress(OSError):
        for path in Path(directory).iterdir():
            path.unlink()
        Path(directory).rmdir()
