"""The supervisor under load: reloads, crashes, scaling, recycling, harakiri, stats, log files.

Every test runs a real Mongrel2 and a real `fleet master`; most keep a load
(tests/support/load.py) running while they act on the master, then check
what every single request of that load got. Timeouts are generous and nothing
is asserted about speed beyond "within a few seconds". The harness fixture
fails a test that leaves any process behind.
"""

from __future__ import annotations

import os
import re
import signal
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import pytest

from fleet.dev.mongrel2 import Mongrel2, free_port
from tests.apps.apps import HELLO
from tests.support.harness import (
    CONTENT_LENGTH,
    FleetMaster,
    Harness,
    fleet_cli,
    fleet_stats,
    log_text,
    master_args,
    ready_pids,
    request,
    upload_files,
    wait_for,
    wait_log,
    wait_workers,
    worker_pids,
)
from tests.support.load import OK, Load

HELLO_PATH = "/t/hello"
CLIENTS = 4
PAUSE = 0.005  # between a client's requests: a steady load that leaves the 2 CPUs some room
LOAD_LIMIT = 90.0  # no load in this file runs longer than this
SETTLE = 30.0  # generous bound for "the workers are back / replaced"
WORKER_STATES = {"starting", "ready", "busy", "draining"}


def serve(harness: Harness, processes: int = 2, threads: int = 2, extra: list[str] | None = None,
          module: str = "apps:router", ready: bool = True) -> tuple[Mongrel2, FleetMaster]:
    server = harness.mongrel2([("/t/", "tnetstring")])
    master = harness.master(master_args(server, module=module, processes=processes, threads=threads,
                                        extra=extra), ready=ready)
    return server, master


def hello_load(server: Mongrel2, clients: int = CLIENTS, expect: object = HELLO, path: str = HELLO_PATH,
               pause: float = PAUSE) -> Load:
    load = Load(server.port, path, expect=expect, clients=clients, pause=pause, timeout=10.0,
                max_duration=LOAD_LIMIT)
    load.start()
    load.wait_succeeded(50)
    return load


def assert_clean(report, master: FleetMaster, log_file: Path | None = None) -> None:
    assert report.clean, f"{report.summary()}\n{log_text(master, log_file)[-3000:]}"


def hup_and_wait(master: FleetMaster, timeout: float = SETTLE, log_file: Path | None = None) -> str:
    before = log_text(master, log_file).count("reload complete")
    master.proc.send_signal(signal.SIGHUP)
    return wait_log(master, "reload complete", before + 1, timeout, log_file)


def wait_gone(pids: set[int], master: FleetMaster, timeout: float = SETTLE) -> None:
    wait_for(lambda: not worker_pids(master) & pids, timeout, what=f"workers {sorted(pids)} to exit")


# -- reloads --------------------------------------------------------------------


def test_hup_reload_under_load_loses_nothing(harness: Harness) -> None:
    server, master = serve(harness)
    first = wait_workers(master, 2)
    load = hello_load(server)
    try:
        hup_and_wait(master)
        second = wait_workers(master, 2, without=first)
        load.wait_succeeded(50)
        hup_and_wait(master)  # and once more: a reload of a reloaded master
        wait_workers(master, 2, without=first | second)
        load.wait_succeeded(50)
    finally:
        report = load.stop()
    assert_clean(report, master)
    assert master.proc.poll() is None


def test_reload_batch_replaces_k_workers_at_a_time(harness: Harness) -> None:
    server, master = serve(harness, processes=3, threads=1, extra=["--reload-batch", "1"])
    old = wait_workers(master, 3)
    load = hello_load(server)
    try:
        before = log_text(master).count("reload complete")
        master.proc.send_signal(signal.SIGHUP)
        most = 0  # workers started and not yet ready, at the worst moment
        deadline = time.monotonic() + 60
        while True:
            live = worker_pids(master)
            log = log_text(master)  # read after the pids: a worker ready by then is in it
            most = max(most, len(live - ready_pids(log)))
            if log.count("reload complete") > before:
                break
            assert time.monotonic() < deadline, f"no 'reload complete' in 60 s:\n{log[-3000:]}"
            time.sleep(0.01)
        wait_workers(master, 3, without=old)
    finally:
        report = load.stop()
    assert_clean(report, master)
    assert most <= 1, f"{most} new workers starting at once with --reload-batch 1"


def test_reload_with_an_app_that_no_longer_imports_keeps_the_old_workers(
        harness: Harness, tmp_path: Path) -> None:
    appdir = tmp_path / "app"
    appdir.mkdir()
    module = appdir / "reload_app.py"
    app_source = textwrap.dedent("""
        BODY = {body!r}

        def application(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
            return [BODY]
    """)
    module.write_text(app_source.format(body=b"first version"))
    server, master = serve(harness, module="reload_app", extra=["--pythonpath", str(appdir)])
    old = wait_workers(master, 2)
    load = hello_load(server, path="/t/", expect={b"first version", b"second version!"})
    try:
        module.write_text('raise RuntimeError("this version of the app is broken on purpose")\n')
        master.proc.send_signal(signal.SIGHUP)
        wait_log(master, "reload failed", timeout=SETTLE)
        wait_for(lambda: worker_pids(master) == old, 10,
                 what="only the old workers left after the failed reload")
        load.wait_succeeded(50)
        assert worker_pids(master) == old, "the old workers must keep serving after a failed reload"
        assert "reload complete" not in log_text(master)
        assert request(server, "GET", "/t/").body == b"first version"
        # Fixed again: the next reload goes through and serves the new code.
        module.write_text(app_source.format(body=b"second version!"))
        hup_and_wait(master)
        wait_workers(master, 2, without=old)
        load.wait_succeeded(50)
    finally:
        report = load.stop()
    assert_clean(report, master)
    assert request(server, "GET", "/t/").body == b"second version!"


# -- crashes, flapping, harakiri ------------------------------------------------------


def test_sigkilled_worker_under_load_is_replaced_and_its_requests_get_502(harness: Harness) -> None:
    server, master = serve(harness)
    pids = wait_workers(master, 2)
    victim = min(pids)
    load = hello_load(server, clients=6)
    try:
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        wait_workers(master, 2, timeout=SETTLE, without={victim})
        replaced_after = time.monotonic() - killed
        load.wait_succeeded(100)
    finally:
        report = load.stop()
    assert report.hung == 0 and report.unfinished == 0, report.summary()
    assert set(report.failures) <= {502}, report.summary()
    assert report.failed <= 6, f"more failures than requests in flight: {report.summary()}"
    assert replaced_after < 10, f"replacement ready only after {replaced_after:.1f} s"


def test_a_worker_killed_mid_upload_leaves_no_temp_file(harness: Harness, tmp_path: Path) -> None:
    """Mongrel2 never deletes an upload file and the worker that would have is
    gone: the dispatcher deletes it when it answers the 502."""
    server, master = serve(harness)
    wait_workers(master, 2)
    record = tmp_path / "slow.txt"
    body = os.urandom(CONTENT_LENGTH * 5)  # over limits.content_length: a temp file
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(request, server, "POST", f"/t/slow?s=30&record={quote(str(record))}", body,
                             {"Content-Type": "application/octet-stream"}, 40)
        wait_for(record.exists, 20, what="the upload to reach the app")
        assert len(upload_files(server)) == 1  # the app holds it open
        os.kill(int(record.read_text().split()[1]), signal.SIGKILL)
        resp = future.result(timeout=45)
    assert resp.status == 502, f"{resp.status} {resp.body[:200]!r}\n{log_text(master)[-3000:]}"
    wait_for(lambda: upload_files(server) == [], 10, what="the upload temp file to be deleted")
    wait_log(master, "which no worker will serve", timeout=10)  # logged just after the unlink: wait, do not race


@pytest.mark.slow
def test_flapping_worker_is_respawned_with_growing_delays(harness: Harness, tmp_path: Path) -> None:
    """Workers that die right after start are respawned with back-off, not in a tight loop.

    The app module dies on import once a marker file exists, except in the
    master's throwaway import check (`python -m fleet.appload`): the master
    starts normally, then one worker is killed and its replacements die.
    """
    appdir = tmp_path / "app"
    appdir.mkdir()
    marker = tmp_path / "flap"
    (appdir / "flap_app.py").write_text(textwrap.dedent(f"""
        import os, sys

        if os.path.exists({str(marker)!r}) and not sys.argv[0].endswith("appload.py"):
            os._exit(1)

        def application(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "12")])
            return [b"Hello world!"]
    """))
    server, master = serve(harness, module="flap_app", extra=["--pythonpath", str(appdir)])
    pids = wait_workers(master, 2)
    load = hello_load(server, path="/t/")
    try:
        marker.touch()
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        wait_log(master, "flapping", 3, timeout=SETTLE)
        time.sleep(max(0.0, killed + 8.0 - time.monotonic()))
        flaps = [line for line in log_text(master).splitlines() if "flapping" in line]
        load.wait_succeeded(50)  # the other worker serves on
        marker.unlink()
        wait_workers(master, 2, timeout=45, without={victim})
    finally:
        report = load.stop()
    assert set(report.failures) <= {502} and report.failed <= CLIENTS, report.summary()
    assert report.hung == 0 and report.unfinished == 0, report.summary()
    assert len(flaps) < 20, f"{len(flaps)} quick deaths in 8 s: a tight respawn loop\n" + "\n".join(flaps)
    times = [_log_time(line) for line in flaps]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) >= 2 and gaps[-1] > gaps[0] + 0.5, f"respawn delays do not grow: {gaps}\n" + "\n".join(flaps)


def _log_time(line: str) -> float:
    match = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line)
    assert match, f"no timestamp in {line!r}"
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.mark.slow
def test_harakiri_kills_a_stuck_worker_and_answers_504(harness: Harness, tmp_path: Path) -> None:
    server, master = serve(harness, extra=["--harakiri", "2"])
    wait_workers(master, 2)
    load = hello_load(server)
    record = tmp_path / "slow.txt"
    try:
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            future = pool.submit(request, server, "GET", f"/t/slow?s=30&record={quote(str(record))}",
                                 None, None, 40)
            wait_for(record.exists, 20, what="the slow request to reach the app")
            victim = int(record.read_text().split()[1])
            resp = future.result(timeout=45)
            answered_after = time.monotonic() - started
        wait_workers(master, 2, without={victim})
        load.wait_succeeded(100)
    finally:
        report = load.stop()
    assert resp.status == 504, f"{resp.status} {resp.body[:200]!r}\n{log_text(master)[-3000:]}"
    assert answered_after < 10, f"the stuck request was answered only after {answered_after:.1f} s"
    # What the killed worker held besides the stuck request gets 502; nothing hangs.
    assert set(report.failures) <= {502} and report.failed <= CLIENTS, report.summary()
    assert report.hung == 0 and report.unfinished == 0, report.summary()
    assert request(server, "GET", HELLO_PATH).body == HELLO


def test_harakiri_spares_the_request_queued_behind_the_stuck_one(harness: Harness, tmp_path: Path) -> None:
    """One worker, one thread: the thread holds the stuck request and the next one (prefetch).

    Only the stuck request gets the 504. The one that waited behind it never
    ran: the worker gave it back to the dispatcher as soon as the thread was
    stuck, and the worker that replaces the killed one serves it.
    """
    server, master = serve(harness, processes=1, threads=1, extra=["--harakiri", "2"])
    (victim,) = wait_workers(master, 1)
    record = tmp_path / "slow.txt"
    with ThreadPoolExecutor(2) as pool:
        stuck = pool.submit(request, server, "GET", f"/t/slow?s=30&record={quote(str(record))}", None, None, 40)
        wait_for(record.exists, 20, what="the slow request to reach the app")
        queued = pool.submit(request, server, "GET", HELLO_PATH, None, None, 40)
        answers = (stuck.result(timeout=45).status, queued.result(timeout=45).status)
    wait_workers(master, 1, without={victim})
    assert answers == (504, 200), f"stuck, queued: {answers}\n{log_text(master)[-2000:]}"
    assert request(server, "GET", HELLO_PATH).body == HELLO


# -- scaling and recycling ---------------------------------------------------------


def test_ttin_then_ttou_under_load(harness: Harness) -> None:
    server, master = serve(harness)
    two = wait_workers(master, 2)
    load = hello_load(server)
    try:
        master.proc.send_signal(signal.SIGTTIN)
        three = wait_workers(master, 3)
        assert two < three
        load.wait_succeeded(50)
        master.proc.send_signal(signal.SIGTTOU)
        back = wait_workers(master, 2)
        assert back < three
        load.wait_succeeded(50)
    finally:
        report = load.stop()
    assert_clean(report, master)


def test_max_requests_recycles_workers_without_losing_requests(harness: Harness) -> None:
    server, master = serve(harness, extra=["--max-requests", "50", "--max-requests-jitter", "10"])
    first = wait_workers(master, 2)
    load = hello_load(server, pause=0.02)  # recycles every second or so, not in a storm
    try:
        load.wait_succeeded(300)  # > 2 x (50 + 10): every first worker has reached its limit
        wait_gone(first, master)
        load.wait_succeeded(200)  # and a few recycles more
    finally:
        report = load.stop()
    assert_clean(report, master)
    wait_workers(master, 2, without=first)


def test_reload_on_rss_recycles_a_bloated_worker(harness: Harness) -> None:
    server, master = serve(harness, extra=["--reload-on-rss", "150"])
    wait_workers(master, 2)
    load = hello_load(server)
    try:
        bloated = None
        for _ in range(40):  # 25 MB a request, to whichever worker gets it
            data = request(server, "GET", "/t/hog").json()
            if data["rss"] and data["rss"] > 200 * 1024 * 1024:
                bloated = data["pid"]
                break
        assert bloated is not None, "no worker grew past 200 MB"
        wait_gone({bloated}, master, timeout=SETTLE)
        wait_workers(master, 2, without={bloated})
        load.wait_succeeded(50)
    finally:
        report = load.stop()
    assert_clean(report, master)


# -- stopping --------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_under_load_finishes_every_request_in_flight(harness: Harness, tmp_path: Path) -> None:
    """Requests the workers hold when TERM arrives all complete with a 200.

    The load here is of half-second requests, and fewer requests run at once
    than there are threads, so every request sent before TERM is in a worker
    (none waits in the dispatcher, where a stopping master answers 503). A
    request sent in the last 100 ms before TERM may still be on its way to the
    master: those are not counted either way.
    """
    server, master = serve(harness, processes=2, threads=4)
    wait_workers(master, 2)
    record = tmp_path / "slow.txt"
    load = Load(server.port, "/t/slow?s=0.5", clients=3, timeout=10.0, max_duration=LOAD_LIMIT).start()
    load.wait_succeeded(6)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(request, server, "GET", f"/t/slow?s=2&record={quote(str(record))}",
                               None, None, 30) for _ in range(3)]
        wait_for(lambda: record.exists() and record.read_text().count("started") == 3, 20,
                 what="the 3 slow requests to reach the app")
        time.sleep(0.25)  # the load's requests are in lockstep: now mid-way through theirs
        load.halt()  # no new request from now on; those in flight must all complete
        term = time.monotonic()
        master.proc.send_signal(signal.SIGTERM)
        slow = [f.result(timeout=40) for f in futures]
    report = load.stop()
    assert [r.status for r in slow] == [200, 200, 200], [(r.status, r.body[:100]) for r in slow]
    assert master.wait_exit(timeout=30) == 0, log_text(master)[-3000:]
    settled = [s for s in report.samples if s.start < term - 0.1]
    held = [s for s in settled if s.start + s.latency > term]
    assert held, f"no load request was in flight at TERM: {report.summary()}"
    assert all(s.outcome == OK for s in settled), f"{report.summary()}\n{log_text(master)[-3000:]}"


# -- stats --------------------------------------------------------------------


def test_stats_show_workers_and_growing_counts(harness: Harness) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server, master = serve(harness, extra=["--stats", endpoint])
    pids = wait_workers(master, 2)
    load = hello_load(server)
    try:
        first = fleet_stats(endpoint)
        assert first["pid"] == master.pid
        assert {w["pid"] for w in first["workers"]} == pids, first
        for worker in first["workers"]:
            assert worker["state"] in WORKER_STATES, worker
            assert worker["generation"] == first["generation"], worker
            assert worker["rss"] > 0 and worker["threads"] >= 2, worker
            assert worker["request_age"] is None or worker["request_age"] >= 0, worker
            assert isinstance(worker["requests"], int) and isinstance(worker["cpu"], (int, float)), worker
        assert first["totals"]["workers"] == 2, first
        assert first["reloads"] == 0 and first["failed_reloads"] == 0, first
        for key in ("respawns", "harakiri_kills", "answered_502", "answered_504"):
            assert first[key] == 0, (key, first)
        assert first["recycles"] == {"max_requests": 0, "rss": 0}, first
        load.wait_succeeded(200)
        seen: dict = {}

        def grown() -> bool:  # workers may report their counts with some delay
            seen["stats"] = fleet_stats(endpoint)
            return (seen["stats"]["totals"]["requests"] >= first["totals"]["requests"] + 200
                    and sum(w["requests"] for w in seen["stats"]["workers"])
                    >= sum(w["requests"] for w in first["workers"]) + 200)

        try:
            wait_for(grown, 15, interval=0.5, what="the request counts to grow")
        except AssertionError:
            raise AssertionError(f"counts did not grow by 200: {first} -> {seen.get('stats')}") from None

        hup_and_wait(master)
        wait_workers(master, 2, without=pids)
        third = fleet_stats(endpoint)
        assert third["generation"] == first["generation"] + 1 and third["reloads"] == 1, third
        assert {w["generation"] for w in third["workers"]} == {third["generation"]}, third

        table = fleet_cli("stats", "--stats", endpoint)
        assert table.returncode == 0, table.stderr
        assert all(str(w["pid"]) in table.stdout for w in third["workers"]), table.stdout
    finally:
        report = load.stop()
    assert_clean(report, master)


def test_stats_without_a_master_fails_in_one_line() -> None:
    started = time.monotonic()
    out = fleet_cli("stats", "--stats", f"tcp://127.0.0.1:{free_port()}", "--json", "--timeout", "1")
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert time.monotonic() - started < 15


@pytest.mark.slow
def test_stats_count_crashes_and_harakiri(harness: Harness, tmp_path: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server, master = serve(harness, extra=["--stats", endpoint, "--harakiri", "2"])
    pids = wait_workers(master, 2)
    load = hello_load(server)
    record = tmp_path / "slow.txt"
    try:
        os.kill(min(pids), signal.SIGKILL)
        wait_workers(master, 2, without={min(pids)})
        resp = request(server, "GET", f"/t/slow?s=30&record={quote(str(record))}", timeout=40)
        stuck = int(record.read_text().split()[1])
        wait_workers(master, 2, without={min(pids), stuck})
        load.wait_succeeded(50)
        stats = fleet_stats(endpoint)
    finally:
        report = load.stop()
    assert resp.status == 504
    counters = {k: v for k, v in stats.items() if k not in ("workers", "totals")}
    assert set(report.failures) <= {502}, f"load: {report.summary()}; master: {counters}"
    assert stats["respawns"] >= 1 and stats["harakiri_kills"] == 1, counters
    # Only the stuck request was answered 504; the other requests the two dead workers held, 502.
    assert stats["answered_504"] == 1, f"master: {counters}; load: {report.summary()}"
    assert stats["answered_502"] == report.failures[502], f"master: {counters}; load: {report.summary()}"


# -- log file -------------------------------------------------------------------


def test_usr1_reopens_the_log_file(harness: Harness, tmp_path: Path) -> None:
    log_file = tmp_path / "fleet.log"
    rotated = tmp_path / "fleet.log.1"
    server, master = serve(harness, processes=1, extra=["--log-file", str(log_file)], ready=False)
    wait_log(master, "master ready", log_file=log_file)
    assert "master ready" not in master.stderr_text(), "log lines belong in --log-file"
    (first,) = wait_workers(master, 1, log_file=log_file)
    load = hello_load(server)
    try:
        log_file.rename(rotated)
        master.proc.send_signal(signal.SIGUSR1)
        wait_for(log_file.exists, 10, what="a new log file at the original path")

        def new_file_has(text: str) -> bool:
            return text in log_file.read_text(errors="replace")

        # A worker line (the traceback of a failing request) reaches the new file...
        def boom_logged() -> bool:
            assert request(server, "GET", "/t/boom").status == 500
            return new_file_has("boom: this app always fails")

        wait_for(boom_logged, 10, interval=0.2, what="the worker to log into the new file")
        old_size = rotated.stat().st_size
        booms = log_file.read_text(errors="replace").count("boom: this app always fails")
        for _ in range(3):
            assert request(server, "GET", "/t/boom").status == 500
        wait_for(lambda: log_file.read_text(errors="replace").count("boom: this app always fails") >= booms + 3,
                 10, what="3 more tracebacks in the new file")
        # ...and so does a master line.
        master.proc.send_signal(signal.SIGTTIN)
        wait_for(lambda: len(worker_pids(master)) == 2 and worker_pids(master) - {first}
                 <= ready_pids(log_file.read_text(errors="replace")), SETTLE,
                 what="the new worker's ready line in the new file")
        assert rotated.stat().st_size == old_size, "lines still went to the rotated file"
    finally:
        report = load.stop()
    assert_clean(report, master, log_file)
