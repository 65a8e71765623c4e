"""``--metrics HOST:PORT``: the master's figures as Prometheus text on ``/metrics``.

prometheus-client (the Prometheus project's own Python library) writes the
exposition format and serves it from a thread of its own. The figures are
the ones ``fleet stats`` shows (fleet.supervisor.figures), taken by the
supervisor's loop at most once a SNAPSHOT_INTERVAL and handed over whole,
so a scrape never reads the supervisor's state while the loop changes it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from fleet.config import ConfigError, HttpAddress, parse_host_port
from fleet.worker.tally import LATENCY_BUCKETS

log = logging.getLogger("fleet.supervisor")

# The loop takes a new snapshot at most this often (reading every worker's /proc costs).
SNAPSHOT_INTERVAL = 1.0
WORKER_STATES = ("starting", "ready", "busy", "draining")


def metrics_address(text: str | None) -> HttpAddress | None:
    """An --metrics HOST:PORT (an empty host: every IPv4 address)."""
    if text is None:
        return None
    host, port = parse_host_port(text, f"--metrics {text!r}", example="127.0.0.1:9100 or :9100")
    return HttpAddress(host or "0.0.0.0", port)


class MetricsEndpoint:
    def __init__(self, address: HttpAddress) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._figures: dict[str, Any] | None = None
        self._taken_at = -SNAPSHOT_INTERVAL
        try:
            self._server, _thread = start_http_server(address.port, addr=address.host, registry=self.registry)
        except OSError as error:
            raise ConfigError(f"--metrics {address}: cannot listen there: {error.strerror or error}") from None

    def due(self, now: float) -> bool:
        return now - self._taken_at >= SNAPSHOT_INTERVAL

    def update(self, figures: dict[str, Any], now: float) -> None:
        self._figures = figures  # one assignment: the scrape thread sees the old snapshot or this one
        self._taken_at = now

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def collect(self) -> Iterator[Metric]:
        figures = self._figures
        if figures is None:
            return
        totals = figures["totals"]
        served = figures["served"]
        yield _counter("fleet_requests", "Requests the workers finished, every kind.", figures["requests_served"])
        answered = CounterMetricFamily("fleet_requests_answered", "Requests the workers answered, by how they came "
                                       "(mongrel2, http) and the class of the status sent.", labels=["kind", "class"])
        for kind, classes in served["requests"].items():
            for name, count in classes.items():
                answered.add_metric([kind, name], count)
        yield answered
        yield _histogram("fleet_request_duration_seconds", "Time from a request reaching a worker thread to its "
                         "response sent (or handed to Mongrel2).", served)
        workers = GaugeMetricFamily("fleet_workers", "Worker processes by state.", labels=["state"])
        for state in WORKER_STATES:
            workers.add_metric([state], sum(row["state"] == state for row in figures["workers"]))
        yield workers
        yield _gauge("fleet_busy_threads", "Request threads holding a request.",
                     sum(row["busy_threads"] for row in figures["workers"]))
        yield _gauge("fleet_threads", "Request threads of the live workers.",
                     sum(row["threads"] for row in figures["workers"]))
        yield _gauge("fleet_backlog", "Requests waiting in the dispatcher for a free thread.", totals["backlog"])
        yield _gauge("fleet_workers_rss_bytes", "Resident memory of all workers.", totals["rss"])
        yield _gauge("fleet_generation", "The generation new workers get.", figures["generation"])
        yield _counter("fleet_reloads", "Reloads completed.", figures["reloads"])
        yield _counter("fleet_failed_reloads", "Reloads that failed (the old generation kept serving).",
                       figures["failed_reloads"])
        yield _counter("fleet_respawns", "Workers started again after they died.", figures["respawns"])
        yield _counter("fleet_harakiri_kills", "Workers killed for holding a request past --harakiri.",
                       figures["harakiri_kills"])
        recycles = CounterMetricFamily("fleet_recycles", "Workers replaced gracefully by a limit.",
                                       labels=["reason"])
        for reason, count in figures["recycles"].items():
            recycles.add_metric([reason], count)
        yield recycles
        answered = CounterMetricFamily("fleet_answered", "Error answers the master gave itself (no worker did).",
                                       labels=["status"])
        for status in ("502", "503", "504"):
            answered.add_metric([status], figures[f"answered_{status}"])
        yield answered
        yield _gauge("fleet_websockets_open", "ASGI WebSockets open in the workers.", figures["websockets_open"])
        yield _counter("fleet_log_lines_dropped", "Log lines the workers and the master could not hand to the "
                       "--logger collector.", served["log_lines_dropped"])
        cluster = figures.get("cluster")
        if cluster is not None:
            datagrams = CounterMetricFamily("fleet_cluster_datagrams", "Cluster datagrams received, by outcome.",
                                            labels=["outcome", "reason"])
            datagrams.add_metric(["accepted", ""], cluster["accepted"])
            datagrams.add_metric(["other_cluster", ""], cluster["other_cluster"])
            # A node's peers' heartbeats left unread outside a rolling reload, where the kernel's
            # socket filter did not drop them first (fleet.multicast).
            datagrams.add_metric(["skipped", "Heartbeat"], cluster["heartbeats_skipped"])
            for reason, count in sorted(cluster["rejected_by_reason"].items()):
                datagrams.add_metric(["dropped", reason], count)
            yield datagrams


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _histogram(name: str, documentation: str, served: dict[str, Any]) -> HistogramMetricFamily:
    cumulative, buckets = 0, []
    for bound, count in zip((*LATENCY_BUCKETS, "+Inf"), served["latency_buckets"]):
        cumulative += count
        buckets.append((str(bound), cumulative))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=served["latency_seconds"])
