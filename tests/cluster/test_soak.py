"""Soak, short: load through Mongrel2 on three hosts with a reload every minute and a worker SIGKILL.

The same scenario as bench/soak.py (tests/support/scenario.py), for 2 minutes:
GET clients and an upload client through Mongrel2 from h1, `fleet reload`
at 60 s, a random worker SIGKILLed at 30 s. No timed assertions: what must
hold is that nothing failed but the killed worker's in-flight requests
(answered 502 by design), nothing hung, every upload arrived intact and
its temp file was removed, fds did not grow, and every process is gone
after teardown.
"""

from __future__ import annotations

import pytest

from tests.support.netns import Network
from tests.support.scenario import ServingCluster, SoakPlan, failures_outside_kills, orphans, run_soak, soak_summary

FD_SLACK = 4  # a socket or file in the middle of being opened or closed when sampled


def figure(record_property, name: str, value) -> None:
    print(f"\n[figure] {name} = {value}")
    record_property(name, value)


@pytest.mark.slow
def test_two_minute_soak(network: Network, tmp_path, record_property) -> None:
    plan = SoakPlan(seconds=120)
    cluster = ServingCluster(network, tmp_path)
    run = None
    try:
        cluster.start_all(processes=2)
        cluster.wait_ready_hosts(3)
        run = run_soak(cluster, plan)
    finally:
        problems = cluster.close()
    assert run is not None
    left = orphans(run.seen)
    in_namespaces = {h.name: h.pids() for h in network.hosts if h.pids()}
    summary = soak_summary(run)
    for key in ("get", "uploads", "kills", "reloads", "start", "end", "upload_files_left", "answered_502"):
        figure(record_property, key, summary[key])

    assert not problems, problems
    assert summary["kills"] == 1 and summary["reloads"] >= 1, run.events
    assert set(summary["reload_exits"]) == {0}, run.events
    report = run.get_report
    assert report.hung == 0 and report.unfinished == 0, report.summary()
    assert run.uploads["hung"] == 0 and run.uploads["succeeded"] > 0, run.uploads
    bad = failures_outside_kills(run)
    assert bad == [], f"{len(bad)} failures not explained by the SIGKILL: {bad[:10]} {report.summary()}"
    # What the kill may cost: the requests in flight on that worker, at most one per client.
    assert report.failed + run.uploads["failed"] <= plan.clients + 1, (report.summary(), run.uploads)
    # Even an upload in flight on the killed worker: the dispatcher deletes its file with the 502.
    assert run.upload_files_left == [], (run.upload_files_left, run.uploads)
    assert not left, f"processes of the run still alive after teardown: {left}"
    assert not in_namespaces, in_namespaces
    for role, start in summary["start"].items():
        end = summary["end"].get(role)
        assert end is not None and end["n"] == start["n"], (role, summary["start"], summary["end"])
        assert end["fds_max"] <= start["fds_max"] + FD_SLACK, (role, start, end)
