"""One log format for the master and its workers, on stderr or in a file,
and with ``--logger`` also to a ZeroMQ collector (fleet.logs.push)."""

from __future__ import annotations

import logging
import sys

import zmq

from fleet.config import ConfigError
from fleet.logs.push import PushHandler, parse_logger

FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "info", path: str | None = None, logger: str | None = None) -> None:
    """Log to stderr, or append to ``path`` (several processes may share it:
    each line is one write to a file opened in append mode). With ``logger``
    ('zeromq:ENDPOINT') every line also goes to that collector; the local log
    stays, so nothing is lost while the collector is down."""
    handler: logging.Handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handlers = [handler]
    root = logging.getLogger()
    if logger:
        try:
            handlers.append(PushHandler(parse_logger(logger), local=handler))
        except (ConfigError, zmq.ZMQError) as error:  # an announced value we cannot use: say so, log locally
            handler.handle(logging.makeLogRecord({"name": "fleet.logger", "levelno": logging.ERROR,
                                                  "levelname": "ERROR", "msg": f"not logging to {logger!r}: {error}"}))
    for old in root.handlers:
        if isinstance(old, (PushHandler, logging.FileHandler)):
            old.close()  # set up again (a node's new configuration): the old socket and file go
    root.handlers[:] = handlers
    root.setLevel(level.upper())


def reopen_log_file() -> None:
    """After logrotate moved the file: start a new one at the same path."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                handler.close()
                handler.stream = handler._open()
            finally:
                handler.release()
