"""Graceful reloads under load: does any request fail or hang, and how slow do they get?

    .venv/bin/python -m bench.reload_bench [--duration 60] [--reloads 10] [--clients 8]
                                             [--dispatch broker,direct]

Starts one real Mongrel2 (fleet.dev.mongrel2) with one route, then for each
dispatch mode in turn runs `fleet master -p 4 --threads 4` with the hello app
(bench/hello_app.py) under a steady load from tests/support/load.py
(keep-alive clients, every body checked, a timeout per request), and sends
SIGHUP `--reloads` times spread evenly over the run, each time waiting for the
master's `reload complete` line. Every request is accounted for: succeeded,
failed (by status code or connection error) or hung (no answer within
`--timeout`).

Reported per mode: requests sent, succeeded, failed, hung; p50, p99 and worst
latency overall; the worst latency of the requests in flight around a reload
(from 1 s before the SIGHUP to 1 s after `reload complete`); how long reloads
took. Prints a table and writes bench/results/reload_bench.json. Everything is
stopped in `finally`. Exit status 1 if broker mode (the default mode, the one
that promises no loss) failed or hung a request, or a run broke.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import BENCH, EXPECTED_BODY, RESULTS, Contender, check_once, finish, make_rig, write_results
from fleet.dev.mongrel2 import HandlerRoute, Mongrel2
from tests.support.load import Load, Report

MAX_DURATION = 600  # seconds of load per mode: a typo must not run for hours
RELOAD_TIMEOUT = 60.0  # a reload that does not complete by then is reported and the run goes on
WINDOW = 1.0  # seconds either side of a reload counted as "around" it
PATH = "/bench"


@dataclass
class ReloadEvent:
    hup: float  # time.monotonic() of the SIGHUP
    done: float | None  # of the `reload complete` line being seen; None if it never came
    outcome: str  # "complete", "failed" or "timeout"
    at: float = 0.0  # seconds into the load when the SIGHUP was sent

    @property
    def seconds(self) -> float | None:
        return None if self.done is None else self.done - self.hup


@dataclass
class ModeResult:
    dispatch: str
    command: str
    duration_s: float
    clients: int
    sent: int
    succeeded: int
    failed: int
    hung: int
    unfinished: int
    failures: dict
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    worst_ms: float
    worst_near_reload_ms: float
    p99_near_reload_ms: float
    reloads_sent: int
    reloads_completed: int
    reload_s_mean: float | None
    reload_s_max: float | None
    errors: list = field(default_factory=list)


def log_count(contender: Contender, text: str) -> int:
    return contender.log.read_text(errors="replace").count(text)


def reload_once(contender: Contender) -> ReloadEvent:
    complete, failed = log_count(contender, "reload complete"), log_count(contender, "reload failed")
    hup = time.monotonic()
    contender.proc.send_signal(signal.SIGHUP)
    deadline = hup + RELOAD_TIMEOUT
    while time.monotonic() < deadline:
        if log_count(contender, "reload complete") > complete:
            return ReloadEvent(hup, time.monotonic(), "complete")
        if log_count(contender, "reload failed") > failed:
            return ReloadEvent(hup, time.monotonic(), "failed")
        if contender.proc.poll() is not None:
            raise RuntimeError(f"fleet master exited ({contender.proc.returncode}) during a reload")
        time.sleep(0.01)
    return ReloadEvent(hup, None, "timeout")


def summarise(dispatch: str, contender: Contender, report: Report, events: list[ReloadEvent]) -> ModeResult:
    near = []
    for event in events:
        end = (event.done if event.done is not None else event.hup + RELOAD_TIMEOUT) + WINDOW
        near.extend(report.between(event.hup - WINDOW, end))
    near_latencies = sorted({id(s): s.latency for s in near}.values())
    p99_near = near_latencies[max(0, -(-99 * len(near_latencies) // 100) - 1)] if near_latencies else 0.0
    took = [e.seconds for e in events if e.seconds is not None and e.outcome == "complete"]
    return ModeResult(
        dispatch=dispatch, command=" ".join(contender.cmd[1:]), duration_s=round(report.duration, 3),
        clients=report.clients, sent=report.sent, succeeded=report.succeeded, failed=report.failed,
        hung=report.hung, unfinished=report.unfinished,
        failures={str(k): v for k, v in report.failures.items()},
        requests_per_s=round(report.sent / report.duration, 1) if report.duration else 0.0,
        p50_ms=round(report.percentile(50) * 1000, 3), p99_ms=round(report.percentile(99) * 1000, 3),
        worst_ms=round(report.worst_latency * 1000, 3),
        worst_near_reload_ms=round(max(near_latencies, default=0.0) * 1000, 3),
        p99_near_reload_ms=round(p99_near * 1000, 3),
        reloads_sent=len(events), reloads_completed=len(took),
        reload_s_mean=round(sum(took) / len(took), 3) if took else None,
        reload_s_max=round(max(took), 3) if took else None,
        errors=report.errors[:10],
    )


def run_mode(dispatch: str, server: Mongrel2, route: HandlerRoute, workdir: Path,
             args: argparse.Namespace) -> tuple[ModeResult, list[ReloadEvent]]:
    cmd = [sys.executable, "-m", "fleet", "master", "--zeromq", f"{route.send_spec},{route.recv_spec}",
           "--pythonpath", str(BENCH), "--module", "hello_app", "-p", str(args.processes),
           "--threads", str(args.threads), "--dispatch", dispatch, "--log-level", "info"]
    contender = Contender(f"fleet-{dispatch}", cmd, "master ready", workdir)
    contender.start()
    load = None
    try:
        check_once(server.port, PATH)
        load = Load(server.port, PATH, expect=EXPECTED_BODY.encode(), clients=args.clients,
                    timeout=args.timeout, max_duration=args.duration + RELOAD_TIMEOUT + 30)
        load.start()
        started = time.monotonic()
        events: list[ReloadEvent] = []
        for i in range(args.reloads):
            at = started + args.duration * (i + 1) / (args.reloads + 1)
            time.sleep(max(0.0, at - time.monotonic()))
            event = reload_once(contender)
            event.at = event.hup - started
            events.append(event)
            print(f"   reload {i + 1}/{args.reloads}: {event.outcome}"
                  + (f" in {event.seconds:.2f} s" if event.seconds is not None else ""), file=sys.stderr)
        time.sleep(max(0.0, started + args.duration - time.monotonic()))
        report = load.stop()
        load = None
        check_once(server.port, PATH)
    finally:
        if load is not None:
            load.stop()
        contender.stop()
    return summarise(dispatch, contender, report, events), events


def print_table(results: list[ModeResult]) -> None:
    print(f"{'dispatch':<8} {'sent':>8} {'ok':>8} {'failed':>7} {'hung':>5} {'req/s':>7} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'worst ms':>9} {'worst@reload':>13} {'reloads':>8} {'reload s':>9}")
    for r in results:
        reloads = f"{r.reloads_completed}/{r.reloads_sent}"
        took = f"{r.reload_s_mean:.2f}" if r.reload_s_mean is not None else "-"
        print(f"{r.dispatch:<8} {r.sent:>8} {r.succeeded:>8} {r.failed:>7} {r.hung:>5} "
              f"{r.requests_per_s:>7.0f} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {r.worst_ms:>9.1f} "
              f"{r.worst_near_reload_ms:>13.1f} {reloads:>8} {took:>9}")
    for r in results:
        if r.failures:
            print(f"{r.dispatch}: failures {r.failures}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per dispatch mode")
    parser.add_argument("--reloads", type=int, default=10, help="SIGHUPs spread evenly over each run")
    parser.add_argument("--clients", type=int, default=8, help="load client threads (keep-alive connections)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a request counts as hung")
    parser.add_argument("-p", "--processes", type=int, default=4, help="fleet worker processes")
    parser.add_argument("--threads", type=int, default=4, help="threads per worker")
    parser.add_argument("--dispatch", default="broker,direct", help="comma-separated modes to run, in order")
    parser.add_argument("--json-out", type=Path, default=RESULTS / "reload_bench.json")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work dir (Mongrel2 and master logs); kept anyway on failure")
    args = parser.parse_args(argv)
    if not 1 <= args.duration <= MAX_DURATION:
        parser.error(f"--duration must be 1..{MAX_DURATION} seconds")
    if not 0 <= args.reloads <= 100 or not 1 <= args.clients <= 256 or not 0.5 <= args.timeout <= 120:
        parser.error("--reloads 0..100, --clients 1..256, --timeout 0.5..120")
    modes = [m.strip() for m in args.dispatch.split(",") if m.strip()]
    if not modes or set(modes) - {"broker", "direct"}:
        parser.error("--dispatch: broker and/or direct")

    rig = make_rig("fleet-reload-bench-")
    workdir, route, server = rig.workdir, rig.route, rig.server
    results: list[ModeResult] = []
    events: dict[str, list[dict]] = {}
    failures: dict[str, str] = {}
    try:
        server.start()
        for mode in modes:
            print(f"-- {mode}: {args.duration:.0f} s of load from {args.clients} clients, "
                  f"{args.reloads} reloads, -p {args.processes} --threads {args.threads}", file=sys.stderr)
            try:
                result, mode_events = run_mode(mode, server, route, workdir, args)
            except Exception as error:  # one broken mode must not hide the other
                failures[mode] = str(error)[-2000:]
                print(f"-- {mode} failed: {failures[mode]}", file=sys.stderr)
                continue
            results.append(result)
            events[mode] = [{"at_s": round(e.at, 3), "seconds": e.seconds and round(e.seconds, 3),
                             "outcome": e.outcome} for e in mode_events]
    finally:
        server.stop()

    print_table(results)
    for mode, error in failures.items():
        print(f"{mode}: FAILED ({error.splitlines()[0] if error else ''})")
    write_results(args.json_out, "reload_bench", args, results, window_s=WINDOW, reload_events=events,
                  failures=failures)
    broker = [r for r in results if r.dispatch == "broker"]
    bad = bool(failures) or any(r.failed or r.hung or r.unfinished or r.reloads_completed < r.reloads_sent
                                for r in broker)
    return finish(workdir, bad, args.keep)


if __name__ == "__main__":
    sys.exit(main())
