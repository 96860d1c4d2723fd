"""Operational state of a node and its Prometheus metrics.

`NodeStatus` is what `plc serve` tells the API about ingest: the role ("ingester", or "reader"
with --no-ingest), the upstream URL, the running `Ingestor` (its cursor, newest createdAt and
counters), the time of the last committed batch and the last ingest failure. Counters survive
ingest restarts: when a new Ingestor is attached, the previous one's counters are folded into
the totals.

`Metrics(status, version)` holds a CollectorRegistry of its own (never the process-global one,
so several apps in one process, e.g. in tests, do not clash): request counts and latency by
route, filled by the API's middleware, and the ingest state read from `status` at scrape time.
`render()` gives the Prometheus text exposition.

Lag behind the upstream is measured in seconds: now − createdAt of the newest op ingested. The
upstream publishes no head seq that could be read without extra requests, so lag in ops is not
exported; the cursor (last committed seq) is, and can be compared with the upstream's.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

INGESTER = "ingester"
READER = "reader"
UPSTREAM_OK = "ok"
UPSTREAM_IDLE = "idle"

# The classic text format (every name here is a legacy-valid one, so the body is the same as
# the 1.0.0 format newer prometheus-client versions announce); every Prometheus version reads it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_SCALAR_COUNTERS = ("batches", "accepted", "stored", "skipped_duplicates")
_KEYED_COUNTERS = ("rejected", "divergences")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class StatusSource(Protocol):
    """What the operational endpoints read (`NodeStatus`, or a stand-in in tests)."""

    role: str
    upstream: str | None

    @property
    def upstream_state(self) -> str: ...
    @property
    def cursor(self) -> int | None: ...
    @property
    def high_created_ms(self) -> int | None: ...
    @property
    def last_commit_s(self) -> float | None: ...
    def counters(self) -> dict[str, Any]: ...
    def lag_seconds(self) -> float | None: ...


def leads(status: Any) -> bool:
    """Whether the node holds the ingest lock (a stand-in status without the notion: yes)."""
    return bool(getattr(status, "ingest_leader", True))


def empty_counters() -> dict[str, Any]:
    """The counters of a node that has ingested nothing."""
    return {**{k: 0 for k in _SCALAR_COUNTERS}, **{k: {} for k in _KEYED_COUNTERS}}


class NodeStatus:
    """The node's ingest state, updated by `plc serve` and read by /metrics and /-/status."""

    def __init__(self, *, ingest: bool, upstream: str | None, clock: Callable[[], float] = time.time):
        self.role = INGESTER if ingest else READER
        self.upstream = upstream
        self.clock = clock
        self.ingestor: Any = None  # the current (or last) Ingestor
        self.last_commit_s: float | None = None
        self.last_error: str | None = None
        self.leader_epoch: int | None = None  # the ingest lock's epoch while this node leads
        self._base = empty_counters()  # totals of the ingestors before the current one

    def attach(self, ingestor: Any) -> None:
        """A new Ingestor starts; the previous one's counters become part of the totals."""
        if self.ingestor is not None and self.ingestor is not ingestor:
            self._base = _add(self._base, self.ingestor.metrics())
        self.ingestor = ingestor

    def lead(self, epoch: int) -> None:
        """This node took the ingest lock (epoch `epoch`)."""
        self.leader_epoch = epoch

    def standby(self) -> None:
        """This node does not (or no longer) hold the ingest lock."""
        self.leader_epoch = None

    @property
    def ingest_leader(self) -> bool:
        return self.leader_epoch is not None

    def committed(self) -> None:
        """A batch was committed (the upstream answers again, if it had failed)."""
        self.last_commit_s = self.clock()
        self.last_error = None

    def failed(self, error: str) -> None:
        """Ingest failed with `error` (one line); it is the upstream state until a commit."""
        self.last_error = error

    @property
    def upstream_state(self) -> str:
        """"idle" (no ingest, or not started), "ok", or the text of the last failure."""
        if self.last_error is not None:
            return self.last_error
        if self.role == READER or self.ingestor is None:
            return UPSTREAM_IDLE
        return UPSTREAM_OK

    @property
    def cursor(self) -> int | None:
        return None if self.ingestor is None else self.ingestor.cursor

    @property
    def high_created_ms(self) -> int | None:
        return None if self.ingestor is None else self.ingestor.high_created_ms

    def counters(self) -> dict[str, Any]:
        """batches, accepted, stored, skipped_duplicates, rejected (reason → n) and
        divergences (kind → n), summed over every ingestor this node ran."""
        if self.ingestor is None:
            return _add(self._base, empty_counters())
        return _add(self._base, self.ingestor.metrics())

    def lag_seconds(self) -> float | None:
        """now − createdAt of the newest op ingested (None before any)."""
        return lag_seconds(self.high_created_ms, self.clock())


def lag_seconds(high_created_ms: int | None, now_s: float) -> float | None:
    if high_created_ms is None:
        return None
    return round(max(0.0, now_s - high_created_ms / 1000), 3)


def _add(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: a.get(k, 0) + b.get(k, 0) for k in _SCALAR_COUNTERS}
    for k in _KEYED_COUNTERS:
        total: collections.Counter[str] = collections.Counter(a.get(k) or {})
        total.update(b.get(k) or {})
        out[k] = dict(total)
    return out


class _StatusCollector:
    """The ingest state as metric families, read from the status at every scrape."""

    def __init__(self, status: StatusSource, version: str):
        self.status = status
        self.version = version

    def collect(self) -> Iterator[Metric]:
        st = self.status
        info = GaugeMetricFamily("plc_node_info", "This node: version and role (always 1)",
                                 labels=["version", "role"])
        info.add_metric([self.version, st.role], 1)
        yield info
        if st.role != INGESTER:
            return
        yield GaugeMetricFamily("plc_ingest_leader", "1 while this node holds the ingest lock (it alone "
                                "ingests), 0 while it waits for it", value=1 if leads(st) else 0)
        yield GaugeMetricFamily("plc_upstream_up", "1 when ingest from the upstream has not failed since "
                                "its last commit", value=1 if st.upstream_state == UPSTREAM_OK else 0)
        if st.cursor is not None:
            yield GaugeMetricFamily("plc_ingest_cursor", "Last upstream seq committed", value=st.cursor)
        lag = st.lag_seconds()
        if lag is not None:
            yield GaugeMetricFamily("plc_ingest_lag_seconds",
                                    "Seconds between now and the createdAt of the newest op ingested",
                                    value=lag)
            yield GaugeMetricFamily("plc_ingest_newest_created_timestamp_seconds",
                                    "createdAt of the newest op ingested (Unix time)",
                                    value=(st.high_created_ms or 0) / 1000)
        if st.last_commit_s is not None:
            yield GaugeMetricFamily("plc_ingest_last_commit_timestamp_seconds",
                                    "When the last batch was committed (Unix time)", value=st.last_commit_s)
        c = st.counters()
        yield CounterMetricFamily("plc_ingest_batches", "Batches committed", value=c["batches"])
        yield CounterMetricFamily("plc_ingest_ops_accepted", "Ops that passed validation",
                                  value=c["accepted"])
        yield CounterMetricFamily("plc_ingest_ops_stored", "Ops inserted into the database",
                                  value=c["stored"])
        yield CounterMetricFamily("plc_ingest_ops_skipped_duplicates",
                                  "Ops already stored with the same createdAt (page overlap, replays)",
                                  value=c["skipped_duplicates"])
        rejected = CounterMetricFamily("plc_ingest_ops_rejected", "Ops refused, by reason", labels=["reason"])
        for reason, n in sorted(c["rejected"].items()):
            rejected.add_metric([reason], n)
        yield rejected
        divergences = CounterMetricFamily("plc_ingest_divergences", "Divergences from the upstream, by kind",
                                          labels=["kind"])
        for kind, n in sorted(c["divergences"].items()):
            divergences.add_metric([kind], n)
        yield divergences


class Metrics:
    """One app's metrics in their own registry (see the module docstring)."""

    def __init__(self, status: StatusSource, version: str):
        self.registry = CollectorRegistry()
        self.requests = Counter("plc_http_requests", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("plc_http_request_duration_seconds", "Time to answer a request, by route",
                                 ["route"], registry=self.registry)
        self.registry.register(_StatusCollector(status, version))

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request (an unknown method is counted as "other")."""
        method = method if method in _METHODS else "other"
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE
