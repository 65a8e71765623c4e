"""Plain HTTP throughput: `fleet master --http` against gunicorn and uWSGI, same app, same processes.

    .venv/bin/pip install gunicorn uwsgi      # bench-only; uwsgi builds with gcc + python3-dev
    .venv/bin/python bench/http_bench.py [--rounds 3] [-p 2] [--app-threads 1] [--duration 10]

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
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import psutil  # noqa: E402
from handler_bench import (  # noqa: E402
    Contender,
    Result,
    _cpu,
    check_once,
    check_wrk_args,
    finish,
    make_rig,
    median_run,
    run_wrk,
)

from fleet.dev.mongrel2 import HandlerRoute, free_port  # noqa: E402

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


def cpu_of(contender: Contender) -> dict[str, float]:
    top = psutil.Process(contender.proc.pid)
    return {"master": _cpu(top), "workers": sum(_cpu(c) for c in top.children(recursive=True))}


def measure(name: str, contender: Contender, port: int, script: Path, args: argparse.Namespace) -> Result:
    contender.start()
    try:
        check_once(port, "/bench")
        url = f"http://127.0.0.1:{port}/bench"
        run_wrk(url, script, args, args.warmup)
        before = cpu_of(contender)
        raw = run_wrk(url, script, args, args.duration)
        after = cpu_of(contender)
        check_once(port, "/bench")
    finally:
        contender.stop()
    requests = max(raw["requests"], 1)
    seconds = raw["duration_us"] / 1e6
    return Result(
        name=name, command=" ".join(contender.cmd[1:]),
        requests_per_s=raw["requests"] / seconds, requests=raw["requests"], duration_s=seconds,
        p50_ms=raw["p50_us"] / 1000, p90_ms=raw["p90_us"] / 1000, p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000, checked=raw["checked"], mismatches=raw["mismatches"],
        errors=raw["errors"], cpu_us={k: round((after[k] - before[k]) * 1e6 / requests, 1) for k in after})


def print_table(results: list[Result]) -> None:
    print(f"{'server':<18} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'checked':>9} "
          f"{'bad':>5} {'errors':>7} {'vs ' + BASELINE:>12}  cpu us/req top/children")
    for r in results:
        ratio = f"{r.ratio_to_floor:.2f}x" if r.ratio_to_floor is not None else "-"
        cpu = "/".join(f"{r.cpu_us[k]:.0f}" for k in ("master", "workers")) if r.cpu_us else "-"
        print(f"{r.name:<18} {r.requests_per_s:>9.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.max_ms:>8.1f} "
              f"{r.checked:>9} {r.mismatches:>5} {sum(r.errors.values()):>7} {ratio:>12}  {cpu}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("-p", "--processes", type=int, default=2, help="server worker processes")
    parser.add_argument("--app-threads", type=int, default=1, help="threads per worker process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=",".join(ALL))
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    check_wrk_args(parser, args)
    json_out = args.json_out or BENCH / "results" / f"http_bench-p{args.processes}-t{args.app_threads}.json"

    rig = make_rig("fleet-http-bench-")
    workdir, route, server, script = rig.workdir, rig.route, rig.server, rig.script
    pool = contenders(args.processes, args.app_threads, route, workdir)
    wanted = [n for n in args.only.split(",") if n in pool]
    missing = [n for n in args.only.split(",") if n not in pool]
    if missing:
        print(f"-- not installed, skipped: {', '.join(missing)} (pip install gunicorn uwsgi)", file=sys.stderr)
    runs: list[Result] = []
    failures: dict[str, str] = {}
    try:
        server.start()
        for round_number in range(args.rounds):
            baseline = None
            for name in sorted(wanted, key=lambda n: n != BASELINE):  # the baseline first in each round
                contender, port = pool[name]
                print(f"-- round {round_number + 1}: {name}", file=sys.stderr)
                try:
                    result = measure(name, contender, port or server.port, script, args)
                except Exception as error:
                    failures[name] = str(error)[-2000:]
                    print(f"-- {name} failed: {failures[name]}", file=sys.stderr)
                    continue
                baseline = result if name == BASELINE else baseline
                result.ratio_to_floor = result.requests_per_s / baseline.requests_per_s if baseline else None
                runs.append(result)
    finally:
        for contender, _ in pool.values():
            contender.stop()
        server.stop()
    results = [median_run([r for r in runs if r.name == n]) for n in wanted if any(r.name == n for r in runs)]
    print(f"{args.processes} process(es) x {args.app_threads} thread(s); wrk -t{args.threads} "
          f"-c{args.connections} keep-alive, {args.duration} s, median of {args.rounds} round(s); "
          f"ratio: to {BASELINE} in the same round (column 'vs')")
    print_table(results)
    for name, error in failures.items():
        print(f"{name}: FAILED ({error.splitlines()[0] if error else ''})")
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average": os.getloadavg()},
        "wrk": {"threads": args.threads, "connections": args.connections, "duration_s": args.duration},
        "processes": args.processes, "app_threads": args.app_threads, "rounds": args.rounds,
        "baseline": BASELINE, "results": [asdict(r) for r in results], "runs": [asdict(r) for r in runs],
        "failures": failures,
    }, indent=2) + "\n")
    print(f"wrote {json_out}", file=sys.stderr)
    return finish(workdir, bool(failures) or any(r.mismatches or sum(r.errors.values()) for r in results))


if __name__ == "__main__":
    sys.exit(main())
