"""--metrics: the master's figures as Prometheus text, scraped over HTTP and read by
prometheus_client's own exposition-format parser."""

from __future__ import annotations

import http.client
import signal

from fleet.dev.mongrel2 import free_port
from tests.support.harness import (
    APPS,
    Harness,
    fleet_cli,
    fleet_stats,
    master_args,
    request,
    scrape_metrics,
    wait_for,
)


def scraped_when(port: int, condition) -> dict | None:
    metrics = scrape_metrics(port)
    return metrics if condition(metrics) else None


def answered(metrics: dict, kind: str) -> dict[str, float]:
    return {name: metrics.get(("fleet_requests_answered_total", (("class", name), ("kind", kind))))
            for name in ("1xx", "2xx", "3xx", "4xx", "5xx")}


def latency_count(metrics: dict) -> float | None:
    return metrics.get(("fleet_request_duration_seconds_count", ()))


def test_metrics_count_requests_workers_and_reloads(harness: Harness) -> None:
    m2 = harness.mongrel2()
    port = free_port()
    master = harness.master(master_args(m2, processes=2, threads=2) + ["--metrics", f"127.0.0.1:{port}"])
    # Every way a Mongrel2 request is answered: the compiled lane (/t/hello), the Python path
    # (JSON headers), a generator handed over from the lane, the app's 404, an exception's 500.
    for path, status, times in (("/t/hello", 200, 20), ("/j/hello", 200, 3), ("/t/stream", 200, 1),
                                ("/t/nothing", 404, 2), ("/t/boom", 500, 1)):
        for _ in range(times):
            assert request(m2, "GET", path).status == status
    expected = {"1xx": 0, "2xx": 24, "3xx": 0, "4xx": 2, "5xx": 1}
    metrics = wait_for(lambda: scraped_when(port, lambda m: answered(m, "mongrel2") == expected
                                            and m.get(("fleet_requests_total", ())) == 27),
                       10, what="27 requests in the metrics")
    assert answered(metrics, "http") == dict.fromkeys(expected, 0)
    assert latency_count(metrics) == 27
    assert 0 < metrics[("fleet_request_duration_seconds_sum", ())] < 27 * 5
    assert metrics[("fleet_request_duration_seconds_bucket", (("le", "+Inf"),))] == 27
    assert metrics[("fleet_workers", (("state", "ready"),))] == 2
    assert metrics[("fleet_threads", ())] == 4
    assert metrics[("fleet_reloads_total", ())] == 0
    assert metrics[("fleet_answered_total", (("status", "502"),))] == 0
    assert metrics[("fleet_answered_total", (("status", "503"),))] == 0
    assert metrics[("fleet_log_lines_dropped_total", ())] == 0

    master.proc.send_signal(signal.SIGHUP)
    metrics = wait_for(lambda: (m := scrape_metrics(port)).get(("fleet_reloads_total", ())) == 1 and m, 30,
                       what="the reload in the metrics")
    assert metrics[("fleet_generation", ())] == 2
    # counters: the old workers' requests stay counted
    assert metrics[("fleet_requests_total", ())] == 27
    assert answered(metrics, "mongrel2") == expected and latency_count(metrics) == 27


def test_http_requests_are_counted_in_metrics_and_stats(harness: Harness) -> None:
    http_port, metrics_port = free_port(), free_port()
    stats = f"tcp://127.0.0.1:{free_port()}"
    harness.master(["--module", "apps:router", "--pythonpath", str(APPS), "-p", "2", "--threads", "2",
                    "--http", f"127.0.0.1:{http_port}", "--metrics", f"127.0.0.1:{metrics_port}", "--stats", stats])
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
    for path, status in [("/h/hello", 200)] * 10 + [("/h/nothing", 404)]:
        conn.request("GET", path)
        answer = conn.getresponse()
        answer.read()
        assert answer.status == status
    conn.close()
    expected = {"1xx": 0, "2xx": 10, "3xx": 0, "4xx": 1, "5xx": 0}
    metrics = wait_for(lambda: scraped_when(metrics_port, lambda m: answered(m, "http") == expected), 10,
                       what="11 --http requests in the metrics")
    assert metrics[("fleet_requests_total", ())] == 11
    assert answered(metrics, "mongrel2") == dict.fromkeys(expected, 0)
    figures = fleet_stats(stats)
    assert figures["totals"]["requests"] == 11 and figures["served"]["requests"]["http"] == expected
    table = fleet_cli("stats", "--stats", stats).stdout
    assert "http answered: 1xx 0  2xx 10  3xx 0  4xx 1  5xx 0" in table, table


def test_a_taken_metrics_port_is_one_line(harness: Harness) -> None:
    m2 = harness.mongrel2()
    port = free_port()
    harness.master(master_args(m2, processes=1, threads=1) + ["--metrics", f"127.0.0.1:{port}"])
    result = fleet_cli("master", *master_args(m2, processes=1, threads=1), "--metrics", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"fleet: error: --metrics 127.0.0.1:{port}: cannot listen")
