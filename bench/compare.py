"""fleet against every contender in one run: the raw floor through Mongrel2, and uWSGI, gunicorn, granian on HTTP.

    .venv/bin/python -m bench.compare [--rounds 3] [--duration 10] [-p 2] [--only floor,fleet-broker,...]

One real Mongrel2 carries the Mongrel2 rows (the raw pyzmq floor handler,
fleet's broker and direct modes, and broker mode with 8 threads a process);
the HTTP rows are fleet `--http`, uWSGI `--http-socket` (its C HTTP parser in
the workers; it closes every connection after one response, which wrk counts
as read errors) and `--http11-socket` (the same with keep-alive), gunicorn's
sync worker and granian's WSGI mode (a Rust core).
Every contender serves bench/hello_app.py with the same processes; each one
from PyPI is installed by this bench into its own virtualenv under
bench/.venvs (made once, reused). `wrk` (keep-alive, a Lua script that checks
every body) loads each in turn, interleaved over the rounds; each row is the
median run, with its ratio to the floor of the same round, p50/p99 and the CPU
µs each process spent per request. The targets of the speed work are computed
from the same rows and printed last; everything goes to
bench/results/compare.json too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from bench.common import (
    BENCH,
    RESULTS,
    Contender,
    Result,
    add_wrk_args,
    check_wrk_args,
    finish,
    make_rig,
    medians,
    print_results,
    run_rounds,
    write_results,
)
from fleet.dev.mongrel2 import HandlerRoute, free_port

BASELINE = "floor"
VENVS = BENCH / ".venvs"
# What each outside contender is, pinned so that two runs compare the same code.
PACKAGES = {
    "uwsgi": "uwsgi==2.0.31",  # builds its C core with gcc and the Python headers
    "gunicorn": "gunicorn==27.0.1",
    "granian": "granian==2.8.9",
}
MONGREL2_ROWS = ("floor", "fleet-broker", "fleet-direct", "fleet-broker-t8")
HTTP_ROWS = ("fleet-http", "uwsgi-http-socket", "uwsgi-http11-socket", "gunicorn-sync", "granian-wsgi")
ALL = MONGREL2_ROWS + HTTP_ROWS


def tool_venv(name: str) -> Path:
    """bench/.venvs/NAME with PACKAGES[NAME] installed (made on first use); its bin directory."""
    venv = VENVS / name
    stamp = venv / ".installed"
    if not stamp.exists() or stamp.read_text() != PACKAGES[name]:
        print(f"-- installing {PACKAGES[name]} into {venv}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        PACKAGES[name]], check=True)
        stamp.write_text(PACKAGES[name])
    return venv / "bin"


def contenders(names: list[str], processes: int, route: HandlerRoute,
               logdir: Path) -> dict[str, tuple[Contender, int]]:
    """name -> (contender, its HTTP port; 0 for the Mongrel2 rows, which wrk reaches through Mongrel2)."""
    zmq = f"{route.send_spec},{route.recv_spec}"
    fleet = [sys.executable, "-m", "fleet", "master", "--pythonpath", str(BENCH), "--module", "hello_app",
             "-p", str(processes)]
    made: dict[str, tuple[Contender, int]] = {}

    def add(name: str, cmd: list[str], ready: str, port: int = 0, env: dict[str, str] | None = None,
            closes: bool = False) -> None:
        made[name] = (Contender(name, cmd, ready, logdir, env=env, closes=closes), port)

    def uwsgi(socket_option: str, port: int) -> list[str]:
        return [str(tool_venv("uwsgi") / "uwsgi"), "--master", "--processes", str(processes),
                "--wsgi-file", str(BENCH / "hello_app.py"), "--disable-logging", "--die-on-term",
                "--need-app", "--listen", "1024", socket_option, f"127.0.0.1:{port}"]

    for name in names:
        if name == "floor":
            add(name, [sys.executable, str(BENCH / "floor_handler.py"), route.send_spec, route.recv_spec,
                       "-p", str(processes)], "processes ready")
        elif name == "fleet-broker":
            add(name, [*fleet, "--zeromq", zmq], "master ready")
        elif name == "fleet-direct":
            add(name, [*fleet, "--zeromq", zmq, "--dispatch", "direct"], "master ready")
        elif name == "fleet-broker-t8":
            add(name, [*fleet, "--zeromq", zmq, "--threads", "8"], "master ready")
        elif name == "fleet-http":
            port = free_port()
            add(name, [*fleet, "--http", f"127.0.0.1:{port}"], "master ready", port)
        elif name == "uwsgi-http-socket":  # closes after every response: wrk reconnects
            port = free_port()
            add(name, uwsgi("--http-socket", port), "spawned uWSGI worker", port, closes=True)
        elif name == "uwsgi-http11-socket":  # the same C parser, with keep-alive
            port = free_port()
            add(name, uwsgi("--http11-socket", port), "spawned uWSGI worker", port)
        elif name == "gunicorn-sync":
            port = free_port()
            add(name, [str(tool_venv("gunicorn") / "gunicorn"), "--chdir", str(BENCH), "-w", str(processes),
                       "--log-level", "info", "-b", f"127.0.0.1:{port}", "--worker-class", "sync",
                       "hello_app:application"], "Booting worker", port)
        elif name == "granian-wsgi":
            port = free_port()
            add(name, [str(tool_venv("granian") / "granian"), "--interface", "wsgi", "--host", "127.0.0.1",
                       "--port", str(port), "--workers", str(processes), "--blocking-threads", "1",
                       "--working-dir", str(BENCH), "--log-level", "info", "hello_app:application"],
                "Started worker", port, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return made


def targets(results: list[Result]) -> list[tuple[str, float | None, str]]:
    """(what, measured, goal) for each target of the speed work, from the median rows."""
    by = {r.name: r for r in results}

    def ratio(a: str, b: str, field: str = "requests_per_s") -> float | None:
        if a in by and b in by and getattr(by[b], field):
            return getattr(by[a], field) / getattr(by[b], field)
        return None

    dispatcher = by["fleet-broker"].cpu_us.get("master") if "fleet-broker" in by else None
    return [
        ("broker / floor (req/s)", ratio("fleet-broker", "floor"), ">= 0.8"),
        ("direct / floor (req/s)", ratio("fleet-direct", "floor"), ">= 0.9"),
        ("broker p99 / floor p99", ratio("fleet-broker", "floor", "p99_ms"), "<= 1.5"),
        ("--http / uWSGI --http-socket", ratio("fleet-http", "uwsgi-http-socket"), ">= 1.0"),
        ("--http / granian", ratio("fleet-http", "granian-wsgi"), ">= 0.5"),
        ("--http / gunicorn sync", ratio("fleet-http", "gunicorn-sync"), ">= 3"),
        ("broker -t8 / broker -t1", ratio("fleet-broker-t8", "fleet-broker"), ">= 0.8"),
        ("master (dispatcher) CPU µs/request", dispatcher, "<= 10"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_wrk_args(parser)
    parser.add_argument("-p", "--processes", type=int, default=2, help="worker processes of every contender")
    parser.add_argument("--only", default=",".join(ALL), help=f"comma-separated, of: {', '.join(ALL)}")
    parser.add_argument("--json-out", type=Path, default=RESULTS / "compare.json")
    args = parser.parse_args(argv)
    check_wrk_args(parser, args)
    wanted = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(wanted) - set(ALL)
    if unknown:
        parser.error(f"unknown contenders: {', '.join(sorted(unknown))}")

    rig = make_rig("fleet-compare-")
    pool = contenders(wanted, args.processes, rig.route, rig.workdir)
    failures: dict[str, str] = {}
    try:
        rig.server.start()
        runs = run_rounds(rig, pool, wanted, BASELINE, args, failures)
    finally:
        for contender, _ in pool.values():
            contender.stop()
        rig.server.stop()

    results = medians(runs, wanted)
    print(f"{args.processes} processes; wrk -t{args.threads} -c{args.connections} keep-alive, {args.duration} s, "
          f"median of {args.rounds} round(s); ratio to the floor of the same round")
    print_results(results, BASELINE)
    goals = targets(results)
    print()
    for what, value, goal in goals:
        print(f"{what:<38} {'-' if value is None else f'{value:.2f}':>8}   target {goal}")
    for name, error in failures.items():
        print(f"{name}: FAILED ({error.splitlines()[0] if error else ''})")
    write_results(args.json_out, "compare", args, results, baseline=BASELINE, runs=runs, failures=failures,
                  targets=[{"what": w, "value": v, "goal": g} for w, v, g in goals])
    return finish(rig.workdir, bool(failures) or any(r.bad for r in results), args.keep)


if __name__ == "__main__":
    sys.exit(main())
