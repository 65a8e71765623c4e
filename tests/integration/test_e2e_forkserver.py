"""Workers forked by the fork server (fleet.worker.forkserver), and what happens when it is not there."""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import psutil

from tests.support.harness import (
    FleetMaster,
    Harness,
    alive,
    master_args,
    request,
    wait_for,
    wait_log,
    wait_workers,
    worker_processes,
)


def fork_servers(master: FleetMaster) -> list[psutil.Process]:
    return [p for p in master.descendants() if "fleet: fork server" in " ".join(p.cmdline())]


def served_by(server, count: int = 12) -> set[int]:
    return {request(server, "GET", "/t/echo").json()["pid"] for _ in range(count)}


def test_workers_are_forked_by_one_fork_server_that_outlives_reloads(harness: Harness) -> None:
    server = harness.mongrel2([("/t/", "tnetstring")])
    master = harness.master(master_args(server, processes=2, threads=1))
    workers = wait_workers(master, 2)
    [fork_server] = fork_servers(master)
    assert fork_server.ppid() == master.pid
    assert " ".join(fork_server.cmdline()).strip() == f"fleet: fork server (supervisor {master.pid})"
    for worker in worker_processes(master):
        assert worker.ppid() == fork_server.pid
        assert " ".join(worker.cmdline()).strip() == f"fleet: worker (supervisor {master.pid})"
    assert served_by(server) <= workers

    master.proc.send_signal(signal.SIGHUP)
    wait_log(master, "reload complete: generation 2")
    reloaded = wait_workers(master, 2, without=workers)
    assert [p.pid for p in fork_servers(master)] == [fork_server.pid]  # the same server forked the new ones
    assert all(p.ppid() == fork_server.pid for p in worker_processes(master))
    assert served_by(server) <= reloaded


def test_a_killed_fork_server_takes_its_workers_and_a_new_one_forks_their_successors(harness: Harness) -> None:
    server = harness.mongrel2([("/t/", "tnetstring")])
    master = harness.master(master_args(server, processes=2, threads=1))
    workers = wait_workers(master, 2)
    [fork_server] = fork_servers(master)
    old = worker_processes(master)
    fork_server.send_signal(signal.SIGKILL)
    wait_for(lambda: not alive(old), 10, what="its workers to die with it (parent-death signal)")
    wait_log(master, f"fork server {fork_server.pid} ended (-9): its workers end with it; starting a new one")
    replacements = wait_workers(master, 2, without=workers)
    [new_server] = fork_servers(master)
    assert new_server.pid != fork_server.pid
    assert all(p.ppid() == new_server.pid for p in worker_processes(master))
    assert served_by(server) <= replacements
    assert master.proc.poll() is None


def test_the_fork_server_leaves_the_signals_of_its_process_group_to_the_others(harness: Harness) -> None:
    """A terminal's Ctrl-C reaches every process of the group; the server must not die of it and
    take the workers along (the supervisor decides how they stop)."""
    server = harness.mongrel2([("/t/", "tnetstring")])
    master = harness.master(master_args(server, processes=1, threads=1))
    workers = wait_workers(master, 1)
    [fork_server] = fork_servers(master)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
        fork_server.send_signal(sig)
    assert served_by(server, 4) <= workers
    assert fork_server.is_running() and fork_server.status() != psutil.STATUS_ZOMBIE
    assert "fork server" not in master.stderr_text().split("master ready")[1]


def test_without_a_fork_server_workers_start_with_exec_and_still_reload(harness: Harness, tmp_path: Path) -> None:
    """A fork server that cannot start (here it exits at once) costs speed, not service."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent("""\
        import os, sys
        if "--fork-server" in sys.argv:
            os._exit(7)
        """))
    server = harness.mongrel2([("/t/", "tnetstring")])
    master = harness.master(master_args(server, processes=2, threads=1),
                            env={"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    workers = wait_workers(master, 2)
    wait_log(master, "ended (7) before it was ready: workers start with exec from now on")
    assert fork_servers(master) == []
    for worker in worker_processes(master):
        assert worker.ppid() == master.pid
        assert worker.cmdline()[1:3] == ["-m", "fleet.worker"]
    assert served_by(server) <= workers
    master.proc.send_signal(signal.SIGHUP)
    wait_log(master, "reload complete: generation 2")
    reloaded = wait_workers(master, 2, without=workers)
    assert served_by(server) <= reloaded
    assert master.stderr_text().count("before it was ready") == 1
