"""``fleet master``: validate the configuration, check the app imports, then supervise."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from fleet.appload import preflight_app
from fleet.cluster.options import cluster_requested, make_agent
from fleet.config import (
    DEFAULT_CONTENT_LENGTH,
    DEFAULT_UPLOAD_STORE,
    ConfigError,
    Endpoint,
    HandlerConfig,
    HttpAddress,
    check_endpoint,
)
from fleet.exitcodes import APP_LOAD_FAILED
from fleet.logs.local import setup_logging
from fleet.mongrel2.server_config import merge, read_server_config
from fleet.supervisor.metrics import metrics_address
from fleet.supervisor.supervisor import Supervisor

log = logging.getLogger("fleet.master")


def config_from_args(args: argparse.Namespace) -> tuple[HandlerConfig, list[str]]:
    """The configuration, and the lines to log once logging is set up (flags that
    differ from Mongrel2's own config)."""
    if not args.zeromq and not args.http and not args.mongrel2_config:
        raise ConfigError("--zeromq SEND_SPEC,RECV_SPEC (a Mongrel2 handler), --mongrel2-config PATH "
                          "or --http HOST:PORT is required")
    if not args.module:
        raise ConfigError("--module MODULE[:CALLABLE] is required (the WSGI application)")
    if not args.mongrel2_config and (args.mongrel2_server or args.mongrel2_route):
        raise ConfigError("--mongrel2-server and --mongrel2-route need --mongrel2-config PATH")
    chroot = args.mongrel2_chroot
    if chroot is not None:
        if not os.path.isdir(chroot):
            raise ConfigError(f"--mongrel2-chroot {chroot!r}: no such directory")
        chroot = os.path.abspath(chroot)
    server = read_server_config(args.mongrel2_config, args.mongrel2_server) if args.mongrel2_config else None
    mongrel2, notes = merge(server, endpoints=tuple(Endpoint.parse(text) for text in args.zeromq), chroot=chroot,
                            upload_store=args.mongrel2_upload_store, content_length=args.mongrel2_content_length,
                            routes=tuple(args.mongrel2_route), default_upload_store=DEFAULT_UPLOAD_STORE,
                            default_content_length=DEFAULT_CONTENT_LENGTH)
    if server is not None and not mongrel2.endpoints and not args.http:
        raise ConfigError(f"--mongrel2-config {args.mongrel2_config!r}: server {server.uuid} has no handler "
                          "route to serve (and no --http is given)")
    return HandlerConfig(
        endpoints=mongrel2.endpoints,
        app=args.module,
        processes=args.processes,
        threads=args.threads,
        pythonpath=tuple(os.path.abspath(p) for p in args.pythonpath),
        dispatch=args.dispatch,
        mongrel2_chroot=mongrel2.chroot,
        upload_store=mongrel2.upload_store,
        content_length_limit=mongrel2.content_length,
        graceful_timeout=args.graceful_timeout,
        reload_batch=args.reload_batch,
        harakiri=args.harakiri,
        max_requests=args.max_requests,
        max_requests_jitter=args.max_requests_jitter,
        reload_on_rss=args.reload_on_rss,
        http=tuple(str(HttpAddress.parse(text)) for text in args.http),
        http_keepalive=args.http_keepalive,
        http_timeout=args.http_timeout,
        http_max_body=args.http_max_body,
        logger=args.logger,
        interface=args.interface,
        asgi_concurrency=args.asgi_concurrency,
        asgi_loop=args.asgi_loop,
        websocket_max_size=args.websocket_max_size,
    ), notes


def run_master(args: argparse.Namespace) -> int:
    config, notes = config_from_args(args)
    problem = preflight_app(config)
    if problem is not None:
        print(problem, file=sys.stderr)
        return APP_LOAD_FAILED
    if args.stats:
        check_endpoint(args.stats, "--stats")
    setup_logging(args.log_level, args.log_file, config.logger)
    for note in notes:
        log.warning("%s", note)
    agent = make_agent(args, "master", config=config.to_dict()) if cluster_requested(args) else None
    try:
        return Supervisor(config, log_level=args.log_level, stats_endpoint=args.stats,
                          metrics=metrics_address(args.metrics), log_file=args.log_file,
                          cluster=agent).run()
    finally:
        if agent is not None:
            agent.close()
