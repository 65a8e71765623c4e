"""Mongrel2's own configuration (the config.sqlite that ``m2sh load`` writes), read, not repeated.

``fleet master --mongrel2-config PATH [--mongrel2-server UUID]`` takes from it
what fleet must otherwise be told by hand and can get wrong: the handlers of
the server's routes (their send_spec and recv_spec), its chroot, and the
``upload.temp_store`` and ``limits.content_length`` settings. A flag given as
well wins; where it differs from the config, ``merge`` says so in one line
each (a temp_store that differs, for instance, refuses every upload).

The file is opened read-only; Mongrel2 may be running on it.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass

from fleet.config import ConfigError, Endpoint, check_endpoint

# How a handler spec that binds every address is reached from this host.
_WILDCARD_HOSTS = ("*", "0.0.0.0", "[::]")
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class HandlerRoute:
    """A route of the server whose target is a handler."""

    host: str
    path: str
    endpoint: Endpoint
    protocol: str


@dataclass(frozen=True)
class ServerConfig:
    uuid: str
    chroot: str  # absolute: a relative chroot is taken from the config file's directory
    routes: tuple[HandlerRoute, ...]
    upload_store: str | None  # upload.temp_store, None when not set (Mongrel2 then refuses big bodies)
    content_length: int | None  # limits.content_length, None when not set

    def endpoints(self, only_paths: tuple[str, ...] = ()) -> tuple[Endpoint, ...]:
        """The distinct handlers of every route, or of the routes whose path is in ``only_paths``."""
        chosen: list[Endpoint] = []
        for route in self.routes:
            if (not only_paths or route.path in only_paths) and route.endpoint not in chosen:
                chosen.append(route.endpoint)
        return tuple(chosen)


def read_server_config(path: str, uuid: str | None = None) -> ServerConfig:
    """Read the server ``uuid`` (or the only one) from a config.sqlite; ConfigError in one line."""
    where = f"--mongrel2-config {path!r}"
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: no such file (write it with 'm2sh load -config mongrel2.conf -db {path}')")
    try:
        db = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True)
    except sqlite3.Error as error:
        raise ConfigError(f"{where}: cannot open it: {error}") from None
    try:
        return _read(db, os.path.dirname(os.path.abspath(path)), uuid, where)
    except sqlite3.DatabaseError as error:
        raise ConfigError(f"{where}: not a Mongrel2 config database ({error})") from None
    finally:
        db.close()


def _read(db: sqlite3.Connection, base: str, uuid: str | None, where: str) -> ServerConfig:
    servers = db.execute("SELECT id, uuid, chroot FROM server ORDER BY id").fetchall()
    if not servers:
        raise ConfigError(f"{where}: it has no server")
    if uuid is None:
        if len(servers) > 1:
            raise ConfigError(f"{where} has {len(servers)} servers: choose one with --mongrel2-server "
                              f"({', '.join(row[1] for row in servers)})")
        server_id, uuid, chroot = servers[0]
    else:
        found = [row for row in servers if row[1] == uuid]
        if not found:
            raise ConfigError(f"--mongrel2-server {uuid!r} is not in {where} "
                              f"(its servers: {', '.join(row[1] for row in servers)})")
        server_id, uuid, chroot = found[0]
    rows = db.execute(
        "SELECT host.name, route.path, handler.send_spec, handler.recv_spec, handler.protocol"
        " FROM route JOIN host ON route.host_id = host.id JOIN handler ON route.target_id = handler.id"
        " WHERE host.server_id = ? AND route.target_type = 'handler' ORDER BY host.id, route.id",
        (server_id,)).fetchall()
    routes = []
    for host, route_path, send_spec, recv_spec, protocol in rows:
        endpoint = Endpoint(_reachable(send_spec), _reachable(recv_spec))
        for spec in (endpoint.send_spec, endpoint.recv_spec):
            check_endpoint(spec, f"{where}, handler of route {route_path!r}")
        routes.append(HandlerRoute(host, route_path, endpoint, protocol or "json"))
    settings = dict(db.execute("SELECT key, value FROM setting").fetchall())
    content_length = settings.get("limits.content_length")
    try:
        content_length = int(content_length) if content_length is not None else None
    except ValueError:
        raise ConfigError(f"{where}: limits.content_length {content_length!r} is not a number") from None
    return ServerConfig(uuid=uuid, chroot=os.path.normpath(os.path.join(base, chroot or ".")),
                        routes=tuple(routes), upload_store=settings.get("upload.temp_store"),
                        content_length=content_length)


def _reachable(spec: str) -> str:
    """A spec Mongrel2 binds on every address, as this host connects to it."""
    for wildcard in _WILDCARD_HOSTS:
        prefix = f"tcp://{wildcard}:"
        if spec.startswith(prefix):
            return f"tcp://{LOOPBACK}:{spec[len(prefix):]}"
    return spec


@dataclass(frozen=True)
class Mongrel2Settings:
    """What fleet uses of Mongrel2's configuration, after flags and config are merged."""

    endpoints: tuple[Endpoint, ...]
    chroot: str | None
    upload_store: str
    content_length: int


def merge(server: ServerConfig | None, *, endpoints: tuple[Endpoint, ...], chroot: str | None,
          upload_store: str | None, content_length: int | None, routes: tuple[str, ...],
          default_upload_store: str, default_content_length: int) -> tuple[Mongrel2Settings, list[str]]:
    """Flags (None or empty: not given) over the config over the defaults; and one line
    for each flag that differs from the config."""
    if server is None:
        return Mongrel2Settings(endpoints, chroot, upload_store or default_upload_store,
                                default_content_length if content_length is None else content_length), []
    notes: list[str] = []
    source = f"Mongrel2's config (server {server.uuid})"
    known = set(server.endpoints())
    missing = [path for path in routes if path not in {route.path for route in server.routes}]
    if missing:
        raise ConfigError(f"--mongrel2-route {missing[0]!r}: no handler route of that path in {source}; "
                          f"its handler routes: {', '.join(sorted({r.path for r in server.routes})) or 'none'}")
    if endpoints:
        for endpoint in endpoints:
            if endpoint not in known:
                notes.append(f"--zeromq {endpoint.send_spec},{endpoint.recv_spec} is not a handler in {source}; "
                             "using the flag")
    else:
        endpoints = server.endpoints(routes)
    if chroot is None:
        chroot = server.chroot if os.path.isdir(server.chroot) else None
        if chroot is None:
            notes.append(f"the chroot {server.chroot!r} of {source} is not a directory here: uploads are refused "
                         "(give --mongrel2-chroot)")
    elif os.path.abspath(chroot) != server.chroot:
        notes.append(f"--mongrel2-chroot {chroot!r} differs from the chroot {server.chroot!r} of {source}; "
                     "using the flag")
    if upload_store is None:
        upload_store = server.upload_store or default_upload_store
    elif server.upload_store is not None and upload_store != server.upload_store:
        notes.append(f"--mongrel2-upload-store {upload_store!r} differs from upload.temp_store "
                     f"{server.upload_store!r} in {source}; using the flag (uploads that do not match are refused)")
    if content_length is None:
        content_length = default_content_length if server.content_length is None else server.content_length
    elif server.content_length is not None and content_length != server.content_length:
        notes.append(f"--mongrel2-content-length {content_length} differs from limits.content_length "
                     f"{server.content_length} in {source}; using the flag")
    return Mongrel2Settings(endpoints, chroot, upload_store, content_length), notes
