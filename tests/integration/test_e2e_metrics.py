"""--metrics: the master's figures as Prometheus text, scraped over HTTP and read by
prometheus_client's own exposition-format parser."""

from __future__ import annotations

import signal
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from fleet.dev.mongrel2 import free_port
from tests.support.harness import Harness, fleet_cli, master_args, request, wait_for


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_count_requests_workers_and_reloads(harness: Harness) -> None:
    m2 = harness.mongrel2()
    port = free_port()
    master = harness.master(master_args(m2, processes=2, threads=2) + ["--metrics", f"127.0.0.1:{port}"])
    for _ in range(20):
        assert request(m2, "GET", "/t/hello").body == b"Hello world!"
    metrics = wait_for(lambda: (m := scrape(port)).get(("fleet_requests_total", ())) == 20 and m, 10,
                       what="20 requests in the metrics")
    assert metrics[("fleet_workers", (("state", "ready"),))] == 2
    assert metrics[("fleet_threads", ())] == 4
    assert metrics[("fleet_reloads_total", ())] == 0
    assert metrics[("fleet_answered_total", (("status", "502"),))] == 0

    master.proc.send_signal(signal.SIGHUP)
    metrics = wait_for(lambda: (m := scrape(port)).get(("fleet_reloads_total", ())) == 1 and m, 30,
                       what="the reload in the metrics")
    assert metrics[("fleet_generation", ())] == 2
    assert metrics[("fleet_requests_total", ())] == 20  # a counter: the old workers' requests stay counted


def test_a_taken_metrics_port_is_one_line(harness: Harness) -> None:
    m2 = harness.mongrel2()
    port = free_port()
    harness.master(master_args(m2, processes=1, threads=1) + ["--metrics", f"127.0.0.1:{port}"])
    result = fleet_cli("master", *master_args(m2, processes=1, threads=1), "--metrics", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"fleet: error: --metrics 127.0.0.1:{port}: cannot listen")
