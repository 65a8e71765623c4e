"""The ``fleet`` command line. User mistakes end in one line saying what to fix."""

from __future__ import annotations

import argparse
import sys

from fleet import __version__, ctl
from fleet.cluster.options import add_cluster_options
from fleet.config import (
    ASGI_LOOPS,
    DEFAULT_ASGI_CONCURRENCY,
    DEFAULT_CONTENT_LENGTH,
    DEFAULT_HTTP_KEEPALIVE,
    DEFAULT_HTTP_MAX_BODY,
    DEFAULT_HTTP_TIMEOUT,
    DEFAULT_UPLOAD_STORE,
    DEFAULT_WEBSOCKET_MAX_SIZE,
    DISPATCH_MODES,
    INTERFACES,
    ConfigError,
)
from fleet.exitcodes import USAGE
from fleet.logs.collector import run_logs
from fleet.logs.push import parse_logger
from fleet.master import run_master
from fleet.node import run_node


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"fleet: error: {message} (see 'fleet {self.prog.split()[-1]} --help')"
              if " " in self.prog else f"fleet: error: {message}", file=sys.stderr)
        raise SystemExit(USAGE)


def _number(kind: type, minimum: float, what: str):
    """An argparse type: a number of `kind`, at least `minimum`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    return parse


_positive_int = _number(int, 1, "a whole number")
_count = _number(int, 0, "a whole number")
_seconds = _number(float, 0, "a number of seconds")


def _logger(text: str) -> str:
    """An argparse type: a valid --logger spec, kept as given."""
    try:
        parse_logger(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix(f"--logger {text!r}: ")) from None
    return text


def add_handler_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zeromq", action="append", default=[], metavar="SEND_SPEC,RECV_SPEC",
                        help="a Mongrel2 handler's send_spec and recv_spec; repeat for several Mongrel2 servers")
    parser.add_argument("--module", metavar="MODULE[:CALLABLE]",
                        help="the WSGI application (the callable defaults to 'application')")
    parser.add_argument("-p", "--processes", type=_positive_int, default=1, metavar="N",
                        help="worker processes (default 1)")
    parser.add_argument("--threads", type=_positive_int, default=1, metavar="T",
                        help="request threads per worker process (default 1)")
    parser.add_argument("--pythonpath", action="append", default=[], metavar="DIR",
                        help="add DIR to the import path of the application (repeatable)")
    parser.add_argument("--mongrel2-config", metavar="PATH",
                        help="Mongrel2's config.sqlite (as m2sh writes it): the handlers of its routes (unless "
                             "--zeromq), its chroot, upload.temp_store and limits.content_length come from "
                             "there; a flag given as well wins")
    parser.add_argument("--mongrel2-server", metavar="UUID",
                        help="with --mongrel2-config: which server (needed when it has several)")
    parser.add_argument("--mongrel2-route", action="append", default=[], metavar="PATH",
                        help="with --mongrel2-config: serve only the handler of this route, e.g. /app/ "
                             "(repeatable; default: every handler route of the server)")
    parser.add_argument("--mongrel2-chroot", metavar="DIR",
                        help="the directory Mongrel2 chroots into (or runs in): where upload paths are resolved")
    parser.add_argument("--mongrel2-upload-store", metavar="PATH",
                        help=f"Mongrel2's upload.temp_store, as in its config (default {DEFAULT_UPLOAD_STORE})")
    parser.add_argument("--mongrel2-content-length", type=int, metavar="BYTES",
                        help=f"Mongrel2's limits.content_length (default {DEFAULT_CONTENT_LENGTH})")
    parser.add_argument("--dispatch", choices=DISPATCH_MODES, default="broker",
                        help="broker (default): a per-host dispatcher hands each request to a free thread and "
                             "loses nothing on reloads; direct: threads pull from Mongrel2 themselves")
    parser.add_argument("--graceful-timeout", type=_seconds, default=30.0, metavar="SECONDS",
                        help="how long a graceful stop or retirement waits for in-flight requests (default 30)")
    parser.add_argument("--reload-batch", type=_count, default=0, metavar="K",
                        help="on a reload, replace at most K workers at a time (default: all at once)")
    parser.add_argument("--harakiri", type=_seconds, default=0.0, metavar="SECONDS",
                        help="kill and replace a worker stuck on one request this long; its client gets 504")
    parser.add_argument("--max-requests", type=_count, default=0, metavar="N",
                        help="recycle a worker gracefully after N requests (default: never)")
    parser.add_argument("--max-requests-jitter", type=_count, default=0, metavar="J",
                        help="add up to J to --max-requests per worker, so they do not all recycle at once")
    parser.add_argument("--reload-on-rss", type=_count, default=0, metavar="MB",
                        help="recycle a worker gracefully when its RSS passes MB megabytes")
    parser.add_argument("--interface", choices=INTERFACES, default="wsgi",
                        help="how the application is called: wsgi (default, PEP 3333) or asgi (ASGI 3: "
                             "Starlette, FastAPI, Django's ASGI handler), served by one event loop per process")
    parser.add_argument("--asgi-concurrency", type=_positive_int, default=DEFAULT_ASGI_CONCURRENCY, metavar="N",
                        help=f"--interface asgi: requests one worker process serves at once "
                             f"(default {DEFAULT_ASGI_CONCURRENCY})")
    parser.add_argument("--asgi-loop", choices=ASGI_LOOPS, default="auto",
                        help="--interface asgi: the event loop; auto (default) takes uvloop when installed")
    parser.add_argument("--websocket-max-size", type=_positive_int, default=DEFAULT_WEBSOCKET_MAX_SIZE,
                        metavar="BYTES", help=f"--interface asgi: a bigger WebSocket message from a client closes "
                                              f"its connection with 1009 (default {DEFAULT_WEBSOCKET_MAX_SIZE})")
    parser.add_argument("--http", action="append", default=[], metavar="HOST:PORT",
                        help="also serve plain HTTP/1.1 here, from the same workers and threads "
                             "(repeatable; :PORT for every address)")
    parser.add_argument("--http-keepalive", type=_seconds, default=DEFAULT_HTTP_KEEPALIVE, metavar="SECONDS",
                        help=f"--http: how long an idle connection stays open between requests; 0 closes "
                             f"after each response (default {DEFAULT_HTTP_KEEPALIVE:g})")
    parser.add_argument("--http-timeout", type=_seconds, default=DEFAULT_HTTP_TIMEOUT, metavar="SECONDS",
                        help=f"--http: a request must arrive whole, and each write to the client progress, "
                             f"within this; slower clients get 408 or are closed (default {DEFAULT_HTTP_TIMEOUT:g})")
    parser.add_argument("--http-max-body", type=_count, default=DEFAULT_HTTP_MAX_BODY, metavar="BYTES",
                        help=f"--http: bigger request bodies get 413 (default {DEFAULT_HTTP_MAX_BODY})")



def add_supervisor_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stats", metavar="ENDPOINT",
                        help="answer `fleet stats` on this ZeroMQ endpoint, e.g. ipc:///run/fleet/stats")
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve the same figures as Prometheus text on http://HOST:PORT/metrics")
    parser.add_argument("--log-file", metavar="PATH",
                        help="append log lines here instead of stderr; SIGUSR1 reopens it")
    parser.add_argument("--logger", type=_logger, metavar="zeromq:ENDPOINT",
                        help="also send every log line of this host and its workers to a `fleet logs --bind` "
                             "collector, e.g. zeromq:tcp://10.0.0.5:5140; the local log (stderr or --log-file) "
                             "keeps every line; lines are dropped, never waited for, while the collector is down. "
                             "Nodes use the master's unless they give their own")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fleet", description="Serve WSGI applications as Mongrel2 handlers.")
    parser.add_argument("--version", action="version", version=f"fleet {__version__}")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    master = commands.add_parser("master", help="serve an application as a Mongrel2 handler")
    add_handler_options(master)
    add_supervisor_options(master)
    add_cluster_options(master)
    master.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=argparse.SUPPRESS)
    node = commands.add_parser("node", help="serve what the cluster's master announces")
    add_cluster_options(node)
    node.add_argument("-p", "--processes", type=_positive_int, metavar="N",
                      help="override the master's process count on this host (a bigger box)")
    node.add_argument("--threads", type=_positive_int, metavar="T", help="override the master's thread count")
    node.add_argument("--mongrel2-chroot", metavar="DIR",
                      help="where Mongrel2's uploads are on this host, if it differs from the master's")
    node.add_argument("--mongrel2-config", metavar="PATH",
                      help="this host's own Mongrel2 (its config.sqlite): the handlers of its routes, its "
                           "chroot, upload.temp_store and limits.content_length replace the master's")
    node.add_argument("--mongrel2-server", metavar="UUID",
                      help="with --mongrel2-config: which server (needed when it has several)")
    node.add_argument("--mongrel2-route", action="append", default=[], metavar="PATH",
                      help="with --mongrel2-config: serve only the handler of this route (repeatable)")
    policy = node.add_argument_group("policy", "what a master may ask of this node; a configuration outside it "
                                                "is refused (the node keeps what it runs and reports "
                                                "'refused: <reason>'); not given: not restricted")
    policy.add_argument("--allow-module", action="append", metavar="PATTERN",
                        help="an allowed --module, shell-style pattern, e.g. 'shop.wsgi:*' (repeatable)")
    policy.add_argument("--allow-pythonpath", action="append", metavar="DIR",
                        help="a directory an announced --pythonpath may be in (repeatable)")
    policy.add_argument("--allow-chroot", action="append", metavar="DIR",
                        help="an allowed Mongrel2 chroot, where uploads are read and deleted (repeatable)")
    policy.add_argument("--allow-upload-store", action="append", metavar="PATH",
                        help="an allowed upload.temp_store template (repeatable)")
    policy.add_argument("--allow-endpoint", action="append", metavar="PATTERN",
                        help="an allowed Mongrel2 send/recv spec, shell-style, e.g. 'tcp://10.0.0.5:*' (repeatable)")
    policy.add_argument("--max-processes", type=_positive_int, metavar="N", help="at most N worker processes")
    policy.add_argument("--max-threads", type=_positive_int, metavar="T", help="at most T threads per process")
    policy.add_argument("--policy-file", metavar="PATH",
                        help="the same in a TOML file (modules, pythonpath, chroots, upload_stores, endpoints, "
                             "max_processes, max_threads); the options add to it")
    node.add_argument("--http", action="append", metavar="HOST:PORT",
                      help="serve HTTP here instead of the master's --http addresses (by default the "
                           "master's ports, on this host's --cluster-iface address unless they are wildcards)")
    add_supervisor_options(node)
    node.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=argparse.SUPPRESS)
    status = commands.add_parser("status", help="show every host of the cluster")
    add_cluster_options(status)
    status.add_argument("--json", action="store_true", help="print JSON (a stable interface for scripts)")
    reload = commands.add_parser("reload", help="rolling graceful reload of every host; waits and reports")
    add_cluster_options(reload)
    reload.add_argument("--batch", type=_positive_int, metavar="K", help="workers replaced at a time on each host")
    reload.add_argument("--timeout", type=_seconds, default=60.0, metavar="SECONDS")
    log = commands.add_parser("log", help="put a line in every host's log")
    add_cluster_options(log)
    log.add_argument("--level", choices=("debug", "info", "warning", "error", "critical"), default="info")
    log.add_argument("message")
    commands.add_parser("keygen", help="print a new random cluster key (for --cluster-key-file)")
    logs = commands.add_parser("logs", help="collect and print the log lines that --logger zeromq: sends")
    logs.add_argument("--bind", required=True, metavar="ENDPOINT",
                      help="the ZeroMQ endpoint to collect on, e.g. tcp://*:5140 or ipc:///run/fleet/logs")
    logs.add_argument("--output", metavar="FILE",
                      help="append the lines to FILE instead of printing them; SIGUSR1 reopens it")
    stats = commands.add_parser("stats", help="show the workers of a running master")
    stats.add_argument("--stats", required=True, metavar="ENDPOINT", help="the master's --stats endpoint")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.add_argument("--timeout", type=_seconds, default=3.0, metavar="SECONDS")
    return parser


COMMANDS = {"master": run_master, "node": run_node, "status": ctl.run_status, "reload": ctl.run_reload,
            "log": ctl.run_log, "keygen": ctl.run_keygen, "logs": run_logs, "stats": ctl.run_stats}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as error:
        print(f"fleet: error: {error}", file=sys.stderr)
        return USAGE


if __name__ == "__main__":
    raise SystemExit(main())
