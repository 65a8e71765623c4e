"""fleet's ASGI worker against uvicorn and granian's ASGI mode, in one run.

    .venv/bin/python -m bench.asgi_compare [--rounds 3] [--duration 10] [-p 2] [--only ...]

Rows: fleet --interface asgi through a real Mongrel2 (broker and direct
dispatch), fleet --interface asgi on --http, uvicorn (uvloop and httptools,
its fastest setting) and granian --interface asgi (a Rust core). Every row
serves bench/hello_asgi.py with the same processes; uvicorn and granian are
installed by this bench into their own virtualenvs under bench/.venvs. wrk
(keep-alive, every body checked) loads each in turn, interleaved over the
rounds; each row is the median run, with its ratio to uvicorn of the same
round and the CPU µs each process spent per request. Then the WebSocket
rows: bench.ws_echo's round trips per second (direct mode refuses
WebSockets). Results go to bench/results/asgi_compare.json too.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench import ws_echo
from bench.common import (
    BENCH,
    CPU_COLUMNS,
    RESULTS,
    Contender,
    add_wrk_args,
    check_once,
    check_wrk_args,
    cpu_seconds,
    finish,
    make_rig,
    medians,
    print_results,
    run_rounds,
    tree_cpu,
    write_results,
)
from bench.compare import PACKAGES, tool_venv
from fleet.dev.mongrel2 import HandlerRoute, free_port

BASELINE = "uvicorn"
PACKAGES.update({
    # uvicorn's fastest setting: uvloop's loop and httptools' parser, both C.
    "uvicorn": "uvicorn[standard]==0.55.0",
})
ALL = ("uvicorn", "granian-asgi", "fleet-asgi-broker", "fleet-asgi-direct", "fleet-asgi-http")
MONGREL2_ROWS = ("fleet-asgi-broker", "fleet-asgi-direct")
# Direct mode refuses WebSockets (Mongrel2 deals a socket's frames to any handler).
WEBSOCKET_ROWS = ("uvicorn", "granian-asgi", "fleet-asgi-broker", "fleet-asgi-http")


def contenders(names: list[str], processes: int, route: HandlerRoute, logdir: Path) -> dict[str, tuple[Contender, int]]:
    """name -> (contender, its HTTP port; 0 for the rows wrk reaches through Mongrel2)."""
    zmq = f"{route.send_spec},{route.recv_spec}"
    fleet = [sys.executable, "-m", "fleet", "master", "--pythonpath", str(BENCH), "--module", "hello_asgi",
             "--interface", "asgi", "-p", str(processes)]
    made: dict[str, tuple[Contender, int]] = {}
    for name in names:
        port = 0 if name in MONGREL2_ROWS else free_port()
        env = None
        if name == "fleet-asgi-broker":
            cmd, ready = [*fleet, "--zeromq", zmq], "master ready"
        elif name == "fleet-asgi-direct":
            cmd, ready = [*fleet, "--zeromq", zmq, "--dispatch", "direct"], "master ready"
        elif name == "fleet-asgi-http":
            cmd, ready = [*fleet, "--http", f"127.0.0.1:{port}"], "master ready"
        elif name == "uvicorn":
            cmd = [str(tool_venv("uvicorn") / "uvicorn"), "--app-dir", str(BENCH), "--workers", str(processes),
                   "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
                   "--no-access-log", "--log-level", "info", "hello_asgi:application"]
            ready = "Application startup complete"
        elif name == "granian-asgi":
            cmd = [str(tool_venv("granian") / "granian"), "--interface", "asgi", "--host", "127.0.0.1",
                   "--port", str(port), "--workers", str(processes), "--working-dir", str(BENCH),
                   "--log-level", "info", "hello_asgi:application"]
            ready, env = "Started worker", {**os.environ, "PYTHONUNBUFFERED": "1"}
        made[name] = (Contender(name, cmd, ready, logdir, env=env), port)
    return made


def measure_websockets(contender: Contender, port: int, mongrel2, args: argparse.Namespace) -> dict:
    """Start, warm up, run the echo client (bench.ws_echo) for the duration, stop; CPU per round trip."""
    target = port or mongrel2.port
    contender.start()
    try:
        check_once(target, "/bench")
        ws_echo.measure(target, "/ws", args.ws_connections, args.warmup)

        def snapshot() -> dict[str, float]:
            cpu = tree_cpu(contender.proc.pid)
            if mongrel2 is not None:
                cpu["mongrel2"] = cpu_seconds([mongrel2.pid])
            return cpu

        before = snapshot()
        result = ws_echo.measure(target, "/ws", args.ws_connections, args.duration)
        after = snapshot()
    finally:
        contender.stop()
    if result["errors"]:
        raise RuntimeError(f"{len(result['errors'])} connection(s) failed: {result['errors'][0]}")
    trips = max(result["round_trips"], 1)
    return {"name": contender.name, **result,
            "cpu_us": {k: round((after[k] - before[k]) * 1e6 / trips, 1) for k in after}}


def ws_medians(runs: list[dict], names: list[str]) -> list[dict]:
    """The median run of each name, with its ratio to uvicorn's median."""
    rows = []
    for name in names:
        mine = sorted((r for r in runs if r["name"] == name), key=lambda r: r["round_trips_per_s"])
        if mine:
            rows.append(dict(mine[(len(mine) - 1) // 2]))
    base = next((r["round_trips_per_s"] for r in rows if r["name"] == BASELINE), None)
    for row in rows:
        row["ratio"] = row["round_trips_per_s"] / base if base else None
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_wrk_args(parser)
    parser.add_argument("-p", "--processes", type=int, default=2, help="worker processes of every contender")
    parser.add_argument("--only", default=",".join(ALL), help=f"comma-separated, of: {', '.join(ALL)}")
    parser.add_argument("--json-out", type=Path, default=RESULTS / "asgi_compare.json")
    parser.add_argument("--no-websockets", dest="websockets", action="store_false",
                        help="skip the WebSocket echo runs")
    parser.add_argument("--ws-connections", type=int, default=32, help="WebSocket echo connections")
    args = parser.parse_args(argv)
    check_wrk_args(parser, args)
    wanted = [n.strip() for n in args.only.split(",") if n.strip()]
    if unknown := set(wanted) - set(ALL):
        parser.error(f"unknown contenders: {', '.join(sorted(unknown))}")

    rig = make_rig("fleet-asgi-compare-")
    pool = contenders(wanted, args.processes, rig.route, rig.workdir)
    ws_rows = [name for name in wanted if name in WEBSOCKET_ROWS] if args.websockets else []
    ws_runs: list[dict] = []
    failures: dict[str, str] = {}
    try:
        rig.server.start()
        runs = run_rounds(rig, pool, wanted, BASELINE, args, failures)
        for round_number in range(args.rounds):
            for name in ws_rows:
                contender, port = pool[name]
                print(f"-- round {round_number + 1}: {name} WebSocket echo", file=sys.stderr)
                try:
                    ws_runs.append(measure_websockets(contender, port, rig.server if not port else None, args))
                except Exception as error:
                    failures[f"{name} websocket"] = str(error)[-2000:]
                    print(f"-- {name} WebSocket echo failed: {failures[f'{name} websocket']}", file=sys.stderr)
    finally:
        for contender, _ in pool.values():
            contender.stop()
        rig.server.stop()

    results = medians(runs, wanted)
    print(f"ASGI hello world, {args.processes} processes; wrk -t{args.threads} -c{args.connections} keep-alive, "
          f"{args.duration} s, median of {args.rounds} round(s); ratio to uvicorn of the same round")
    print_results(results, BASELINE)
    ws_results = ws_medians(ws_runs, ws_rows)
    if ws_results:
        print(f"\nWebSocket echo: {args.ws_connections} connections, each a 12-byte text message and its echo, "
              f"back to back, {args.duration} s, median of {args.rounds} round(s)")
        print(f"{'server':<18} {'round trips/s':>14} {'p50 ms':>8} {'p99 ms':>8} {'bad':>5} {'vs uvicorn':>11}"
              f"  cpu us/round trip {'/'.join(CPU_COLUMNS)}")
        for row in ws_results:
            cpu = "/".join(f"{row['cpu_us'][k]:.0f}" if k in row["cpu_us"] else "-" for k in CPU_COLUMNS)
            ratio = f"{row['ratio']:.2f}x" if row.get("ratio") else "-"
            print(f"{row['name']:<18} {row['round_trips_per_s']:>14.0f} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} "
                  f"{row['bad']:>5} {ratio:>11}  {cpu}")
    for name, error in failures.items():
        print(f"{name}: FAILED ({error.splitlines()[0] if error else ''})")
    write_results(args.json_out, "asgi_compare", args, results, baseline=BASELINE, runs=runs, failures=failures,
                  websocket_echo=ws_results, websocket_runs=ws_runs)
    return finish(rig.workdir, bool(failures) or any(r.bad for r in results), args.keep)


if __name__ == "__main__":
    sys.exit(main())
