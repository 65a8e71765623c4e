"""What a master may ask of this node: the node's own limits on an announced configuration.

Without a policy, whoever holds the cluster key decides a node's module,
import path, chroot and upload store: enough to make it import code from
any directory, or read and delete files where it is told uploads are. A
``fleet node`` with ``--allow-*`` / ``--max-*`` options or a ``--policy-file``
refuses any configuration outside them: on its first join it runs nothing,
later it keeps what it runs; either way its heartbeat says ``refused:
<reason>`` (``fleet status`` shows it).

A field that is not given is not restricted. The file is TOML with the same
names as the options (lists for the ``allow`` ones)::

    modules = ["shop.wsgi:application"]
    pythonpath = ["/srv/shop"]
    chroots = ["/srv/mongrel2"]
    upload_stores = ["/tmp/mongrel2.upload.XXXXXX"]
    endpoints = ["tcp://10.0.0.5:*"]
    max_processes = 8
    max_threads = 16
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import tomllib
from dataclasses import dataclass

from fleet.config import ConfigError, HandlerConfig

_LISTS = ("modules", "pythonpath", "chroots", "upload_stores", "endpoints")
_LIMITS = ("max_processes", "max_threads")


class PolicyRefused(ConfigError):
    """A configuration outside the node's policy; str() starts with "refused: "."""


@dataclass(frozen=True)
class NodePolicy:
    modules: tuple[str, ...] | None = None  # fnmatch patterns of --module values
    pythonpath: tuple[str, ...] | None = None  # directories an announced --pythonpath may be in
    chroots: tuple[str, ...] | None = None  # allowed --mongrel2-chroot directories
    upload_stores: tuple[str, ...] | None = None  # allowed upload.temp_store templates
    endpoints: tuple[str, ...] | None = None  # fnmatch patterns of Mongrel2 send and recv specs
    max_processes: int | None = None
    max_threads: int | None = None

    @property
    def empty(self) -> bool:
        return all(getattr(self, field.name) is None for field in dataclasses.fields(self))

    def describe(self) -> str:
        parts = [f"{field.name}={', '.join(value) if isinstance(value, tuple) else value}"
                 for field in dataclasses.fields(self) if (value := getattr(self, field.name)) is not None]
        return "; ".join(parts) or "none"

    def check(self, config: HandlerConfig) -> None:
        """Raise PolicyRefused with the first reason ``config`` is outside the policy."""
        reason = self._reason(config)
        if reason is not None:
            raise PolicyRefused(f"refused: {reason}")

    def _reason(self, config: HandlerConfig) -> str | None:
        if self.modules is not None and not any(fnmatch.fnmatchcase(config.app, p) for p in self.modules):
            return f"module {config.app!r} is not allowed here (allowed: {', '.join(self.modules)})"
        if self.pythonpath is not None:
            for path in config.pythonpath:
                if not any(_inside(path, allowed) for allowed in self.pythonpath):
                    return f"pythonpath {path!r} is not allowed here (allowed: {', '.join(self.pythonpath)})"
        if self.chroots is not None and config.mongrel2_chroot is not None \
                and not any(_same_dir(config.mongrel2_chroot, allowed) for allowed in self.chroots):
            return (f"Mongrel2 chroot {config.mongrel2_chroot!r} is not allowed here "
                    f"(allowed: {', '.join(self.chroots)})")
        if self.upload_stores is not None and config.mongrel2_chroot is not None \
                and config.upload_store not in self.upload_stores:
            return (f"upload store {config.upload_store!r} is not allowed here "
                    f"(allowed: {', '.join(self.upload_stores)})")
        if self.endpoints is not None:
            for endpoint in config.endpoints:
                for spec in (endpoint.send_spec, endpoint.recv_spec):
                    if not any(fnmatch.fnmatchcase(spec, p) for p in self.endpoints):
                        return f"Mongrel2 endpoint {spec!r} is not allowed here (allowed: {', '.join(self.endpoints)})"
        if self.max_processes is not None and config.processes > self.max_processes:
            return f"{config.processes} processes is over this node's limit of {self.max_processes}"
        if self.max_threads is not None and config.threads > self.max_threads:
            return f"{config.threads} threads is over this node's limit of {self.max_threads}"
        return None


def load_policy(path: str | None, **options: object) -> NodePolicy:
    """The policy of a --policy-file (TOML) and the node's options: the lists add up,
    an option's limit wins over the file's. ConfigError in one line."""
    values: dict[str, object] = {}
    if path is not None:
        try:
            with open(path, "rb") as file:
                data = tomllib.load(file)
        except OSError as error:
            raise ConfigError(f"--policy-file {path!r}: {error.strerror or error}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"--policy-file {path!r}: not TOML: {error}") from None
        unknown = sorted(set(data) - set(_LISTS) - set(_LIMITS))
        if unknown:
            raise ConfigError(f"--policy-file {path!r}: unknown key {unknown[0]!r} "
                              f"(known: {', '.join(_LISTS + _LIMITS)})")
        for name in _LISTS:
            if name in data:
                items = data[name]
                if not isinstance(items, list) or not all(isinstance(item, str) and item for item in items):
                    raise ConfigError(f"--policy-file {path!r}: {name} must be a list of strings")
                values[name] = tuple(items)
        for name in _LIMITS:
            if name in data:
                if not isinstance(data[name], int) or isinstance(data[name], bool) or data[name] < 1:
                    raise ConfigError(f"--policy-file {path!r}: {name} must be a whole number of at least 1")
                values[name] = data[name]
    for name in _LISTS:
        given = options.get(name)
        if given:
            values[name] = tuple(values.get(name, ())) + tuple(given)  # type: ignore[arg-type]
    for name in _LIMITS:
        if options.get(name) is not None:
            values[name] = options[name]
    return NodePolicy(**values)  # type: ignore[arg-type]


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)
