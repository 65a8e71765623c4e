"""`--logger zeromq:` end to end: a real `fleet logs --bind` collector, a real
`fleet master` (and nodes) behind a real Mongrel2, real HTTP requests.

The app (logging_app) logs one line per request with the standard logging
module, so every line the collector gets from a worker pid went through the
worker's log set-up. Clusters join on 127.0.0.1 only (--cluster-iface), TTL 1.
"""

from __future__ import annotations

import re
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet.dev.mongrel2 import free_port
from tests.support.harness import Harness, fleet_cli, master_args, request, scrape_metrics, wait_for, worker_pids

LINE = re.compile(r"^\S+Z (?P<host>\S+) \[(?P<pid>\d+)\] (?P<level>\w+) (?P<name>\S+): (?P<message>.*)$")
COLLECTOR_TIMEOUT = 30.0


@dataclass(frozen=True)
class LogLine:
    host: str
    pid: int
    level: str
    name: str
    message: str


class LogCollector:
    """`fleet logs --bind ENDPOINT --output FILE` in its own process group; the
    harness stops it at the end of the test whatever happens."""

    def __init__(self, harness: Harness, name: str) -> None:
        self.harness = harness
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.path = harness.basedir / f"{name}.log"
        self.proc = None

    def start(self) -> LogCollector:
        stderr = self.harness.basedir / f"proc-{len(self.harness.popens)}.stderr"
        self.proc = self.harness.popen([sys.executable, "-m", "fleet", "logs", "--bind", self.endpoint,
                                        "--output", str(self.path)])
        wait_for(lambda: "collecting on" in stderr.read_text() or self.proc.poll() is not None,
                 COLLECTOR_TIMEOUT, what="fleet logs to bind")
        assert self.proc.poll() is None, stderr.read_text()
        return self

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=10) == 0  # a clean exit on SIGTERM

    def lines(self) -> list[LogLine]:
        """Every line received so far (traceback continuation lines are skipped)."""
        if not self.path.exists():
            return []
        found = []
        for text in self.path.read_text(errors="replace").splitlines():
            match = LINE.match(text)
            if match:
                found.append(LogLine(match["host"], int(match["pid"]), match["level"], match["name"],
                                     match["message"]))
        return found

    def wait_line(self, what: str, predicate, timeout: float = COLLECTOR_TIMEOUT) -> LogLine:
        def first() -> LogLine | None:
            return next((line for line in self.lines() if predicate(line)), None)

        return wait_for(first, timeout, what=f"{what} at the collector")  # type: ignore[return-value]


def logger_arg(collector: LogCollector) -> list[str]:
    return ["--logger", f"zeromq:{collector.endpoint}"]


def app_args(server, processes: int, threads: int, extra: list[str]) -> list[str]:
    return master_args(server, module="logging_app", processes=processes, threads=threads, extra=extra)


def serve(server, tag: str, lines: int = 1) -> int:
    """One request that makes the worker log `lines` lines; returns the worker's pid."""
    response = request(server, "GET", f"/t/log?tag={tag}&lines={lines}")
    assert response.status == 200, response.body
    return response.json()["pid"]


def test_master_and_workers_send_their_lines_to_the_collector(harness: Harness) -> None:
    collector = LogCollector(harness, "collected").start()
    server = harness.mongrel2([("/t/", "tnetstring")])
    master = harness.master(app_args(server, 2, 2, logger_arg(collector)))
    workers = worker_pids(master)
    assert len(workers) == 2
    requests = 20
    served = {serve(server, f"all-{number}") for number in range(requests)}
    assert served <= workers

    ready = collector.wait_line("the master's ready line", lambda line: "master ready" in line.message)
    assert (ready.host, ready.pid, ready.level, ready.name) == (socket.gethostname(), master.pid, "INFO",
                                                                 "fleet.supervisor")
    for pid in workers:
        line = collector.wait_line(f"worker {pid}'s ready line",
                                   lambda line, pid=pid: line.pid == pid and "worker ready" in line.message)
        assert (line.host, line.level, line.name) == (socket.gethostname(), "INFO", "fleet.worker")
    for number in range(requests):  # what the application itself logs
        line = collector.wait_line(f"request {number}'s line",
                                   lambda line, n=number: line.message == f"request all-{n} line 0")
        assert line.pid in served and (line.level, line.name) == ("INFO", "logging_app")
    local = master.stderr_text()  # the host's own log keeps every line too
    assert all(f"request all-{number} line 0" in local for number in range(requests))


def test_a_dead_collector_fails_no_request_and_the_drop_count_arrives_later(harness: Harness) -> None:
    collector = LogCollector(harness, "collected").start()
    server = harness.mongrel2([("/t/", "tnetstring")])
    metrics_port = free_port()
    master = harness.master(app_args(server, 1, 2, [*logger_arg(collector), "--metrics", f"127.0.0.1:{metrics_port}"]))
    (worker,) = worker_pids(master)
    serve(server, "before")
    collector.wait_line("the first request's line", lambda line: line.message == "request before line 0")

    collector.stop()
    for number in range(10):  # 5,000 lines: far more than the 1,000 a worker queues
        assert serve(server, f"dead-{number}", lines=500) == worker
    collector.start()

    after = []

    def drop_line() -> LogLine | None:
        after.append(serve(server, "after"))  # a send that works again is what reports the drops
        return next((line for line in collector.lines() if line.message.startswith("dropped ")), None)

    line = wait_for(drop_line, COLLECTOR_TIMEOUT, interval=0.2, what="the drop count at the collector")
    count = int(re.match(r"dropped (\d+) log line\(s\) while the collector tcp://", line.message).group(1))
    assert line.pid == worker and line.level == "WARNING" and line.name == "fleet.logger"
    received = sum(1 for line in collector.lines() if line.message.startswith("request dead-"))
    assert received < 5000 and received + count >= 5000  # lines were dropped, and every one was counted
    assert count <= 5000 + len(after)  # (an "after" line sent before the reconnection is dropped too)
    counted = ("fleet_log_lines_dropped_total", ())
    dropped = wait_for(lambda: (n := scrape_metrics(metrics_port)[counted]) >= count and n, 10,
                       what="the drops in the metrics")
    assert dropped <= count + len(after) + 50  # the workers' drops, and the master's few lines meanwhile
    local = master.stderr_text()
    assert local.count("request dead-") == 5000  # nothing lost in the host's own log
    assert "is unreachable or too slow: dropping log lines" in local
    assert line.message in local


@pytest.mark.slow
def test_a_node_uses_the_masters_logger_unless_it_has_its_own(harness: Harness, cluster_args: list[str]) -> None:
    shared = LogCollector(harness, "shared").start()
    own = LogCollector(harness, "own").start()
    server = harness.mongrel2([("/t/", "tnetstring")])
    master = harness.master(app_args(server, 1, 1, logger_arg(shared)) + cluster_args + ["--node-name", "m"])
    bare = harness.node(cluster_args + ["--node-name", "bare"])
    custom = harness.node(cluster_args + ["--node-name", "custom"] + logger_arg(own))
    hosts = {"m": master, "bare": bare, "custom": custom}
    workers = {name: worker_pids(proc) for name, proc in hosts.items()}
    assert all(len(pids) == 1 for pids in workers.values()), workers
    # (Each worker logs "worker ready" itself: no need to steer a request to every host.)
    for name, collector in (("bare", shared), ("custom", own)):
        node_pid, (worker,) = hosts[name].pid, workers[name]
        collector.wait_line(f"node {name}'s ready line",
                            lambda line, pid=node_pid: line.pid == pid and "node ready" in line.message)
        line = collector.wait_line(f"node {name}'s worker's ready line",
                                   lambda line, pid=worker: line.pid == pid and "worker ready" in line.message)
        assert (line.host, line.level, line.name) == (socket.gethostname(), "INFO", "fleet.worker")
    shared_pids = {line.pid for line in shared.lines()}
    assert master.pid in shared_pids and not shared_pids & ({custom.pid} | workers["custom"])
    assert {line.pid for line in own.lines()} <= {custom.pid} | workers["custom"]


@pytest.mark.slow
def test_nodes_follow_a_master_restarted_with_another_logger(harness: Harness, cluster_args: list[str]) -> None:
    first = LogCollector(harness, "first").start()
    second = LogCollector(harness, "second").start()
    server = harness.mongrel2([("/t/", "tnetstring")])
    args = app_args(server, 1, 1, []) + cluster_args + ["--node-name", "m"]
    master = harness.master(args + logger_arg(first))
    node = harness.node(cluster_args + ["--node-name", "bare"])
    first.wait_line("the node's ready line", lambda line: line.pid == node.pid and "node ready" in line.message)

    master.stop()
    harness.master(args + logger_arg(second))
    # The node applies the new configuration in place (a graceful reload): its
    # supervisor and its new workers now log to the second collector.
    second.wait_line("the node's reload", lambda line: line.pid == node.pid and "reload complete" in line.message)
    # "reload complete" comes once the new worker is ready; the old one may still be exiting.
    (worker,) = wait_for(lambda: len(pids := worker_pids(node)) == 1 and pids, 30, what="the old worker gone")
    second.wait_line("the node's new worker's ready line",
                     lambda line: line.pid == worker and "worker ready" in line.message)
    assert not [line for line in first.lines() if line.pid == worker]


def test_logger_mistakes_are_one_line(tmp_path: Path) -> None:
    for args, fragment in [
        (["master", "--logger", "syslog"], "expected zeromq:tcp://HOST:PORT"),
        (["node", "--cluster", "239.255.91.1:1717", "--logger", "zeromq:tcp://*:1"], "not '*'"),
        (["logs", "--bind", "udp://127.0.0.1:5140"], "not a ZeroMQ endpoint"),
        (["logs"], "--bind"),
        (["logs", "--bind", "tcp://127.0.0.1:5140", "--output", str(tmp_path / "no" / "such")],
         "No such file or directory"),
    ]:
        out = fleet_cli(*args)
        assert out.returncode == 2 and out.stderr.startswith("fleet: error:") and out.stderr.count("\n") == 1, \
            (args, out.stderr)
        assert fragment in out.stderr, (args, out.stderr)


def test_fleet_logs_refuses_an_endpoint_in_use(harness: Harness) -> None:
    collector = LogCollector(harness, "first").start()
    out = fleet_cli("logs", "--bind", collector.endpoint)
    assert out.returncode == 2
    assert out.stderr == f"fleet: error: --bind {collector.endpoint!r}: Address already in use\n"
