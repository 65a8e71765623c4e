"""Import the application callable named by ``MODULE[:CALLABLE]``, with errors a user can act on."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from collections.abc import Callable, Iterable
from typing import Any

from fleet.config import HandlerConfig, parse_app_spec
from fleet.exitcodes import APP_LOAD_FAILED

WSGIApp = Callable[..., Iterable[bytes]]


class AppLoadError(Exception):
    """The application could not be loaded; str(error) is one line."""


def add_pythonpath(paths: Iterable[str]) -> None:
    for path in reversed(list(paths)):
        if path not in sys.path:
            sys.path.insert(0, path)


def load_app(spec: str, pythonpath: Iterable[str] = ()) -> WSGIApp:
    module_name, attr = parse_app_spec(spec)
    add_pythonpath(pythonpath)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise AppLoadError(
                f"cannot import module {module_name!r}: {error}; check --module and --pythonpath"
            ) from None
        raise AppLoadError(f"importing {module_name!r} failed: {error!r}") from None
    except BaseException as error:  # an app's import can raise anything, SystemExit included
        raise AppLoadError(f"importing {module_name!r} failed: {type(error).__name__}: {error}") from None
    app: Any = module
    for part in attr.split("."):
        try:
            app = getattr(app, part)
        except AttributeError:
            raise AppLoadError(f"module {module_name!r} has no callable {attr!r}") from None
    if not callable(app):
        raise AppLoadError(f"{module_name}:{attr} is not callable (it is {type(app).__name__})")
    return app


def is_async_callable(app: Any) -> bool:
    """An ASGI application is an ``async def`` function or an object whose __call__ is one."""
    if inspect.iscoroutinefunction(app):
        return True
    return not inspect.isroutine(app) and inspect.iscoroutinefunction(type(app).__call__)


def check_interface(app: Any, spec: str, interface: str) -> None:
    """Refuse the mix-up of the two conventions, which would otherwise fail on every request."""
    if interface == "asgi" and not is_async_callable(app):
        raise AppLoadError(f"{spec} is not an async callable, so not an ASGI app; "
                           "leave out --interface asgi to serve it as WSGI")
    if interface == "wsgi" and is_async_callable(app):
        raise AppLoadError(f"{spec} is an async callable (an ASGI app); add --interface asgi")


def check_main(argv: list[str]) -> int:
    """``python -m fleet.appload INTERFACE SPEC [PATH...]``: the master's pre-flight import check."""
    try:
        check_interface(load_app(argv[1], argv[2:]), argv[1], argv[0])
    except AppLoadError as error:
        print(f"fleet: error: {error}", file=sys.stderr)
        return APP_LOAD_FAILED
    return 0


def preflight_app(config: HandlerConfig) -> str | None:
    """Import the app in a throwaway process (check_main): a clear error before any
    worker starts, without loading the app (and its side effects) into the supervisor."""
    check = subprocess.run(
        [sys.executable, "-m", "fleet.appload", config.interface, config.app, *config.pythonpath],
        capture_output=True, text=True,
    )
    if check.returncode == 0:
        return None
    lines = [line for line in check.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"fleet: error: importing {config.app!r} failed"


def app_version(spec: str) -> str | None:
    """The application's version, if its module (or package) says: ``__version__``."""
    module_name, _ = parse_app_spec(spec)
    parts = module_name.split(".")
    for depth in range(len(parts), 0, -1):
        module = sys.modules.get(".".join(parts[:depth]))
        version = getattr(module, "__version__", None)
        if isinstance(version, str) and version:
            return version[:128]
    return None


if __name__ == "__main__":
    raise SystemExit(check_main(sys.argv[1:]))
