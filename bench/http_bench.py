"""Plain HTTP throughput: `fleet master --http` against gunicorn and uWSGI, same app, same processes.

    .venv/bin/pip install gunicorn uwsgi      # bench-only; uwsgi builds with gcc + python3-dev
    .venv/bin/python -m bench.http_bench [--rounds 3] [-p 2] [--app-threads 1] [--duration 10]

Every contender serves bench/hello_app.py with the same process and thread
count; `wrk` (keep-alive, a Lua script that checks every body) loads each in
turn, interleaved over the rounds; the median run of each is reported with
its ratio to gunicorn in the same round. For reference the same fleet also
runs as a Mongrel2 handler behind a real Mongrel2 (the `fleet-mongrel2` row).

uWSGI appears twice, both with keep-alive on: `--http --http-keepalive` (what
the issue names: uWSGI's HTTP router process in front of the workers) and
`--http11-socket` (the workers speak HTTP themselves, which is what fleet's
--http does). gunicorn runs its gthread worker (keep-alive, threads; the
baseline) and, with one thread, its default sync worker, which closes every
connection after one response (it expects a buffering proxy in front).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from bench.common import (
    BENCH,
    RESULTS,
    Contender,
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

BASELINE = "gunicorn-gthread"
ALL = ("fleet-http", "gunicorn-gthread", "gunicorn-sync", "uwsgi-http", "uwsgi-http11-socket", "fleet-mongrel2")


def tool(name: str) -> str | None:
    """A console script of this virtualenv (where pip put gunicorn and uwsgi), or on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def contenders(processes: int, threads: int, route: HandlerRoute, logdir: Path) -> dict[str, tuple[Contender, int]]:
    """name -> (contender, the port to load)."""
    out: dict[str, tuple[Contender, int]] = {}
    fleet = [sys.executable, "-m", "fleet", "master", "--pythonpath", str(BENCH), "--module", "hello_app",
             "-p", str(processes), "--threads", str(threads)]
    port = free_port()
    out["fleet-http"] = (Contender("fleet-http", [*fleet, "--http", f"127.0.0.1:{port}"], "master ready",
                                   logdir), port)
    out["fleet-mongrel2"] = (Contender("fleet-mongrel2", [*fleet, "--zeromq", f"{route.send_spec},{route.recv_spec}"],
                                       "master ready", logdir), 0)  # port: the Mongrel2 server's
    gunicorn = tool("gunicorn")
    if gunicorn:
        port = free_port()
        cmd = [gunicorn, "--chdir", str(BENCH), "-w", str(processes), "--log-level", "info"]
        out["gunicorn-gthread"] = (Contender("gunicorn-gthread", [
            *cmd, "-b", f"127.0.0.1:{port}", "--worker-class", "gthread", "--threads", str(threads),
            "hello_app:application"], "Booting worker", logdir), port)
        if threads == 1:  # the sync worker has no threads (and no keep-alive)
            port = free_port()
            out["gunicorn-sync"] = (Contender("gunicorn-sync", [
                *cmd, "-b", f"127.0.0.1:{port}", "--worker-class", "sync", "hello_app:application"],
                "Booting worker", logdir), port)
    uwsgi = tool("uwsgi")
    if uwsgi:
        base = [uwsgi, "--master", "--processes", str(processes), "--threads", str(threads),
                "--wsgi-file", str(BENCH / "hello_app.py"), "--disable-logging", "--die-on-term",
                "--need-app", "--listen", "1024"]
        port = free_port()
        out["uwsgi-http"] = (Contender("uwsgi-http", [*base, "--http", f"127.0.0.1:{port}", "--http-keepalive"],
                                       "spawned uWSGI worker", logdir), port)
        port = free_port()
        out["uwsgi-http11-socket"] = (Contender("uwsgi-http11-socket",
                                                [*base, "--http11-socket", f"127.0.0.1:{port}"],
                                                "spawned uWSGI worker", logdir), port)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_wrk_args(parser)
    parser.add_argument("-p", "--processes", type=int, default=2, help="server worker processes")
    parser.add_argument("--app-threads", type=int, default=1, help="threads per worker process")
    parser.add_argument("--only", default=",".join(ALL))
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    check_wrk_args(parser, args)
    json_out = args.json_out or RESULTS / f"http_bench-p{args.processes}-t{args.app_threads}.json"

    rig = make_rig("fleet-http-bench-")
    pool = contenders(args.processes, args.app_threads, rig.route, rig.workdir)
    wanted = [n for n in args.only.split(",") if n in pool]
    missing = [n for n in args.only.split(",") if n not in pool]
    if missing:
        print(f"-- not installed, skipped: {', '.join(missing)} (pip install gunicorn uwsgi)", file=sys.stderr)
    failures: dict[str, str] = {}
    try:
        rig.server.start()
        runs = run_rounds(rig, pool, wanted, BASELINE, args, failures)
    finally:
        for contender, _ in pool.values():
            contender.stop()
        rig.server.stop()
    results = medians(runs, wanted)
    print(f"{args.processes} process(es) x {args.app_threads} thread(s); wrk -t{args.threads} "
          f"-c{args.connections} keep-alive, {args.duration} s, median of {args.rounds} round(s); "
          f"ratio: to {BASELINE} in the same round (column 'vs')")
    print_results(results, BASELINE)
    for name, error in failures.items():
        print(f"{name}: FAILED ({error.splitlines()[0] if error else ''})")
    write_results(json_out, "http_bench", args, results, baseline=BASELINE, runs=runs, failures=failures)
    return finish(rig.workdir, bool(failures) or any(r.bad for r in results), args.keep)


if __name__ == "__main__":
    sys.exit(main())
