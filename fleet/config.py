"""The handler configuration: what every worker of a host needs to serve.

It is validated once, in the master, so that a user mistake is one clear line
before any worker starts. The same object is what the cluster will announce.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

DEFAULT_UPLOAD_STORE = "/tmp/mongrel2.upload.XXXXXX"
DEFAULT_CONTENT_LENGTH = 20480  # Mongrel2's own default for limits.content_length
DISPATCH_MODES = ("broker", "direct")
INTERFACES = ("wsgi", "asgi")
ASGI_LOOPS = ("auto", "asyncio", "uvloop")
# Requests one ASGI worker process serves at once unless --asgi-concurrency says otherwise.
DEFAULT_ASGI_CONCURRENCY = 100
DEFAULT_WEBSOCKET_MAX_SIZE = 16 * 1024 * 1024  # uvicorn's default
DEFAULT_HTTP_KEEPALIVE = 5.0
DEFAULT_HTTP_TIMEOUT = 30.0
DEFAULT_HTTP_MAX_BODY = 100 * 1024 * 1024
# An --http host that means "every address": kept as is on cluster nodes.
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "*"})

# tcp://HOST:PORT with HOST a name, an IPv4 address, [IPv6] or *; ipc://PATH.
_TCP_ENDPOINT = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.*_-]+):(\d{1,5})$")
_IPC_ENDPOINT = re.compile(r"^ipc://.+$")
_APP_SPEC = re.compile(r"^[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?$")


class ConfigError(ValueError):
    """A user mistake; str(error) is one line that says what to fix."""


@dataclass(frozen=True)
class Endpoint:
    """One Mongrel2 handler: it PUSHes requests on send_spec and SUBs replies on recv_spec."""

    send_spec: str
    recv_spec: str

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        parts = [part.strip() for part in text.split(",")]
        if len(parts) != 2 or not all(parts):
            raise ConfigError(
                f"--zeromq {text!r}: expected SEND_SPEC,RECV_SPEC such as "
                "tcp://127.0.0.1:9999,tcp://127.0.0.1:9998"
            )
        for spec in parts:
            check_endpoint(spec, "--zeromq")
        if parts[0] == parts[1]:
            raise ConfigError(f"--zeromq {text!r}: SEND_SPEC and RECV_SPEC must differ")
        return cls(parts[0], parts[1])


def parse_host_port(text: str, where: str, *, example: str, form: str = "HOST:PORT",
                    host_required: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port): the one parser of every HOST:PORT fleet takes.

    An IPv6 host is written in brackets and returned without them; the host may
    be empty (``:8080``) unless ``host_required``. ``where`` starts each error
    message (the option and the text as given), ``example`` shows the form.
    """
    host, colon, port_text = text.rpartition(":")
    if not colon or not port_text.isdigit() or (host_required and not host):
        raise ConfigError(f"{where}: expected {form} such as {example}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ConfigError(f"{where}: port {port} is out of range 1-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"{where}: write an IPv6 address in brackets, e.g. [::1]:{port}")
    return host, port


def tcp_host_port(spec: str) -> tuple[str, int] | None:
    """(host, port) of a ``tcp://HOST:PORT`` ZeroMQ endpoint; None for another transport."""
    if not spec.startswith("tcp://"):
        return None
    try:
        return parse_host_port(spec.removeprefix("tcp://"), spec, example="tcp://127.0.0.1:9999")
    except ConfigError:
        return None


def check_endpoint(spec: str, option: str) -> None:
    """Refuse anything ZeroMQ would reject later, far from the user's command line."""
    if _TCP_ENDPOINT.match(spec):
        parse_host_port(spec.removeprefix("tcp://"), f"{option} {spec!r}", example="tcp://127.0.0.1:9999")
        return
    if _IPC_ENDPOINT.match(spec):
        return
    raise ConfigError(
        f"{option} {spec!r}: not a ZeroMQ endpoint; use tcp://HOST:PORT or ipc://PATH"
    )


@dataclass(frozen=True)
class HttpAddress:
    """An --http HOST:PORT; an empty host (``:8080``) means every IPv4 address."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HttpAddress:
        host, port = parse_host_port(text, f"--http {text!r}", example="127.0.0.1:8080 or :8080")
        if host == "*":
            host = ""
        return cls(host or "0.0.0.0", port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_app_spec(text: str) -> tuple[str, str]:
    """'pkg.mod:callable' -> ('pkg.mod', 'callable'); the callable defaults to 'application'."""
    if not _APP_SPEC.match(text):
        raise ConfigError(f"--module {text!r}: expected MODULE or MODULE:CALLABLE such as app:application")
    module, _, attr = text.partition(":")
    return module, attr or "application"


@dataclass(frozen=True)
class HandlerConfig:
    """Everything a host's supervisor and workers need; plain data, so it can travel."""

    endpoints: tuple[Endpoint, ...]  # may be empty when --http serves alone
    app: str
    processes: int = 1
    threads: int = 1
    pythonpath: tuple[str, ...] = ()
    dispatch: str = "broker"
    mongrel2_chroot: str | None = None
    upload_store: str = DEFAULT_UPLOAD_STORE
    content_length_limit: int = DEFAULT_CONTENT_LENGTH
    graceful_timeout: float = 30.0
    reload_batch: int = 0  # workers replaced at a time on a reload; 0: all at once
    harakiri: float = 0.0  # seconds one request may take before its worker is killed; 0: off
    max_requests: int = 0  # recycle a worker after this many requests; 0: off
    max_requests_jitter: int = 0
    reload_on_rss: int = 0  # recycle a worker whose RSS passes this many MB; 0: off
    http: tuple[str, ...] = ()  # HOST:PORT to serve plain HTTP on, beside or instead of Mongrel2
    http_keepalive: float = DEFAULT_HTTP_KEEPALIVE
    http_timeout: float = DEFAULT_HTTP_TIMEOUT
    http_max_body: int = DEFAULT_HTTP_MAX_BODY
    logger: str | None = None  # 'zeromq:ENDPOINT': every host's log lines also go there (fleet logs --bind)
    interface: str = "wsgi"  # the application's calling convention: WSGI (PEP 3333) or ASGI 3
    asgi_concurrency: int = DEFAULT_ASGI_CONCURRENCY  # ASGI: requests one worker process serves at once
    asgi_loop: str = "auto"  # ASGI: the event loop; auto takes uvloop when it is installed
    websocket_max_size: int = DEFAULT_WEBSOCKET_MAX_SIZE  # ASGI: a bigger client message closes with 1009
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.endpoints and not self.http:
            raise ConfigError("nothing to serve: give --zeromq SEND_SPEC,RECV_SPEC (Mongrel2) or --http HOST:PORT")
        if len(self.endpoints) > 255:
            raise ConfigError("at most 255 --zeromq endpoints are supported")
        parse_app_spec(self.app)
        for name in ("processes", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name} must be a whole number of at least 1, not {value!r}")
        self._check_interface()
        if self.dispatch not in DISPATCH_MODES:
            raise ConfigError(f"--dispatch must be one of {', '.join(DISPATCH_MODES)}")
        if self.harakiri and self.dispatch == "direct" and self.interface == "wsgi":
            raise ConfigError("--harakiri needs --dispatch broker: "
                              "only the dispatcher knows how long a request has run")
        if self.content_length_limit < 0:
            raise ConfigError("--mongrel2-content-length must not be negative")
        addresses = [HttpAddress.parse(text) for text in self.http]
        if len(set(addresses)) != len(addresses):
            raise ConfigError("the same --http address is given twice")
        if self.http_timeout <= 0:
            raise ConfigError("--http-timeout must be more than 0 seconds")
        for name in ("graceful_timeout", "reload_batch", "harakiri", "max_requests",
                     "max_requests_jitter", "reload_on_rss", "http_keepalive", "http_max_body"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must not be negative")
        if not self.upload_store.endswith("XXXXXX"):
            raise ConfigError(
                f"--mongrel2-upload-store {self.upload_store!r}: must end in XXXXXX like Mongrel2's upload.temp_store"
            )

    def _check_interface(self) -> None:
        if self.interface not in INTERFACES:
            raise ConfigError(f"--interface must be one of {', '.join(INTERFACES)}, not {self.interface!r}")
        if self.asgi_loop not in ASGI_LOOPS:
            raise ConfigError(f"--asgi-loop must be one of {', '.join(ASGI_LOOPS)}, not {self.asgi_loop!r}")
        if not isinstance(self.websocket_max_size, int) or self.websocket_max_size < 1:
            raise ConfigError(f"--websocket-max-size must be a whole number of at least 1, "
                              f"not {self.websocket_max_size!r}")
        if not isinstance(self.asgi_concurrency, int) or self.asgi_concurrency < 1:
            raise ConfigError(f"--asgi-concurrency must be a whole number of at least 1, not {self.asgi_concurrency!r}")
        if self.interface != "asgi":
            return
        if self.threads > 1:
            raise ConfigError("--threads is for WSGI apps: an ASGI worker runs one event loop; "
                              "use --asgi-concurrency for how many requests it serves at once")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["endpoints"] = [[e.send_spec, e.recv_spec] for e in self.endpoints]
        data["pythonpath"] = list(self.pythonpath)
        data["http"] = list(self.http)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HandlerConfig:
        """Settings this version does not know are left out (see unknown_settings):
        a node one version behind its master still serves what it understands."""
        known = {f.name for f in fields(cls)}
        data = {key: value for key, value in data.items() if key in known}
        data["endpoints"] = tuple(Endpoint(*pair) for pair in data["endpoints"])
        data["pythonpath"] = tuple(data.get("pythonpath", ()))
        data["http"] = tuple(data.get("http", ()))
        return cls(**data)

    @classmethod
    def unknown_settings(cls, data: dict[str, Any]) -> list[str]:
        known = {f.name for f in fields(cls)}
        return sorted(key for key in data if key not in known)

    @property
    def http_addresses(self) -> tuple[HttpAddress, ...]:
        return tuple(HttpAddress.parse(text) for text in self.http)
