"""``fleet master``: validate the configuration, check the app imports, then supervise."""

from __future__ import annotations

import argparse
import os
import sys

from fleet.appload import preflight_app
from fleet.cluster.options import cluster_requested, make_agent
from fleet.config import ConfigError, Endpoint, HandlerConfig, HttpAddress, check_endpoint
from fleet.exitcodes import APP_LOAD_FAILED
from fleet.logs.local import setup_logging
from fleet.supervisor.supervisor import Supervisor


def config_from_args(args: argparse.Namespace) -> HandlerConfig:
    if not args.zeromq and not args.http:
        raise ConfigError("--zeromq SEND_SPEC,RECV_SPEC (a Mongrel2 handler) or --http HOST:PORT is required")
    if not args.module:
        raise ConfigError("--module MODULE[:CALLABLE] is required (the WSGI application)")
    chroot = args.mongrel2_chroot
    if chroot is not None:
        if not os.path.isdir(chroot):
            raise ConfigError(f"--mongrel2-chroot {chroot!r}: no such directory")
        chroot = os.path.abspath(chroot)
    return HandlerConfig(
        endpoints=tuple(Endpoint.parse(text) for text in args.zeromq),
        app=args.module,
        processes=args.processes,
        threads=args.threads,
        pythonpath=tuple(os.path.abspath(p) for p in args.pythonpath),
        dispatch=args.dispatch,
        mongrel2_chroot=chroot,
        upload_store=args.mongrel2_upload_store,
        content_length_limit=args.mongrel2_content_length,
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
    )


def run_master(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    problem = preflight_app(config)
    if problem is not None:
        print(problem, file=sys.stderr)
        return APP_LOAD_FAILED
    if args.stats:
        check_endpoint(args.stats, "--stats")
    setup_logging(args.log_level, args.log_file, config.logger)
    agent = make_agent(args, "master", config=config.to_dict()) if cluster_requested(args) else None
    try:
        return Supervisor(config, log_level=args.log_level, stats_endpoint=args.stats, log_file=args.log_file,
                          cluster=agent).run()
    finally:
        if agent is not None:
            agent.close()
