"""Prometheus metrics: counters fed by the gateway's `Events`, pool and task gauges read at scrape time.

Each app has its own `CollectorRegistry`, so several gateways in one process (tests) never clash.
Labels carry key and client *names*, route templates and fixed outcome words: never a secret or a raw id.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics import disable_created_metrics
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from .auth import bearer, matches
from .breaker import BreakerState
from .config import Secret
from .errors import GatewayError, error_response
from .events import Events
from .service import Gateway
from .store import KeyState

log = logging.getLogger("agnes_gateway.metrics")

NAMESPACE = "agnes_gateway"
#: prometheus_client reads this at import: when set, counters live in files that all workers add up.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The route label of requests that matched no route (404s, probes of random paths).
UNMATCHED_ROUTE = "unmatched"
#: Task statuses reported as they are; anything else upstream invents is counted as `other`.
TASK_STATUSES = ("queued", "in_progress", "completed", "failed", "unknown")
#: Seconds; creates may wait up to `upstream.timeout_s` (30 s by default) on upstream.
#: Counting tasks by status scans the whole task table (about 1 s per million rows in SQLite, during
#: which the store serves nothing else), so a scrape reuses a count younger than this.
TASK_COUNTS_MAX_AGE_S = 60.0
#: The classic text format, which every Prometheus version reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class StoreSnapshot:
    """What one scrape read from the store, just before the exposition is written."""

    now: datetime
    #: Units used today per key name; None when the store could not be read.
    usage: dict[str, int] | None
    #: Tasks by last seen status; None when the store could not be read.
    task_counts: dict[str, int] | None


class PoolCollector:
    """Quota, key states and task counts, computed at scrape time from the pool and a store snapshot."""

    def __init__(self) -> None:
        self.gateway: Gateway | None = None
        self.snapshot: StoreSnapshot | None = None
        self._counts: dict[str, int] | None = None
        self._counted_at = 0.0

    async def refresh(self) -> None:
        """Read what the exposition needs from the store (the collector itself cannot await)."""
        gateway = self.gateway
        if gateway is None:
            return
        now, mono = gateway.clock.now(), gateway.clock.monotonic()
        try:
            await gateway.pool.refresh(now)
            usage = await gateway.store.usage(gateway.pool.day)
            if self._counts is None or mono - self._counted_at >= TASK_COUNTS_MAX_AGE_S:
                self._counts, self._counted_at = await gateway.store.task_counts(), mono
        except Exception as exc:  # a broken database must not break the scrape of everything else
            log.warning("metrics: cannot read the store (%s); quota from memory, task counts left out", exc)
            usage, self._counts = None, None
        self.snapshot = StoreSnapshot(now, usage, self._counts)

    def collect(self) -> Iterator[Metric]:
        gateway, snapshot = self.gateway, self.snapshot
        if gateway is None or snapshot is None:
            return
        used = GaugeMetricFamily(
            f"{NAMESPACE}_key_quota_used", "Units of the key's quota used in the current quota day.", labels=["key"]
        )
        limit = GaugeMetricFamily(
            f"{NAMESPACE}_key_quota_limit", "The key's configured daily limit (absent when unlimited).", labels=["key"]
        )
        remaining = GaugeMetricFamily(
            f"{NAMESPACE}_key_quota_remaining",
            "Units the key has left in the current quota day (absent when unlimited).",
            labels=["key"],
        )
        state = GaugeMetricFamily(
            f"{NAMESPACE}_key_state",
            "1 for the key's current state (active, spent, cooling, disabled), 0 for the others.",
            labels=["key", "state"],
        )
        circuit = GaugeMetricFamily(
            f"{NAMESPACE}_key_circuit_open",
            "1 while the key's circuit breaker keeps calls off it (open, or probing), else 0.",
            labels=["key"],
        )
        ts = snapshot.now.timestamp()
        for status in gateway.pool.statuses():
            name = status.name
            count = status.used if snapshot.usage is None else snapshot.usage.get(name, 0)
            used.add_metric([name], count)
            if status.config.daily_limit is not None:
                limit.add_metric([name], status.config.daily_limit)
                remaining.add_metric([name], max(status.config.daily_limit - count, 0))
            current = status.state(ts)
            for each in KeyState:
                state.add_metric([name, each.value], 1.0 if each is current else 0.0)
            circuit.add_metric([name], 0.0 if gateway.breakers.state(name) is BreakerState.CLOSED else 1.0)
        yield from (used, limit, remaining, state, circuit)
        yield GaugeMetricFamily(
            f"{NAMESPACE}_upstream_calls_in_flight",
            "Upstream calls under way (at most limits.max_concurrent_upstream).",
            value=gateway.admission.active,
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_requests_queued",
            "Requests waiting for an upstream slot (at most limits.max_queued).",
            value=gateway.admission.queued,
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_quota_reset_timestamp_seconds",
            "When the next quota day starts (Unix time).",
            value=gateway.pool.schedule.next_reset(snapshot.now).timestamp(),
        )
        if snapshot.task_counts is not None:
            tasks = GaugeMetricFamily(
                f"{NAMESPACE}_tasks", "Tasks the gateway knows, by the status last seen.", labels=["status"]
            )
            by_status = dict.fromkeys(TASK_STATUSES, 0)
            by_status["other"] = 0
            for name, n in snapshot.task_counts.items():
                by_status[name if name in by_status else "other"] += n
            for name, n in by_status.items():
                tasks.add_metric([name], n)
            yield tasks


class GatewayMetrics(Events):
    """The gateway's metrics: a registry of its own, fed by events and by `PoolCollector` at scrape time."""

    def __init__(self) -> None:
        # `_created` series would double every counter for a timestamp nobody graphs.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "requests",
            "Client requests by route template and HTTP status.",
            ["route", "code"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.request_seconds = Histogram(
            "request_duration_seconds",
            "Time to answer a client request.",
            ["route"],
            namespace=NAMESPACE,
            buckets=BUCKETS,
            registry=r,
        )
        self.upstream_requests = Counter(
            "upstream_requests",
            "Calls to upstream by key, operation (create, poll) and outcome "
            "(ok, quota, rate_limit, auth, not_found, client_error, server_error, timeout, unreachable, broken).",
            ["key", "operation", "outcome"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "upstream_request_duration_seconds",
            "Time of one upstream call.",
            ["operation"],
            namespace=NAMESPACE,
            buckets=BUCKETS,
            registry=r,
        )
        self.failovers = Counter(
            "failovers",
            "Creates moved on to the next key, by reason (quota, rate_limit, auth, error).",
            ["reason"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.exhausted_rejections = Counter(
            "exhausted_rejections",
            "Creates refused with 429 because no key could take them.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.overload_rejections = Counter(
            "overload_rejections",
            "Requests refused with 503 because the upstream slots and the queue were full.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.tasks_created = Counter(
            "tasks_created",
            "Tasks upstream accepted, by key and client.",
            ["key", "client"],
            namespace=NAMESPACE,
            registry=r,
        )
        # Labelled children looked up once per label set, not on every request (labels are few and fixed).
        self._request_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self._upstream_children: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}
        self._created_children: dict[tuple[str, str], Counter] = {}
        for reason in ("quota", "rate_limit", "auth", "error"):
            self.failovers.labels(reason)  # present at 0 from the start, so rate() sees the first one
        self.pool = PoolCollector()
        #: What a scrape shows: this registry, or with several workers (`serve --workers`), every
        #: worker's counters added up from prometheus_client's multiprocess files, and the pool.
        self.exposed = r
        if os.environ.get(MULTIPROC_ENV):
            self.exposed = CollectorRegistry(auto_describe=True)
            MultiProcessCollector(self.exposed)  # type: ignore[no-untyped-call]
            self.exposed.register(self.pool)
        else:
            r.register(self.pool)
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

    def bind(self, gateway: Gateway) -> None:
        """Start reading pool and store state from `gateway` (once the app has opened it)."""
        self.pool.gateway = gateway

    # --- events ---------------------------------------------------------------------------

    def request(self, route: str, status: int, seconds: float) -> None:
        """A client request was answered."""
        children = self._request_children.get((route, status))
        if children is None:
            children = (self.requests.labels(route, str(status)), self.request_seconds.labels(route))
            self._request_children[(route, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def upstream_call(self, key: str, operation: str, outcome: str, seconds: float) -> None:
        children = self._upstream_children.get((key, operation, outcome))
        if children is None:
            children = (
                self.upstream_requests.labels(key, operation, outcome),
                self.upstream_seconds.labels(operation),
            )
            self._upstream_children[(key, operation, outcome)] = children
        children[0].inc()
        children[1].observe(seconds)

    def failover(self, reason: str) -> None:
        self.failovers.labels(reason).inc()

    def exhausted(self) -> None:
        self.exhausted_rejections.inc()

    def task_created(self, key: str, client: str) -> None:
        child = self._created_children.get((key, client))
        if child is None:
            child = self._created_children[(key, client)] = self.tasks_created.labels(key, client)
        child.inc()

    def overloaded(self) -> None:
        self.overload_rejections.inc()

    # --- exposition -----------------------------------------------------------------------

    async def exposition(self) -> bytes:
        """The Prometheus text format of everything, with pool and task state read just now."""
        await self.pool.refresh()
        return generate_latest(self.exposed)


def metrics_handler(metrics: GatewayMetrics, token: Secret | None) -> Handler:
    """`GET /metrics`: the exposition, behind `Authorization: Bearer <metrics.token>` when one is set."""

    async def scrape(request: web.Request) -> web.StreamResponse:
        if token is not None:
            given = bearer(request.headers.get("Authorization"))
            if given is None or not matches(given, token):
                return error_response(GatewayError(401, "invalid_token", "send Authorization: Bearer <metrics token>"))
        if metrics.pool.gateway is None:
            return error_response(GatewayError(503, "starting", "the gateway is still starting"))
        body = await metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    return scrape


def create_metrics_app(metrics: GatewayMetrics, token: Secret | None) -> web.Application:
    """The separate listener of `metrics.port`: `/metrics` and nothing else."""
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(metrics, token))
    return app
