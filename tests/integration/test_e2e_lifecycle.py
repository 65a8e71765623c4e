"""Stopping the master, and workers that die."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import psutil
import pytest

from tests.support.harness import Harness, alive, group_members, master_args, request, wait_for


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_master_and_workers(harness: Harness, sig: int) -> None:
    server = harness.mongrel2()
    master = harness.master(master_args(server, processes=2, threads=2))
    assert request(server, "GET", "/t/hello").status == 200
    workers = master.descendants()
    assert len(workers) >= 2
    master.proc.send_signal(sig)
    assert master.wait_exit(timeout=20) == 0, master.stderr_text()[-2000:]
    wait_for(lambda: not alive(workers), 5, what="the workers to exit")
    assert group_members(master.pid) == []


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests(harness: Harness, tmp_path: Path) -> None:
    server = harness.mongrel2([("/t/", "tnetstring")])
    master = harness.master(master_args(server, processes=1, threads=2))
    record = tmp_path / "slow.txt"
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(request, server, "GET", f"/t/slow?s=1.5&record={quote(str(record))}")
        wait_for(record.exists, 20, what="the request to reach the app")
        master.proc.send_signal(signal.SIGTERM)
        resp = future.result(timeout=30)
    assert resp.status == 200, master.stderr_text()[-3000:]
    assert master.wait_exit(timeout=20) == 0, master.stderr_text()[-3000:]


@pytest.mark.slow
def test_killed_worker_is_respawned(harness: Harness) -> None:
    server = harness.mongrel2([("/t/", "tnetstring")])
    master = harness.master(master_args(server, processes=1, threads=2))
    victim = request(server, "GET", "/t/echo").json()["pid"]
    before = {p.pid for p in master.descendants()}
    assert victim in before
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(victim) or
             psutil.Process(victim).status() == psutil.STATUS_ZOMBIE, 10, what="the worker to die")

    def respawned() -> bool:
        pids = {p.pid for p in master.descendants()}
        return victim not in pids and len(pids) >= len(before)

    wait_for(respawned, 30, what="a replacement worker")
    data = request(server, "GET", "/t/echo").json()
    assert data["pid"] != victim
    assert data["pid"] in {p.pid for p in master.descendants()}
    assert master.proc.poll() is None


@pytest.mark.slow
def test_request_of_a_killed_worker_is_answered(harness: Harness, tmp_path: Path) -> None:
    """With the broker, the master knows whose request died with the worker and answers it."""
    server = harness.mongrel2([("/t/", "tnetstring")])
    master = harness.master(master_args(server, processes=1, threads=2))
    victim = request(server, "GET", "/t/echo").json()["pid"]
    record = tmp_path / "slow.txt"
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(request, server, "GET", f"/t/slow?s=20&record={quote(str(record))}",
                             None, None, 30)
        wait_for(record.exists, 20, what="the request to reach the app")
        os.kill(victim, signal.SIGKILL)
        started = time.monotonic()
        resp = future.result(timeout=35)
    assert resp.status >= 500
    assert time.monotonic() - started < 15, "the client waited for its own timeout"
    assert master.proc.poll() is None


@pytest.mark.slow
def test_sigkilled_master_leaves_no_workers(harness: Harness) -> None:
    """Workers notice that their master is gone and exit (no orphans even without a clean stop)."""
    server = harness.mongrel2([("/t/", "tnetstring")])
    master = harness.master(master_args(server, processes=2, threads=1))
    workers = master.descendants()
    assert workers
    master.proc.send_signal(signal.SIGKILL)
    master.wait_exit(timeout=10)
    wait_for(lambda: not alive(workers), 20, what="the orphaned workers to exit")
